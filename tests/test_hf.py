"""data=hf: Hugging Face data sets from save_to_disk folders, parquet files and image folders."""

from __future__ import annotations

import builtins
import io

import numpy as np
import pytest
from PIL import Image

from transferkit.errors import ConfigError, MissingPackageError
from transferkit.finetune import finetune

from .conftest import tiny_overrides, write_images

datasets = pytest.importorskip("datasets")
CLASSES = ["ant", "bee", "cat"]


def _png(c: int, i: int) -> bytes:
    rng = np.random.default_rng(i)
    img = np.zeros((24, 24, 3), np.uint8)
    img[:, : 6 * (c + 1)] = 200
    img = (img + rng.normal(0, 20, img.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _dataset(per_class: int, label_feature=True, bad: int = 0):
    rows = {"img": [], "animal": []}
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            rows["img"].append({"bytes": _png(c, i), "path": None})
            rows["animal"].append(c if label_feature else name)
    for _ in range(bad):
        rows["img"].append({"bytes": b"not a png", "path": None})
        rows["animal"].append(0 if label_feature else "ant")
    label = datasets.ClassLabel(names=CLASSES) if label_feature else datasets.Value("string")
    features = datasets.Features({"img": datasets.Image(), "animal": label})
    return datasets.Dataset.from_dict(rows, features=features)


def _run(make_cfg, out, *extra):
    kept = [o for o in tiny_overrides(out, out / "run") if not o.startswith("data")]
    return finetune(make_cfg("data=hf", "data.image_size=32", "data.batch_size=8",
                             "data.image_column=img", "data.label_column=animal", *kept,
                             *extra))  # fmt: skip


def test_a_save_to_disk_folder_with_its_own_splits(tmp_path, make_cfg, caplog):
    splits = datasets.DatasetDict({"train": _dataset(8, bad=2), "validation": _dataset(2),
                                   "test": _dataset(3)})  # fmt: skip
    splits.save_to_disk(str(tmp_path / "ds"))
    summary, objects = _run(make_cfg, tmp_path, f"data.path={tmp_path / 'ds'}")
    assert objects["datamodule"].classes == CLASSES
    assert (summary["train_size"], summary["val_size"], summary["test_size"]) == (24, 6, 9)
    assert "2 unreadable" in caplog.text  # the bad records were skipped and counted
    assert summary["test_acc"] is not None and (tmp_path / "run" / "top_losses.png").exists()


def test_parquet_files_with_string_labels_are_split_by_fraction(tmp_path, make_cfg):
    _dataset(10, label_feature=False).to_parquet(str(tmp_path / "train.parquet"))
    summary, objects = _run(make_cfg, tmp_path, "data.path=parquet",
                            f"data.data_files={tmp_path / 'train.parquet'}")  # fmt: skip
    assert objects["datamodule"].classes == CLASSES
    assert (summary["train_size"], summary["val_size"], summary["test_size"]) == (24, 3, 3)


def test_an_imagefolder(tmp_path, make_cfg):
    write_images(tmp_path / "pics", CLASSES, per_class=8)
    summary, objects = _run(make_cfg, tmp_path, "data.path=imagefolder",
                            f"data.data_dir={tmp_path / 'pics'}", "data.image_column=image",
                            "data.label_column=label")  # fmt: skip
    assert objects["datamodule"].classes == CLASSES and summary["train_size"] == 18


def test_columns_that_do_not_exist_are_named(tmp_path):
    from transferkit.data import HFDataModule

    _dataset(4).save_to_disk(str(tmp_path / "ds"))
    dm = HFDataModule(str(tmp_path / "ds"), image_column="photo", label_column="animal")
    with pytest.raises(ConfigError, match=r"data.image_column='photo'.*\['img', 'animal'\]"):
        dm.setup()


def test_without_the_package_the_error_names_the_extra(tmp_path, monkeypatch):
    from transferkit.data import HFDataModule

    real = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ModuleNotFoundError("No module named 'datasets'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(MissingPackageError, match=r"transferkit\[hf\].*data=csv"):
        HFDataModule(str(tmp_path)).setup()


def test_a_data_files_mapping_gives_the_splits(tmp_path, make_cfg):
    _dataset(8, label_feature=False).to_parquet(str(tmp_path / "train.parquet"))
    _dataset(3, label_feature=False).to_parquet(str(tmp_path / "test.parquet"))
    files = f"{{train:'{tmp_path / 'train.parquet'}',test:'{tmp_path / 'test.parquet'}'}}"
    summary, _ = _run(make_cfg, tmp_path, "data.path=parquet", f"data.data_files={files}")
    assert (summary["train_size"], summary["val_size"], summary["test_size"]) == (21, 3, 9)


def test_unlabelled_splits_are_left_out_and_unlabelled_training_images_refused(tmp_path, caplog):
    from transferkit.data import HFDataModule
    from transferkit.errors import DataError

    unlabelled = _dataset(3).map(lambda row: {"animal": -1})  # as Hub test splits often are
    datasets.DatasetDict({"train": _dataset(10), "test": unlabelled}).save_to_disk(
        str(tmp_path / "ds"))  # fmt: skip
    dm = HFDataModule(str(tmp_path / "ds"), image_column="img", label_column="animal",
                      val_fraction=0.1, test_fraction=0.1)  # fmt: skip
    dm.setup()
    assert "test split is unlabelled (-1): left out" in caplog.text
    assert (len(dm.splits["train"]), len(dm.splits["test"])) == (24, 3)  # test from train
    assert set(dm.splits["test"].labels.tolist()) == {0, 1, 2}
    half = datasets.concatenate_datasets([_dataset(10), unlabelled.select([0])])
    datasets.DatasetDict({"train": half}).save_to_disk(str(tmp_path / "ds2"))
    with pytest.raises(DataError, match=r"1 label\(s\) of its train split are -1"):
        HFDataModule(str(tmp_path / "ds2"), image_column="img", label_column="animal").setup()


def test_evaluate_every_split_of_a_hugging_face_data_set(tmp_path, make_cfg):
    from hydra import compose, initialize_config_dir

    from transferkit.evaluate import evaluate

    from .conftest import CONF_DIR

    splits = datasets.DatasetDict({"train": _dataset(8), "validation": _dataset(2),
                                   "test": _dataset(3)})  # fmt: skip
    splits.save_to_disk(str(tmp_path / "ds"))
    _run(make_cfg, tmp_path, f"data.path={tmp_path / 'ds'}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            f"ckpt={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}", "data=hf",
            f"data.path={tmp_path / 'ds'}", "data.image_column=img",
            "data.label_column=animal", "split=all",
            f"paths.output_dir={tmp_path / 'e'}"])  # fmt: skip
    result = evaluate(cfg)
    assert result["images"] == 39 and sum(map(sum, result["confusion_matrix"])) == 39
