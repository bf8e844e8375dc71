"""The Hydra app end to end, composed from the real conf/ as users run it."""

import json
import os
import subprocess
import sys

from transferkit.finetune import finetune

from .conftest import tiny_overrides

SUMMARY_KEYS = {
    "backbone", "num_classes", "train_size", "val_size", "test_size", "trainable_blocks",
    "total_blocks", "trainable_params", "total_params", "epochs", "best_val_acc", "test_acc",
    "fit_seconds", "train_images_per_second", "plan",
}  # fmt: skip


def test_finetune_writes_a_valid_summary(image_folder, tmp_path, make_cfg):
    out = tmp_path / "run"
    cfg = make_cfg(*tiny_overrides(image_folder, out, "finetune=partial",
                                   "finetune.trainable_blocks=2"))  # fmt: skip
    finetune(cfg)
    on_disk = json.loads((out / "summary.json").read_text())
    assert set(on_disk) >= SUMMARY_KEYS
    assert on_disk["train_size"] == 18 and on_disk["val_size"] == 9
    assert on_disk["test_size"] == 9
    assert on_disk["trainable_blocks"] == 2 and on_disk["total_blocks"] == 6
    assert 0 < on_disk["trainable_params"] < on_disk["total_params"]
    assert 0.0 <= on_disk["test_acc"] <= 1.0 and on_disk["epochs"] == 2
    assert on_disk["plan"]["regime"] == "partial"
    assert (out / "checkpoints" / "best.ckpt").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()


def test_same_seed_same_metrics(image_folder, tmp_path, make_cfg):
    runs = []
    for i in range(2):
        cfg = make_cfg(*tiny_overrides(image_folder, tmp_path / f"r{i}", "trainer.max_epochs=1"))
        runs.append(finetune(cfg)[0])
    assert runs[0]["test_acc"] == runs[1]["test_acc"]
    assert runs[0]["test_loss"] == runs[1]["test_loss"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRANSFERKIT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "transferkit.finetune", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def test_cli_bad_root_is_one_clear_line(tmp_path):
    r = _cli("data=image_folder", f"data.root={tmp_path}/nowhere", f"hydra.run.dir={tmp_path}/o")
    assert r.returncode == 2
    assert "data.root=" in r.stderr and "nowhere" in r.stderr and "is not a directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_unknown_backbone_suggests_names(image_folder, tmp_path):
    r = _cli(f"data.root={image_folder}", "data=image_folder", "model.backbone=resnet5O",
             f"hydra.run.dir={tmp_path}/o")  # fmt: skip
    assert r.returncode == 2 and "resnet50" in r.stderr and "Traceback" not in r.stderr
