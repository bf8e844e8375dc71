"""Read a folder of images: one sub-folder per class, or train/val/test sub-folders of those.

Only files with an image extension are opened (a ``README.txt`` or ``labels.csv`` beside the
images is skipped and counted, never an error). Files that do not decode, and decompression
bombs, are skipped and counted (``on_bad_image=skip``) or stop the run (``fail``).
"""

from __future__ import annotations

from pathlib import Path

from transferkit.data.files import (
    IMAGE_EXTENSIONS,
    Skipped,
    check_on_bad_image,
    check_split_classes,
    check_splits,
    is_image_file,
    read_files,
)
from transferkit.data.samples import Samples
from transferkit.errors import NotFoundError

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "scan_image_folder"]

SPLIT_NAMES = ("train", "val", "test")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _entries(folder: Path, classes: list[str], skipped: Skipped) -> list[tuple[Path, int]]:
    """Image files under ``folder/<class>/`` with their labels; other files are counted."""
    entries = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for f in sorted(class_dir.rglob("*")):
            if is_image_file(f):
                entries.append((f, label))
            elif f.is_file() and not f.name.startswith("."):
                skipped["other"].append(f)
    return entries


def scan_image_folder(
    root: str | Path, on_bad_image: str = "skip"
) -> tuple[list[str], dict[str, Samples]]:
    """Class names and the splits found under ``root``.

    ``root/<class>/*.jpg`` gives one ``train`` split (the caller splits it);
    ``root/{train,val,test}/<class>/*.jpg`` gives the splits that exist.

    Raises:
        NotFoundError: ``root`` is missing or holds no images.
        DataError: fewer than two classes, a class without training images, split folders
            whose classes differ, an empty val/ or test/, or a bad image with
            ``on_bad_image=fail``.
    """
    check_on_bad_image(on_bad_image)
    root = Path(root).expanduser()
    source = f"data.root={str(root)!r}"
    if not root.is_dir():
        raise NotFoundError(
            f"{source} is not a directory. Point data.root at a folder with one "
            "sub-folder of images per class (or train/val/test sub-folders of those)."
        )
    split_dirs = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise NotFoundError(f"{source} has {sorted(split_dirs)} but no 'train' sub-folder.")
    if split_dirs:
        found = {s: {d.name for d in _class_dirs(d)} for s, d in split_dirs.items()}
        classes = check_split_classes(source, found, "/")
    else:
        classes = [d.name for d in _class_dirs(root)]
    if not classes:
        raise NotFoundError(
            f"{source} has no class sub-folders. Expected {root}/<class name>/<image files>."
        )
    skipped = Skipped()
    splits = {
        s: read_files(_entries(d, classes, skipped), on_bad_image, skipped)
        for s, d in (split_dirs or {"train": root}).items()
    }
    skipped.log(root)
    check_splits(source, classes, splits, lambda s: (
        f"{root / s} holds no readable images. Add images to it, or remove the folder and "
        f"data.{s}_fraction takes the {s} split from train/."
    ))  # fmt: skip
    return classes, splits
