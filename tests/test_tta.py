"""Test-time augmentation from a checkpoint, in a fresh process (fastai's breaks there)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from transferkit.checkpoint_io import load_classifier
from transferkit.data.transforms import build_transform
from transferkit.evaluate import evaluate
from transferkit.finetune import finetune
from transferkit.tta import TTA

from .conftest import CONF_DIR, tiny_overrides


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from .conftest import write_images

    base = tmp_path_factory.mktemp("tta")
    write_images(base / "images", ["ant", "bee", "cat"], per_class=12)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("finetune", overrides=tiny_overrides(base / "images", base / "run"))
    finetune(cfg)
    return base


def test_flip_tta_in_a_fresh_process_averages_the_two_views(ckpt, tmp_path):
    path = ckpt / "run" / "checkpoints" / "best.ckpt"
    out = tmp_path / "p.csv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(
        [sys.executable, "-m", "transferkit.predict", f"ckpt={path}",
         f"input={ckpt / 'images' / 'bee'}", "tta=flip", "top_k=3", f"output={out}",
         f"hydra.run.dir={tmp_path}/h"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(csv.DictReader(out.open()))
    model = load_classifier(path)
    x = build_transform(model.preprocessing, train=False)(Image.open(row["path"]).convert("RGB"))
    with torch.no_grad():
        one_view = model(x[None]).softmax(-1)
        expected = (one_view + model(x[None].flip(-1)).softmax(-1)) / 2
    assert (expected - one_view).abs().max() > 1e-3  # the mirror view changes the answer
    names = model.hparams["class_names"]
    got = {row[f"class_{j}"]: float(row[f"prob_{j}"]) for j in (1, 2, 3)}
    for c, p in got.items():
        assert p == pytest.approx(float(expected[0, names.index(c)]), abs=1e-5)


@pytest.mark.parametrize("mode", ["none", "flip", "five_crop"])
def test_evaluate_with_tta(mode, ckpt, tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            f"ckpt={ckpt / 'run' / 'checkpoints' / 'best.ckpt'}", "data=image_folder",
            f"data.root={ckpt / 'images'}", "split=all", f"tta={mode}",
            f"paths.output_dir={tmp_path}"])  # fmt: skip
    result = evaluate(cfg)
    assert result["images"] == 36 and 0.0 <= result["all/acc"] <= 1.0


def test_views():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
    x = torch.randn(2, 3, 40, 40)
    assert [v.shape[-1] for v in TTA(model, "five_crop", 35).views(x)] == [35] * 5
    assert torch.equal(TTA(model, "flip", 40).views(x)[1], x.flip(-1))
    with pytest.raises(ValueError, match="tta='rotate'"):
        TTA(model, "rotate", 40)
