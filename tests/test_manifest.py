"""data=csv: a CSV/TSV manifest of paths and labels, with or without a split column."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from transferkit.data.manifest import read_manifest
from transferkit.errors import ConfigError, DataError
from transferkit.finetune import finetune

from .conftest import tiny_overrides, write_images

CLASSES = ["ant", "bee", "cat"]


def _manifest(tmp_path: Path, name="labels.csv", delimiter=",", split=None, kaggle=False) -> Path:
    """Images under tmp_path/images/<class>/; a manifest beside them with relative paths."""
    write_images(tmp_path / "images", CLASSES, per_class=10)
    path = tmp_path / name
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(["id" if kaggle else "path", "label", *(["split"] if split else [])])
        for c in CLASSES:
            for i in range(10):
                rel = f"{c}/{i:03d}" if kaggle else f"images/{c}/{i:03d}.png"
                extra = [split[i]] if split else []
                w.writerow([rel, c, *extra])
    return path


def _run(make_cfg, manifest, out, *extra):
    overrides = [o for o in tiny_overrides(manifest.parent, out) if not o.startswith("data")]
    return finetune(make_cfg("data=csv", f"data.manifest={manifest}", "data.image_size=32",
                             "data.batch_size=8", *overrides, *extra))  # fmt: skip


def test_csv_manifest_trains_end_to_end(tmp_path, make_cfg):
    summary, objects = _run(make_cfg, _manifest(tmp_path), tmp_path / "run")
    assert objects["datamodule"].classes == CLASSES
    assert (summary["train_size"], summary["val_size"], summary["test_size"]) == (24, 3, 3)
    assert summary["test_acc"] is not None
    assert (tmp_path / "run" / "top_losses.csv").read_text().count("images/") >= 3


def test_tsv_with_a_split_column(tmp_path, make_cfg):
    split = ["train"] * 6 + ["validation", "Val", "test", "TEST"]
    path = _manifest(tmp_path, "labels.tsv", "\t", split)
    summary, _ = _run(make_cfg, path, tmp_path / "run", "data.split_column=split")
    assert (summary["train_size"], summary["val_size"], summary["test_size"]) == (18, 6, 6)


def test_kaggle_ids_with_a_path_template(tmp_path):
    path = _manifest(tmp_path, kaggle=True)
    classes, splits = read_manifest(path, path_template="images/{id}.png")
    assert classes == CLASSES and len(splits["train"]) == 30
    assert splits["train"].paths[0] == tmp_path / "images" / "ant" / "000.png"


def test_missing_files_are_skipped_and_counted_or_fatal(tmp_path, caplog):
    path = _manifest(tmp_path)
    with path.open("a") as f:
        f.write("images/ant/nope.png,ant\n")
    _, splits = read_manifest(path)
    assert len(splits["train"]) == 30 and "1 missing" in caplog.text
    with pytest.raises(DataError, match=r"nope\.png .*missing.*data.on_bad_image=skip"):
        read_manifest(path, on_bad_image="fail")


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        ({"label_column": "class"}, ConfigError, "data.label_column='class' is not a column"),
        ({"split_column": "fold"}, ConfigError, "['path', 'label']"),
        ({"path_template": "{name}.jpg"}, ConfigError, "data.path_template='{name}.jpg'"),
    ],
)
def test_settings_that_do_not_fit_the_manifest(kwargs, error, says, tmp_path):
    with pytest.raises(error) as e:
        read_manifest(_manifest(tmp_path), **kwargs)
    assert says in str(e.value)


def test_bad_split_values_and_differing_classes(tmp_path):
    path = _manifest(tmp_path, split=["train"] * 8 + ["dev", "test"])
    with pytest.raises(DataError, match=r"line 10: split='dev'"):
        read_manifest(path, split_column="split")
    rows = path.read_text().replace("images/cat/009.png,cat,test", "images/cat/009.png,Cat,test")
    path.write_text(rows.replace(",dev", ",train"))
    with pytest.raises(DataError, match=r"test rows has 'Cat' \(train rows has 'cat'\)"):
        read_manifest(path, split_column="split")


def test_short_rows_and_empty_classes_name_their_line(tmp_path):
    path = _manifest(tmp_path)
    good = path.read_text()
    path.write_text(good + "images/ant/000.png\n")  # line 32: no label field at all
    with pytest.raises(DataError, match=r"line\(s\) \[32\] have fewer fields than the header"):
        read_manifest(path)
    path.write_text(good + "images/ant/000.png,\n")  # an empty class is not a class named ""
    with pytest.raises(DataError, match=r"line 32: the 'label' column is empty"):
        read_manifest(path)
    # multi-label: an empty cell is an image with none of the classes, which is allowed
    classes, splits = read_manifest(path, label_separator=" ")
    assert classes == CLASSES and splits["train"].labels[-1].tolist() == [0, 0, 0]
