"""Read a folder of images: one sub-folder per class, or train/val/test sub-folders of those."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from transferkit.data.samples import Samples, to_rgb
from transferkit.errors import ConfigError, DataError, NotFoundError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
SPLIT_NAMES = ("train", "val", "test")


def _check_image(path: Path) -> str | None:
    """None when ``path`` decodes to an image that converts to RGB, else the reason."""
    try:
        with Image.open(path) as im:
            im.load()
            to_rgb(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(folder: Path, classes: list[str], on_bad_image: str) -> Samples:
    paths: list[Path] = []
    labels: list[int] = []
    bad: list[Path] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for f in sorted(class_dir.rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            reason = _check_image(f)
            if reason is not None:
                if on_bad_image == "fail":
                    raise DataError(
                        f"cannot read image {f} ({reason}). Remove or fix the file, or set "
                        "data.on_bad_image=skip to skip unreadable files."
                    )
                bad.append(f)
                continue
            paths.append(f)
            labels.append(label)
    return Samples(labels=np.asarray(labels, dtype=np.int64), paths=paths, bad=bad)


def scan_image_folder(
    root: str | Path, on_bad_image: str = "skip"
) -> tuple[list[str], dict[str, Samples]]:
    """Class names and the splits found under ``root``.

    ``root/<class>/*.jpg`` gives one ``train`` split (the caller splits it);
    ``root/{train,val,test}/<class>/*.jpg`` gives the splits that exist.

    Raises:
        FileNotFoundError: ``root`` is missing or holds no images.
        ValueError: fewer than two classes, or a bad image with ``on_bad_image=fail``.
    """
    if on_bad_image not in ("skip", "fail"):
        raise ConfigError(f"data.on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise NotFoundError(
            f"data.root={str(root)!r} is not a directory. Point data.root at a folder with one "
            "sub-folder of images per class (or train/val/test sub-folders of those)."
        )
    split_dirs = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise NotFoundError(
            f"data.root={str(root)!r} has {sorted(split_dirs)} but no 'train' sub-folder."
        )
    if split_dirs:
        classes = sorted({d.name for s in split_dirs.values() for d in _class_dirs(s)})
    else:
        classes = [d.name for d in _class_dirs(root)]
    if not classes:
        raise NotFoundError(
            f"data.root={str(root)!r} has no class sub-folders. Expected "
            f"{root}/<class name>/<image files>."
        )
    folders = split_dirs or {"train": root}
    splits = {s: _scan(d, classes, on_bad_image) for s, d in folders.items()}
    n_bad = sum(len(s.bad) for s in splits.values())
    if n_bad:
        log.warning(
            "skipped %d unreadable file(s) under %s (data.on_bad_image=skip), e.g. %s",
            n_bad,
            root,
            next(p for s in splits.values() for p in s.bad),
        )
    if len(splits["train"]) == 0:
        raise NotFoundError(f"data.root={str(root)!r} holds no readable images.")
    present = np.unique(splits["train"].labels)
    if len(present) < 2:
        raise DataError(
            f"data.root={str(root)!r} has images of {len(present)} class(es) "
            f"({[classes[i] for i in present]}); classification needs at least 2 "
            "sub-folders with images."
        )
    return classes, splits
