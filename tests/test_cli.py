"""evaluate, predict and export: in-process through the real conf/, plus the console scripts."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from transferkit.evaluate import evaluate
from transferkit.export import export
from transferkit.finetune import finetune
from transferkit.predict import predict

from .conftest import CONF_DIR, tiny_overrides, write_images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained checkpoint and its data folder (trained once for this module)."""
    base = tmp_path_factory.mktemp("cli")
    root = base / "images"
    write_images(root, ["ant", "bee", "cat"], per_class=12)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=tiny_overrides(root, base / "run"))
    summary, objects = finetune(cfg)
    return {"root": root, "ckpt": base / "run" / "checkpoints" / "best.ckpt",
            "summary": summary, "model": objects["model"].eval()}  # fmt: skip


def _cfg(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _data(root: Path) -> list[str]:
    return ["data=image_folder", f"data.root={root}", "data.val_fraction=0.25",
            "data.test_fraction=0.25", "data.batch_size=8"]  # fmt: skip


def test_evaluate_reproduces_the_test_metrics_of_the_run(trained, tmp_path):
    out = tmp_path / "eval"
    result = evaluate(_cfg("evaluate", f"ckpt={trained['ckpt']}", *_data(trained["root"]),
                           f"paths.output_dir={out}"))  # fmt: skip
    assert result["images"] == 9
    assert result["test/acc"] == pytest.approx(trained["summary"]["test_acc"], abs=1e-6)
    assert result["test/loss"] == pytest.approx(trained["summary"]["test_loss"], abs=1e-5)
    assert sum(map(sum, result["confusion_matrix"])) == 9
    assert json.loads((out / "evaluation.json").read_text())["class_names"] == ["ant", "bee", "cat"]
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert "| ant | 3 |" in (out / "evaluation.md").read_text()
    assert "![top losses](top_losses.png)" in (out / "evaluation.md").read_text()
    assert (out / "top_losses.png").stat().st_size > 5000
    assert len((out / "top_losses.csv").read_text().splitlines()) == 1 + 9


def test_evaluate_any_folder_with_a_subset_of_the_classes(trained, tmp_path):
    folder = tmp_path / "new"
    write_images(folder, ["ant", "cat"], per_class=2, seed=5)
    overrides = [f"ckpt={trained['ckpt']}", "data=image_folder", f"data.root={folder}",
                 "split=all", f"paths.output_dir={tmp_path}/o"]  # fmt: skip
    result = evaluate(_cfg("evaluate", *overrides))
    cm = torch.tensor(result["confusion_matrix"])
    assert result["images"] == 4 and cm.shape == (3, 3)
    assert cm[0].sum() == 2 and cm[1].sum() == 0 and cm[2].sum() == 2  # labels mapped to ant/cat


def test_predict_writes_top_k_csv_matching_the_model(trained, tmp_path):
    out = tmp_path / "p.csv"
    folder = trained["root"] / "bee"
    path = predict(_cfg("predict", f"ckpt={trained['ckpt']}", f"input={folder}", "top_k=2",
                        f"output={out}", f"paths.output_dir={tmp_path}"))  # fmt: skip
    rows = list(csv.DictReader(path.open()))
    assert path == out and len(rows) == 12
    assert list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2"]
    assert all(float(r["prob_1"]) >= float(r["prob_2"]) for r in rows)
    # the same top-1 as the in-memory model on the same file
    from transferkit.data.samples import to_rgb
    from transferkit.data.transforms import build_transform

    model = trained["model"]
    tf = build_transform(model.preprocessing, train=False)
    from PIL import Image

    x = tf(to_rgb(Image.open(rows[0]["path"])))[None]
    with torch.no_grad():
        p = model(x).softmax(-1)[0]
    assert rows[0]["class_1"] == ["ant", "bee", "cat"][int(p.argmax())]
    assert float(rows[0]["prob_1"]) == pytest.approx(float(p.max()), abs=1e-5)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_parity(trained, tmp_path, fmt, capsys):
    if fmt == "onnx" and any(
        importlib.util.find_spec(p) is None for p in ("onnx", "onnxscript", "onnxruntime")
    ):
        pytest.skip("pip install 'transferkit[export]' for ONNX")
    result = export(_cfg("export", f"ckpt={trained['ckpt']}", f"format={fmt}",
                         f"paths.output_dir={tmp_path}"))  # fmt: skip
    assert result["path"].is_file() and result["max_abs_diff"] <= 1e-4
    printed = capsys.readouterr().out
    assert "max abs logit difference" in printed and "tolerance 0.0001" in printed
    # the file runs without transferkit and agrees with the model on a new batch size
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = trained["model"](x).numpy()
    if fmt == "torchscript":
        extra = {"transferkit.json": ""}
        loaded = torch.jit.load(str(result["path"]), _extra_files=extra)
        got = loaded(x).detach().numpy()
        assert json.loads(extra["transferkit.json"])["class_names"] == ["ant", "bee", "cat"]
    else:
        import onnxruntime

        got = onnxruntime.InferenceSession(str(result["path"])).run(None, {"image": x.numpy()})[0]
    assert abs(got - expected).max() < 1e-4


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRANSFERKIT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", f"transferkit.{name}", *args],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip


def test_console_predict_prints_the_csv_path(trained, tmp_path):
    img = next((trained["root"] / "ant").iterdir())
    r = _script("predict", f"ckpt={trained['ckpt']}", f"input={img}", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert f"written to {tmp_path}/predictions.csv" in r.stdout
    assert (tmp_path / "predictions.csv").read_text().count("\n") == 2
