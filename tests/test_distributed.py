"""Scaling out: LR rule, multirun guard, and the CLI under trainer=ddp_cpu (2 processes)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from transferkit.distributed import check_multirun, lr_scale, relaunching_strategy

from .conftest import write_images


@pytest.mark.parametrize(
    ("rule", "global_batch", "expected"),
    [("none", 512, 1.0), ("linear", 128, 2.0), ("linear", 32, 0.5), ("sqrt", 256, 2.0)],
)
def test_lr_scale(rule, global_batch, expected):
    assert lr_scale(rule, global_batch, 64) == pytest.approx(expected)


def test_lr_scale_rejects_unknown_rule():
    with pytest.raises(ValueError, match=r"lr_scaling.rule='cubic'.*linear"):
        lr_scale("cubic", 64, 64)


@pytest.mark.parametrize(
    ("trainer", "relaunch"),
    [
        ({"strategy": "ddp", "devices": 2}, True),
        ({"strategy": "ddp", "devices": -1}, True),
        ({"strategy": "ddp", "devices": 1, "num_nodes": 2}, True),
        ({"strategy": "ddp_spawn", "devices": 2}, False),
        ({"strategy": "ddp", "devices": 1}, False),
        ({"strategy": "auto", "devices": "auto"}, False),
    ],
)
def test_multirun_guard(trainer, relaunch):
    assert relaunching_strategy(trainer) is relaunch
    if relaunch:
        with pytest.raises(ValueError, match="ddp_spawn"):
            check_multirun(trainer, multirun=True)
    check_multirun(trainer, multirun=False)


@pytest.mark.slow  # processes of a DDP run: `make test-slow` (CI) runs it
def test_cli_ddp_cpu_one_run_dir_one_summary(tmp_path):
    """`transferkit-finetune trainer=ddp_cpu` from the command line, as `make finetune
    ARGS="trainer=ddp_cpu"` runs it: both ranks share one Hydra run directory.

    12 training images, batch 5: the split would end on a batch of 2, but each rank's shard
    of 6 ends on a batch of 1, which the BatchNorm in the MLP head cannot train on: the last
    batch is dropped per rank. The step budget counts steps at the global batch of 10."""
    write_images(tmp_path / "images", ["a", "b"], per_class=12)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(
        [sys.executable, "-m", "transferkit.finetune", "trainer=ddp_cpu", "data=image_folder",
         f"data.root={tmp_path / 'images'}", "data.image_size=32", "data.batch_size=5",
         "model/head=mlp", "model.head.hidden=8",
         "data.val_fraction=0.25", "data.test_fraction=0.25", "model.backbone=test_efficientnet",
         "model.weights=none", "finetune=gradual", "finetune.blocks_per_step=3",
         "trainer.max_epochs=2", "trainer.enable_progress_bar=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    run_dirs = [p.parent for p in (tmp_path / "outputs").glob("*/*/.hydra")]
    all_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1 and all_dirs == run_dirs, all_dirs
    summaries = list(tmp_path.rglob("summary.json"))
    assert summaries == [run_dirs[0] / "summary.json"]
    summary = json.loads(summaries[0].read_text())
    assert summary["plan"]["regime"] == "gradual" and summary["epochs"] == 2
    assert summary["train_size"] == 12 and summary["global_steps"] == 2  # one batch of 5 a rank
    budget = summary["plan"]["budget"]
    assert (budget["devices"], budget["global_batch"], budget["steps_per_epoch"]) == (2, 10, 1)


@pytest.mark.slow  # processes of a DDP run: `make test-slow` (CI) runs it
def test_cli_ddp_cpu_auto_races_once_and_every_rank_takes_its_depth(tmp_path):
    """`finetune=auto` under 2-process DDP: rank 0 races on one device before the processes
    start; the process Lightning starts takes its decision from the environment instead of
    racing again, so both train the same blocks (DDP would fail on differing parameters)."""
    write_images(tmp_path / "images", ["a", "b", "c"], per_class=16)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("TRANSFERKIT_AUTO_DECISION", None)
    r = subprocess.run(
        [sys.executable, "-m", "transferkit.finetune", "trainer=ddp_cpu", "data=image_folder",
         f"data.root={tmp_path / 'images'}", "data.image_size=32", "data.batch_size=4",
         "data.val_fraction=0.25", "data.test_fraction=0.25", "model.backbone=test_efficientnet",
         "model.weights=none", "finetune=auto", "finetune.steps=12",
         "trainer.enable_progress_bar=false", "logger=none", "report=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    measured = summary["plan"]["measured"]
    assert measured["source"] == "race" and summary["trainable_blocks"] == measured["blocks"]
    raced = re.findall(r"auto: \d+ blocks, \d+ steps", r.stdout + r.stderr)
    assert len(raced) == len(measured["trials"])  # once, by rank 0


def test_sync_batchnorm_is_refused_with_the_alternative(image_folder, tmp_path, make_cfg):
    from transferkit.finetune import build

    from .conftest import tiny_overrides

    cfg = make_cfg(*tiny_overrides(image_folder, tmp_path, "trainer.sync_batchnorm=true"))
    with pytest.raises(ValueError, match=r"model\.backbone_norm=syncbn"):
        build(cfg)
