"""make data-dev: the textures and glyphs development sets keep their splits apart (regions
of a photo, fonts), draw val and test alike, and load as image folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit.data import ImageFolderDataModule
from transferkit.data.dev import (
    LAYOUT,
    STRIPS,
    build_glyphs,
    build_textures,
    font_splits,
    matplotlib_fonts,
)
from transferkit.errors import ConfigError
from transferkit.experiments.driver import _compose, fingerprint


def _rows(root: Path) -> list[dict[str, str]]:
    with (root / "crops.csv").open() as f:
        return list(csv.DictReader(f))


def _photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(path)
    return path


def test_texture_splits_come_from_disjoint_regions_of_each_photo(tmp_path) -> None:
    photos = {"wide": _photo(tmp_path / "wide.png", (300, 120), 0),
              "tall": _photo(tmp_path / "tall.png", (120, 260), 1)}  # fmt: skip
    root = build_textures(tmp_path / "textures", photos, per_class=12, eval_per_class=5)
    rows = _rows(root)
    assert {(r["split"], r["class"]) for r in rows} == {
        (s, c) for s in ("train", "val", "test") for c in photos
    }
    for cls in photos:
        boxes = {s: [tuple(int(r[k]) for k in ("left", "top", "right", "bottom"))
                     for r in rows if r["class"] == cls and r["split"] == s]
                 for s in ("train", "val", "test")}  # fmt: skip
        assert [len(boxes[s]) for s in ("train", "val", "test")] == [12, 5, 5]
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            for p in boxes[a]:
                for q in boxes[b]:  # no pixel shared between splits
                    assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1]
    with Image.open(root / rows[0]["file"]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    assert not (tmp_path / "textures.partial").exists()


def test_glyph_fonts_never_cross_splits(tmp_path) -> None:
    fonts = matplotlib_fonts()
    assert len(fonts) >= 10  # DejaVu, STIX and Computer Modern ship with matplotlib
    root = build_glyphs(tmp_path / "glyphs", fonts[:5], per_class=6, eval_per_class=3,
                        letters=["A", "B", "Q"])  # fmt: skip
    rows = _rows(root)
    used = {s: {r["source"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert used["train"] and used["val"] and used["test"]
    assert not (used["train"] & used["val"] or used["train"] & used["test"]
                or used["val"] & used["test"])  # fmt: skip
    dm = ImageFolderDataModule(root, image_size=32)
    dm.setup()
    assert dm.classes == ["A", "B", "Q"]
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [18, 9, 9]
    first = np.asarray(Image.open(root / "train" / "A" / "0000.png").convert("L"))
    assert first.min() < 100 < 200 < first.max()  # a dark letter on a light ground


def test_an_existing_set_is_left_alone(tmp_path) -> None:
    photos = {"p": _photo(tmp_path / "p.png", (200, 100), 0)}
    root = build_textures(tmp_path / "t", photos, per_class=3, eval_per_class=2)
    stamp = (root / "crops.csv").stat().st_mtime_ns
    build_textures(tmp_path / "t", photos, per_class=9, eval_per_class=9)
    assert (root / "crops.csv").stat().st_mtime_ns == stamp


def test_too_few_fonts_or_too_small_a_photo_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="at least 3 fonts"):
        font_splits(matplotlib_fonts()[:2], 0)
    photos = {"tiny": _photo(tmp_path / "tiny.png", (40, 20), 0)}
    with pytest.raises(ConfigError, match="too small"):
        build_textures(tmp_path / "t", photos, per_class=2, eval_per_class=1)
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.partial").exists()


def test_val_and_test_are_drawn_alike_not_from_fixed_bands(tmp_path) -> None:
    """Val must predict test: both are dealt strips at random per photo. The old layout put
    val next to train and test at the photo's far edge in every photo, so val ran 5-10
    points above test and ranked depths differently."""
    width = 400
    photos = {f"p{i}": _photo(tmp_path / f"p{i}.png", (width, 80), i) for i in range(12)}
    root = build_textures(tmp_path / "t", photos, per_class=30, eval_per_class=20)
    rows = _rows(root)
    strips: dict[str, set[int]] = {"val": set(), "test": set()}
    per_photo: dict[tuple[str, str], set[int]] = {}
    for r in rows:
        if r["split"] in strips:
            k = int(r["left"]) * STRIPS // width
            assert int(r["right"]) <= (k + 1) * width // STRIPS  # one crop, one strip
            strips[r["split"]].add(k)
            per_photo.setdefault((r["split"], r["class"]), set()).add(k)
    # over the photos, val and test each land all over the photo, not in one band
    assert len(strips["val"]) >= 6 and len(strips["test"]) >= 6
    assert strips["test"] != {8, 9} and strips["val"] != {6, 7}
    # each photo gives val and test two strips each (0.2 of 10)
    assert all(1 <= len(v) <= 2 for v in per_photo.values())
    assert sum(len(v) == 2 for v in per_photo.values()) >= len(per_photo) // 2
    assert json.loads((root / "dataset.json").read_text())["layout"] == LAYOUT["textures"]


def test_a_folder_of_the_old_layout_is_rebuilt_and_runs_on_it_are_not_reused(tmp_path) -> None:
    photos = {"p": _photo(tmp_path / "p.png", (200, 100), 0)}
    root = build_textures(tmp_path / "t", photos, per_class=3, eval_per_class=2)
    cfg = _compose(["data=image_folder", f"data.root={root}"])
    new_print = fingerprint(cfg)
    (root / "dataset.json").unlink()  # what a layout-1 folder looks like: crops.csv only
    assert fingerprint(cfg) != new_print  # a run on the old folder is not taken for this one
    build_textures(tmp_path / "t", photos, per_class=3, eval_per_class=2)
    assert json.loads((root / "dataset.json").read_text())["layout"] == LAYOUT["textures"]
    assert fingerprint(cfg) == new_print
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "t"]  # no .old, no .partial


def test_a_folder_this_module_did_not_write_is_never_replaced(tmp_path) -> None:
    photos = {"p": _photo(tmp_path / "p.png", (200, 100), 0)}
    mine = tmp_path / "t"
    (mine / "train").mkdir(parents=True)
    (mine / "crops.csv").write_text("my,own,columns\n")
    (mine / "notes.txt").write_text("keep me")
    build_textures(mine, photos, per_class=3, eval_per_class=2)
    assert (mine / "notes.txt").read_text() == "keep me" and not (mine / "dataset.json").exists()
    (mine / "dataset.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a data set description"):
        build_textures(mine, photos, per_class=3, eval_per_class=2)
    assert (mine / "notes.txt").exists()
