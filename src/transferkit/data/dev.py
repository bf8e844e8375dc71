"""``make data-dev``: development data sets beyond Animal-MNIST, built offline.

How deep to fine-tune depends on how far the data is from the pretraining images, not only
on how many there are. Animal-MNIST (silhouettes) is one point; these two are others, built
from files that ship in PyPI packages, so they need no network:

* **textures**: 32 px crops of scikit-image's bundled sample photographs, one class per
  photo (brick, grass, gravel, moon, coins, cell, the Hubble deep field, ...). Each photo is
  cut along its longer side into ten strips, dealt at random (per photo) six to train, two
  to val and two to test, so no pixel of a test crop was ever seen in training and val and
  test are drawn alike: neither sits in a fixed place of the photo. Crops are square,
  32–48 px (at most a strip wide), at random places inside one of their split's strips
  (crops of one split may overlap each other), resized to 32 px.

  Layout 1 (before 2026-11-29) cut three fixed bands, train | val | test: val lay next to
  train and test at the photo's edge, so val accuracy ran 5–10 points above test and
  ranked fine-tuning depths differently from it. A folder in that layout is rebuilt.
* **glyphs**: the 26 capital letters rendered from the TrueType fonts matplotlib ships
  (DejaVu, STIX, Computer Modern), one class per letter, with fonts split disjointly across
  train, val and test, so the test letters are in typefaces never trained on. Each image
  has a small random scale, shift and rotation.

Both are written as ``root/{train,val,test}/<class>/*.png`` folders (``data=image_folder``)
with a ``crops.csv`` that says where every image came from, at ``--per-class`` training
images per class (500), and 100 validation and 100 test images per class. Smaller sizes are
``data.limit_per_class=10`` or ``100`` of the same folder, as with Animal-MNIST::

    python -m transferkit.data.dev data/dev          # -> data/dev/textures, data/dev/glyphs
    make finetune ARGS="data=image_folder data.root=data/dev/textures data.limit_per_class=100"

Folders are written under a temporary name and renamed when complete; an existing data set
of the current layout (``dataset.json``) is left alone, an older one is replaced once the new
one is complete.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from transferkit.errors import ConfigError, MissingPackageError

SIZE = 32
SPLITS = (("train", 0.6), ("val", 0.2), ("test", 0.2))
#: textures: strips per photo, dealt to the splits in the proportions of SPLITS.
STRIPS = 10
#: the layout written to each data set's ``dataset.json``; a folder of an older one is rebuilt.
LAYOUT = {"textures": 2, "glyphs": 1}
#: scikit-image sample photos used as texture classes (file stem → class name).
PHOTOS = {
    "astronaut": "astronaut", "brick": "brick", "camera": "camera", "cell": "cell",
    "chelsea": "cat", "coffee": "coffee", "coins": "coins", "grass": "grass",
    "gravel": "gravel", "hubble_deep_field": "hubble", "ihc": "ihc", "moon": "moon",
    "page": "page", "retina": "retina", "rocket": "rocket", "text": "text",
}  # fmt: skip
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
#: matplotlib's text fonts (its symbol and display fonts lack the letters or duplicate them).
FONT_PREFIXES = ("DejaVuSans", "DejaVuSerif", "STIXGeneral", "cmr10", "cmb10", "cmss10",
                 "cmti10", "cmtt10")  # fmt: skip


def _strips(width: int, height: int, rng: np.random.Generator
            ) -> dict[str, list[tuple[int, int, int, int]]]:  # fmt: skip
    """Disjoint (left, top, right, bottom) strips of the splits: the longer side cut into
    ``STRIPS`` strips, dealt at random in the proportions of ``SPLITS``."""
    along = max(width, height)
    cuts = [round(i * along / STRIPS) for i in range(STRIPS + 1)]
    order = [int(i) for i in rng.permutation(STRIPS)]
    counts = [round(share * STRIPS) for _, share in SPLITS]
    assert sum(counts) == STRIPS and min(counts) >= 1, (SPLITS, STRIPS)
    out, start = {}, 0
    for (name, _), n in zip(SPLITS, counts, strict=True):
        out[name] = [
            (cuts[i], 0, cuts[i + 1], height) if width >= height
            else (0, cuts[i], width, cuts[i + 1])
            for i in sorted(order[start : start + n])
        ]  # fmt: skip
        start += n
    return out


def texture_crops(
    photo: Image.Image, counts: dict[str, int], rng: np.random.Generator
) -> dict[str, list[tuple[Image.Image, tuple[int, int, int, int]]]]:
    """``counts[split]`` crops of ``photo`` from that split's strips, with their boxes."""
    photo = photo.convert("RGB")
    out: dict[str, list[tuple[Image.Image, tuple[int, int, int, int]]]] = {}
    for name, strips in _strips(*photo.size, rng).items():
        side_max = min(48, *(min(x1 - x0, y1 - y0) for x0, y0, x1, y1 in strips))
        if side_max < 16:
            raise ConfigError(
                f"a {photo.size} photo is too small to cut {STRIPS} strips of at least 16 px from"
            )
        crops = []
        for _ in range(counts[name]):
            left, top, right, bottom = strips[int(rng.integers(len(strips)))]
            side = int(rng.integers(min(32, side_max), side_max + 1))
            x = int(rng.integers(left, right - side + 1))
            y = int(rng.integers(top, bottom - side + 1))
            box = (x, y, x + side, y + side)
            crops.append((photo.crop(box).resize((SIZE, SIZE), Image.Resampling.BICUBIC), box))
        out[name] = crops
    return out


def glyph(char: str, font_path: Path, rng: np.random.Generator) -> Image.Image | None:
    """``char`` in the font at a random scale, shift and rotation; ``None`` when the font
    has no such glyph (it draws nothing)."""
    font = ImageFont.truetype(str(font_path), int(rng.integers(18, 27)))
    canvas = Image.new("L", (2 * SIZE, 2 * SIZE), 255)
    draw = ImageDraw.Draw(canvas)
    draw.text((SIZE, SIZE), char, font=font, fill=0, anchor="mm")
    if canvas.getbbox() is None and np.asarray(canvas).min() == 255:
        return None
    canvas = canvas.rotate(float(rng.uniform(-10, 10)), Image.Resampling.BILINEAR, fillcolor=255)
    dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
    box = (SIZE // 2 + dx, SIZE // 2 + dy, SIZE // 2 + dx + SIZE, SIZE // 2 + dy + SIZE)
    return canvas.crop(box).convert("RGB")


def font_splits(fonts: Sequence[Path], seed: int) -> dict[str, list[Path]]:
    """Fonts shuffled by ``seed`` and dealt to the splits, at least one each (disjoint)."""
    if len(fonts) < 3:
        raise ConfigError(f"glyphs need at least 3 fonts (one per split), found {len(fonts)}")
    order = [fonts[i] for i in np.random.default_rng(seed).permutation(len(fonts))]
    n_val = n_test = max(1, round(0.2 * len(fonts)))
    return {"test": order[:n_test], "val": order[n_test : n_test + n_val],
            "train": order[n_test + n_val :]}  # fmt: skip


TEXTURES_HEADER = "split,class,file,source,left,top,right,bottom"
OURS = {"train", "val", "test", "crops.csv", "dataset.json"}


def layout_of(root: Path) -> int | None:
    """The layout a data set folder was built in (``dataset.json``); 1 for a textures folder
    from before it (only what this module writes: ``crops.csv`` with the textures columns
    and the split folders); ``None`` for anything else, which is never replaced."""
    marker = root / "dataset.json"
    if marker.exists():
        try:
            about = json.loads(marker.read_text())
            return int(about["layout"])
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(
                f"{marker} is not a data set description ({e}); delete {root} to rebuild it."
            ) from e
    crops = root / "crops.csv"
    if not crops.is_file() or {p.name for p in root.iterdir()} - OURS:
        return None
    with crops.open() as f:
        return 1 if f.readline().strip() == TEXTURES_HEADER else None


def is_current(root: Path) -> bool:
    """Whether ``root`` holds a data set of the current layout (or one this module would
    leave alone)."""
    if not (root / "train").is_dir():
        return False
    found = layout_of(root)
    return found is None or found >= LAYOUT.get(root.name, 1)


def _write(root: Path, build: Callable[[Path, Any], None], about: dict[str, Any]) -> Path:
    """Build into ``root.partial``, then rename: a data set is complete or absent. A folder of
    the current layout, or one this module did not write, is left alone; one it built in an
    older layout is replaced after the new one is complete (the old one is kept as
    ``root.old`` until the new one is in place)."""
    layout = LAYOUT[about["name"]]
    tmp = root.with_name(root.name + ".partial")
    old = root.with_name(root.name + ".old")
    if not root.exists() and old.exists() and layout_of(tmp) == layout:
        tmp.rename(root)  # a replacement stopped between its two renames: finish it
    found = layout_of(root) if root.exists() else None
    if root.exists() and (found is None or found >= layout):
        if old.exists() and layout_of(old) is not None:
            shutil.rmtree(old, ignore_errors=True)
        print(f"{root} exists: left as it is (delete it to rebuild)")
        return root
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with (tmp / "crops.csv").open("w", newline="") as f:
            build(tmp, csv.writer(f))
        (tmp / "dataset.json").write_text(json.dumps({**about, "layout": layout}, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not root.exists():
        tmp.rename(root)
        return root
    print(f"{root}: layout {found} is out of date, replaced by layout {layout}")
    shutil.rmtree(old, ignore_errors=True)
    root.rename(old)
    try:
        tmp.rename(root)
    except BaseException:
        old.rename(root)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        print(f"{old}: the replaced data set could not be deleted; delete it by hand")
    return root


def build_textures(root: Path, photos: dict[str, Path], per_class: int, eval_per_class: int,
                   seed: int = 0) -> Path:  # fmt: skip
    """The textures data set at ``root`` from ``photos`` (class name → image file)."""
    counts = {"train": per_class, "val": eval_per_class, "test": eval_per_class}

    def build(tmp: Path, rows: Any) -> None:
        rows.writerow(["split", "class", "file", "source", "left", "top", "right", "bottom"])
        for k, (name, path) in enumerate(sorted(photos.items())):
            rng = np.random.default_rng([seed, k])
            with Image.open(path) as photo:
                crops = texture_crops(photo, counts, rng)
            for split, items in crops.items():
                folder = tmp / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i, (image, box) in enumerate(items):
                    image.save(folder / f"{i:04d}.png")
                    rows.writerow([split, name, f"{split}/{name}/{i:04d}.png", path.name, *box])

    about = {"name": "textures", "per_class": per_class, "eval_per_class": eval_per_class,
             "seed": seed}  # fmt: skip
    return _write(root, build, about)


def build_glyphs(root: Path, fonts: Sequence[Path], per_class: int, eval_per_class: int,
                 seed: int = 0, letters: Sequence[str] = LETTERS) -> Path:  # fmt: skip
    """The glyphs data set at ``root``: ``letters`` rendered from ``fonts``, the fonts dealt
    disjointly to train, val and test."""
    counts = {"train": per_class, "val": eval_per_class, "test": eval_per_class}

    def build(tmp: Path, rows: Any) -> None:
        rows.writerow(["split", "class", "file", "source"])
        for split, split_fonts in font_splits(fonts, seed).items():
            for k, char in enumerate(letters):
                rng = np.random.default_rng([seed, k, len(split)])
                folder = tmp / split / char
                folder.mkdir(parents=True, exist_ok=True)
                i = 0
                for attempt in range(counts[split] * 4):
                    if i == counts[split]:
                        break
                    font = split_fonts[attempt % len(split_fonts)]
                    image = glyph(char, font, rng)
                    if image is None:
                        continue
                    image.save(folder / f"{i:04d}.png")
                    rows.writerow([split, char, f"{split}/{char}/{i:04d}.png", font.name])
                    i += 1

    about = {"name": "glyphs", "per_class": per_class, "eval_per_class": eval_per_class,
             "seed": seed}  # fmt: skip
    return _write(root, build, about)


def sample_photos() -> dict[str, Path]:
    """scikit-image's bundled sample photos, by class name."""
    try:
        import skimage
    except ModuleNotFoundError as e:
        raise MissingPackageError(
            "the textures data set is cut from scikit-image's sample photos: "
            "pip install 'transferkit[dev]' (or pip install scikit-image)."
        ) from e
    folder = Path(skimage.__file__).parent / "data"
    found = {stem: next(folder.glob(f"{stem}.*"), None) for stem in PHOTOS}
    return {PHOTOS[stem]: path for stem, path in found.items() if path is not None}


def matplotlib_fonts() -> list[Path]:
    """The text fonts matplotlib ships (a required dependency)."""
    import matplotlib

    folder = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    return sorted(
        p for p in folder.glob("*.ttf")
        if p.stem.startswith(FONT_PREFIXES) and "Display" not in p.stem
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="?", default=Path("data/dev"))
    parser.add_argument("--per-class", type=int, default=500, help="training images per class")
    parser.add_argument("--eval-per-class", type=int, default=100,
                        help="validation and test images per class")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, make in (
        ("textures", lambda r: build_textures(r, sample_photos(), args.per_class,
                                              args.eval_per_class, args.seed)),
        ("glyphs", lambda r: build_glyphs(r, matplotlib_fonts(), args.per_class,
                                          args.eval_per_class, args.seed)),
    ):  # fmt: skip
        root = make(args.root / name)
        classes = sorted(p.name for p in (root / "train").iterdir())
        count = {s: sum(1 for _ in (root / s).rglob("*.png")) for s, _ in SPLITS}
        print(f"{root}: {len(classes)} classes, " + ", ".join(f"{s} {n}" for s, n in count.items()))


if __name__ == "__main__":
    main()
