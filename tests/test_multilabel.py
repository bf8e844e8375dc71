"""task=multilabel: sets of classes from a CSV list column or a Hugging Face sequence, BCE or
ASL, mAP, thresholds tuned on validation and saved, used by evaluate, predict and export."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from transferkit.cli import run_cli
from transferkit.data.tiled import write_tiled
from transferkit.evaluate import evaluate
from transferkit.export import export
from transferkit.finetune import finetune
from transferkit.models.multilabel import multilabel_loss, tune_thresholds
from transferkit.predict import predict

from .conftest import CONF_DIR


def _cfg(name, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _overrides(manifest, out, *extra):
    return ["data=csv", f"data.manifest={manifest}", "data.split_column=split",
            "data.label_separator=' '", "data.image_size=32", "data.batch_size=16",
            "model.backbone=test_efficientnet", "model.weights=none", "trainer.max_epochs=3",
            "trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_progress_bar=false",
            "~callbacks.progress_bar", "logger=none", f"paths.output_dir={out}",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiled")
    manifest = write_tiled(base / "data", {"train": 160, "val": 60, "test": 60})
    summary, objects = finetune(_cfg("finetune", *_overrides(manifest, base / "run")))
    return base, manifest, summary, objects


def test_a_multilabel_run_tunes_and_saves_thresholds(tiled):
    base, _, summary, objects = tiled
    assert summary["task"] == "multilabel" and summary["objective"]["name"] == "val/map"
    assert 0 <= summary["test_map"] <= 1 and 0 <= summary["test_f1_macro"] <= 1
    assert objects["datamodule"].splits["train"].labels.shape == (160, 10)
    ckpt = torch.load(base / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    thresholds = ckpt["state_dict"]["thresholds"]
    assert thresholds.shape == (10,) and not torch.all(thresholds == 0.5)  # tuned
    assert torch.equal(objects["model"].thresholds, thresholds)
    report = (base / "run" / "report.md").read_text()
    assert "Mean average precision (mAP, over the classes present)" in report
    assert "| threshold |" in report
    assert (base / "run" / "top_losses.png").stat().st_size > 5000


def test_evaluate_predict_and_export_use_the_thresholds(tiled, tmp_path):
    base, manifest, summary, objects = tiled
    ckpt = base / "run" / "checkpoints" / "best.ckpt"
    result = evaluate(_cfg("evaluate", f"ckpt={ckpt}", "data=csv", f"data.manifest={manifest}",
                           "data.split_column=split", "data.label_separator=' '", "split=test",
                           f"paths.output_dir={tmp_path}/e"))  # fmt: skip
    assert result["test/map"] == pytest.approx(summary["test_map"], abs=1e-4)
    assert result["thresholds"] == pytest.approx(objects["model"].thresholds.tolist())
    out = predict(_cfg("predict", f"ckpt={ckpt}", f"input={manifest.parent}/images/test",
                       f"output={tmp_path}/p.csv", f"paths.output_dir={tmp_path}"))  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 60 and list(rows[0]) == ["path", "labels", "probabilities"]
    cut = dict(zip(objects["datamodule"].classes, objects["model"].thresholds.tolist(),
                   strict=True))  # fmt: skip
    for r in rows:
        for name, p in zip(r["labels"].split(), r["probabilities"].split(), strict=True):
            assert float(p) >= cut[name] - 1e-6
    exported = export(_cfg("export", f"ckpt={ckpt}", f"paths.output_dir={tmp_path}/x"))
    assert Path(exported["path"]).exists()
    assert exported["max_abs_diff"] <= exported["tolerance"]


def test_evaluate_refuses_data_labelled_another_way(tiled, tmp_path):
    from transferkit.data.animal_mnist import CLASSES
    from transferkit.errors import CheckpointError

    from .conftest import write_images

    write_images(tmp_path / "folder", CLASSES[:2], per_class=4)  # one class per image
    ckpt = tiled[0] / "run" / "checkpoints" / "best.ckpt"
    with pytest.raises(CheckpointError, match="gives one class per image but the checkpoint"):
        evaluate(_cfg("evaluate", f"ckpt={ckpt}", "data=image_folder",
                      f"data.root={tmp_path / 'folder'}", "split=all",
                      f"paths.output_dir={tmp_path}/e"))  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["augment=mixup"], "neither mixup nor label smoothing"),
        (["regularization.label_smoothing=0.1"], "neither mixup nor label smoothing"),
        (["data.limit_per_class=5"], "one class per image"),
        (["data.balance=sampler"], "data.balance=none"),
        (["task=multiclass"], "set task=multilabel"),
        (["monitor=val/acc"], "monitor='val/acc' is not logged for this task"),
    ],
)
def test_what_multilabel_refuses(extra, says, tiled, tmp_path, capsys):
    _, manifest, _, _ = tiled
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: finetune(_cfg("finetune", *_overrides(manifest, tmp_path / "r", *extra))))
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_asl_trains_and_caching_works(tiled, tmp_path):
    _, manifest, _, _ = tiled
    summary, _ = finetune(_cfg("finetune", *_overrides(
        manifest, tmp_path / "r", "model.multilabel_loss=asl", "finetune=partial",
        "finetune.trainable_blocks=2", "augment=none", "trainer.max_epochs=1",
    )))  # fmt: skip
    assert summary["feature_cache"].startswith("on") and summary["test_map"] is not None


def test_thresholds_maximise_f1_per_class():
    probs = torch.tensor([[0.9, 0.2], [0.8, 0.6], [0.4, 0.7], [0.1, 0.1]])
    targets = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]])
    t = tune_thresholds(probs, targets)
    assert 0.4 < t[0] <= 0.8 and 0.2 < t[1] <= 0.6  # both classes separated perfectly
    assert tune_thresholds(probs, torch.zeros_like(targets)).tolist() == [0.5, 0.5]


def test_the_losses():
    logits, y = torch.tensor([[2.0, -1.0]]), torch.tensor([[1, 0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.float(), reduction="sum")
    assert multilabel_loss(logits, y) == pytest.approx(float(bce))
    easy_negative = torch.tensor([[3.0, -4.0]])  # p(neg) < the 0.05 margin: ASL gives 0 there
    assert multilabel_loss(easy_negative, y, "asl") < multilabel_loss(easy_negative, y, "bce")


def test_hf_sequence_labels_are_multilabel(tmp_path):
    datasets = pytest.importorskip("datasets")
    from transferkit.data import HFDataModule

    from .test_hf import _png

    rows = {"img": [], "tags": []}
    for i in range(30):
        rows["img"].append({"bytes": _png(i % 3, i), "path": None})
        rows["tags"].append([["ant"], ["bee", "cat"], ["ant", "cat"]][i % 3])
    features = datasets.Features({"img": datasets.Image(),
                                  "tags": datasets.Sequence(datasets.Value("string"))})  # fmt: skip
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    dm = HFDataModule(str(tmp_path / "ds"), image_column="img", label_column="tags")
    dm.setup()
    assert dm.multilabel and dm.classes == ["ant", "bee", "cat"]
    assert dm.per_class().tolist() == [int(x) for x in dm.splits["train"].labels.sum(0)]
