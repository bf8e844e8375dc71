"""The run report: metrics.csv parsing, marks, confusion matrix, plots and report.md."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit.finetune import finetune
from transferkit.report import (
    best_epoch,
    confusion_matrix,
    curve_marks,
    metrics_parts,
    overfitting_epoch,
    per_class_rows,
    plot_confusion_matrix,
    plot_learning_curves,
    read_epoch_metrics,
)

from .conftest import tiny_overrides

CSV = """epoch,lr-Adam/head,step,test/acc,test/loss,train/acc,train/loss,val/acc,val/loss
,0.001,0,,,,,,
0,,2,,,,,0.50,0.90
0,,2,,,0.40,1.10,,
1,,5,,,,,0.70,0.60
1,,5,,,0.60,0.70,,
2,,8,,,0.90,0.30,,
3,,11,,,,,0.65,0.80
3,,11,,,0.95,0.20,,
4,,12,0.66,0.81,,,,
"""


def test_read_epoch_metrics_one_row_per_epoch(tmp_path):
    (tmp_path / "metrics.csv").write_text(CSV)
    t = read_epoch_metrics(tmp_path / "metrics.csv")
    assert t["epoch"] == [1, 2, 3, 4]  # 1-based; the test row (no train/val values) is ignored
    assert t["train/loss"] == [1.10, 0.70, 0.30, 0.20]
    assert t["val/acc"][:2] == [0.50, 0.70] and math.isnan(t["val/acc"][2])  # no val in epoch 3


def test_a_resumed_runs_metrics_join_oldest_first(tmp_path):
    """Resuming in a run's folder keeps the earlier parts aside as before-resume-<n>: the
    curves join them in order (10 after 2), each part replacing the epochs from its first
    on (those after the checkpoint it resumed from were abandoned)."""
    header = "epoch,step,train/loss,val/loss\n"
    # the first part went on to epoch 4; the run was resumed from epoch 2's checkpoint
    (tmp_path / "metrics.before-resume-2.csv").write_text(header + "1,2,0.8,\n2,3,0.7,\n4,5,0.1,\n")
    (tmp_path / "metrics.before-resume-10.csv").write_text(header + "2,3,0.6,0.9\n")
    (tmp_path / "metrics.before-resume-x.csv").write_text(header + "0,1,9.0,\n")  # not ours
    (tmp_path / "metrics.csv").write_text(header + "3,4,0.5,0.8\n")
    parts = metrics_parts(tmp_path)
    assert [p.name for p in parts] == ["metrics.before-resume-2.csv",
                                       "metrics.before-resume-10.csv", "metrics.csv"]  # fmt: skip
    t = read_epoch_metrics(*parts)
    assert t["epoch"] == [2.0, 3.0, 4.0] and t["train/loss"] == [0.8, 0.6, 0.5]
    assert math.isnan(t["val/loss"][0]) and t["val/loss"][1:] == [0.9, 0.8]
    assert metrics_parts(tmp_path / "nothing") == []


@pytest.mark.parametrize(
    ("train", "val", "expected"),
    [
        ([1.0, 0.8, 0.6, 0.4], [1.0, 0.9, 0.8, 0.7], None),  # both fall: no overfitting
        ([1.0, 0.8, 0.6, 0.4], [1.0, 0.7, 0.9, 1.2], 2),  # val turns up after epoch 2, train falls
        ([1.0, 0.8, 0.9, 1.0], [1.0, 0.7, 0.9, 1.2], None),  # both rise: not overfitting
        ([1.0, 0.8, 0.6, 0.4], [1.0, 0.7, 0.702, 0.701], None),  # noise-level rise
        ([1.0, math.nan, 0.6], [1.0, math.nan, 1.5], 1),  # gaps (validation every n epochs)
    ],
)
def test_overfitting_epoch(train, val, expected):
    epochs = list(range(1, len(train) + 1))
    assert overfitting_epoch(epochs, train, val) == expected


def test_best_epoch_is_the_first_best_like_model_checkpoint():
    assert best_epoch([1, 2, 3], [0.5, 0.7, 0.7], "max") == 2
    assert best_epoch([1, 2, 3], [0.5, math.nan, 0.4], "min") == 3
    assert best_epoch([1, 2], [math.nan, math.nan], "max") is None


def test_curve_marks_and_note():
    table = {"epoch": [1.0, 2.0, 3.0], "train/loss": [1.0, 0.5, 0.2],
             "val/loss": [0.9, 0.6, 0.9], "train/acc": [0.5, 0.7, 0.9],
             "val/acc": [0.5, 0.8, 0.7]}  # fmt: skip
    marks, note = curve_marks(table, "val/acc", "max", stopped_after=3)
    assert marks == {"best (val/acc)": 2.0, "early stop": 3.0, "overfitting": 2.0}
    assert "epoch 2" in note and "after epoch 3" in note
    # a stop after the first epoch is a stop (Lightning's stopped_epoch is 0 there)
    assert curve_marks(table, "val/acc", "max", stopped_after=1)[0]["early stop"] == 1.0
    assert "did not trigger" in curve_marks(table, "val/acc", "max", stopped_after=None)[1]


def test_confusion_matrix_and_per_class_rows():
    cm = confusion_matrix(np.array([0, 1, 1, 2, 0]), np.array([0, 1, 0, 2, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    rows = per_class_rows(cm, ["a", "b", "c"])
    assert rows[0]["accuracy"] == 0.5 and rows[0]["confused_with"] == "b (1)"
    assert rows[1]["confused_with"] == ""


def test_plots_are_real_pngs(tmp_path):
    (tmp_path / "metrics.csv").write_text(CSV)
    t = read_epoch_metrics(tmp_path / "metrics.csv")
    plot_learning_curves(t, tmp_path / "c.png", {"best (val/acc)": 2.0, "overfitting": 2.0})
    plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ["x", "y"], tmp_path / "m.png")
    for name in ("c.png", "m.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 300
            assert len(set(im.convert("L").getdata())) > 20  # drawn, not blank
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_finetune_writes_the_report(image_folder, tmp_path, make_cfg):
    out = tmp_path / "run"
    cfg = make_cfg(*tiny_overrides(image_folder, out, "logger=csv", "trainer.max_epochs=3"))
    summary, _ = finetune(cfg)
    text = (out / "report.md").read_text()
    for section in ("## Plan", "## Data", "## Final metrics", "## Learning curves",
                    "## Test split: per-class results",
                    "## Configuration", "## Versions"):  # fmt: skip
        assert section in text
    assert summary["plan"]["reason"] in text
    assert "| ant | 6 | 3 | 3 |" in text and "| **total** | 18 | 9 | 9 |" in text
    assert "![learning curves](learning_curves.png)" in text and "Best checkpoint: epoch" in text
    assert "| bee | 3 |" in text  # per-class test accuracy row
    assert "| torch |" in text and "| timm |" in text and "| lightning |" in text
    assert "backbone: test_efficientnet" in text  # the resolved config
    for png in ("learning_curves.png", "confusion_matrix.png", "top_losses.png"):
        assert (out / png).stat().st_size > 5000
    assert "## Test split: the worst mistakes" in text and "![top losses](top_losses.png)" in text
    per_class = list(csv.DictReader((out / "per_class.csv").open()))
    assert [r["class"] for r in per_class] == ["ant", "bee", "cat"]
    assert all(int(r["images"]) == 3 for r in per_class)
    for r in per_class:  # recall is correct / images, and the Markdown table says the same
        assert float(r["recall"]) == pytest.approx(int(r["correct"]) / 3, abs=1e-4)
        assert f"| {r['class']} | 3 | {r['correct']} |" in text


def test_top_losses_are_the_highest_losses_with_their_files(image_folder, tmp_path, make_cfg):
    import csv

    import torch.nn.functional as F

    from transferkit.report import collect_logits

    out = tmp_path / "run"
    _, objects = finetune(make_cfg(*tiny_overrides(image_folder, out, "trainer.max_epochs=1")))
    dm, model = objects["datamodule"], objects["model"]
    logits, labels = collect_logits(model, dm.test_dataloader())
    losses = F.cross_entropy(logits, labels, reduction="none")
    rows = list(csv.DictReader((out / "top_losses.csv").open()))
    assert len(rows) == 9  # all 9 test images (fewer than 16)
    assert [float(r["loss"]) for r in rows] == sorted((float(r["loss"]) for r in rows),
                                                      reverse=True)  # fmt: skip
    test = dm.splits["test"]
    for r in rows:
        i = int(r["index"])
        assert r["path"] == str(test.paths[i]) and Path(r["path"]).is_file()
        assert r["true"] == dm.classes[int(labels[i])] == Path(r["path"]).parent.name
        assert float(r["loss"]) == pytest.approx(float(losses[i]), abs=1e-3)


def test_report_without_csv_logger_says_so(image_folder, tmp_path, make_cfg):
    out = tmp_path / "run"
    finetune(make_cfg(*tiny_overrides(image_folder, out, "trainer.max_epochs=1", "test=false")))
    text = (out / "report.md").read_text()
    assert "No `metrics.csv`" in text and "No test split" in text
    assert not (out / "learning_curves.png").exists()
