"""Read a folder of images: one sub-folder per class, or train/val/test sub-folders of those.

Only files with an image extension are opened (a ``README.txt`` or ``labels.csv`` beside the
images is skipped and counted, never an error). Files that do not decode, and decompression
bombs, are skipped and counted (``on_bad_image=skip``) or stop the run (``fail``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from transferkit import preemption
from transferkit.data.samples import BadImageError, Samples, read_rgb
from transferkit.errors import ConfigError, DataError, NotFoundError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
SPLIT_NAMES = ("train", "val", "test")
#: How each kind of skipped file is named in the log.
SKIPPED = {"other": "not image files", "unreadable": "unreadable", "bomb": "decompression bombs"}


def is_image_file(path: Path) -> bool:
    """A visible file whose extension (any case) is an image format's."""
    return (
        path.is_file()
        and not path.name.startswith(".")
        and (path.suffix.lower() in IMAGE_EXTENSIONS)
    )


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(
    folder: Path, classes: list[str], on_bad_image: str, skipped: dict[str, list[Path]]
) -> Samples:
    paths: list[Path] = []
    labels: list[int] = []
    bad: list[Path] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for f in sorted(class_dir.rglob("*")):
            preemption.check()  # a scan of a large folder stops promptly on SIGTERM
            if not is_image_file(f):
                if f.is_file() and not f.name.startswith("."):
                    skipped["other"].append(f)
                continue
            try:
                read_rgb(f)
            except BadImageError as e:
                if on_bad_image == "fail":
                    raise DataError(
                        f"{e}. Remove or fix the file, or set data.on_bad_image=skip to skip "
                        "unreadable files."
                    ) from e
                skipped[e.kind].append(f)
                bad.append(f)
                continue
            paths.append(f)
            labels.append(label)
    return Samples(labels=np.asarray(labels, dtype=np.int64), paths=paths, bad=bad)


def _check_split_classes(root: Path, split_dirs: dict[str, Path]) -> list[str]:
    """The class names of explicit split folders: those of ``train/``.

    Raises:
        DataError: a class folder in ``val/`` or ``test/`` that ``train/`` lacks (it would
            become an output with no training image), naming near-matches like Cat/cat.
    """
    found = {s: {d.name for d in _class_dirs(d)} for s, d in split_dirs.items()}
    train = found["train"]
    extra = {s: sorted(names - train) for s, names in found.items() if names - train}
    if extra:
        lowered = {c.strip().lower(): c for c in train}
        where = "; ".join(
            f"{s}/ has {', '.join(_with_hint(c, lowered) for c in names)}"
            for s, names in extra.items()
        )
        raise DataError(
            f"data.root={str(root)!r}: class folders differ between the splits: {where}, "
            f"which train/ does not have (train/ has {sorted(train)}). Rename them to match "
            "train/ (names are case-sensitive), or remove them."
        )
    for s, names in found.items():
        missing = sorted(train - names)
        if missing and s != "train":
            log.warning("%s/ has no folder for class(es) %s: no %s images of them", s, missing, s)
    return sorted(train)


def _with_hint(name: str, lowered: dict[str, str]) -> str:
    near = lowered.get(name.strip().lower())
    return f"{name!r} (train/ has {near!r})" if near else repr(name)


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
    classes = _check_split_classes(root, split_dirs) if split_dirs else [
        d.name for d in _class_dirs(root)
    ]  # fmt: skip
    if not classes:
        raise NotFoundError(
            f"data.root={str(root)!r} has no class sub-folders. Expected "
            f"{root}/<class name>/<image files>."
        )
    folders = split_dirs or {"train": root}
    skipped: dict[str, list[Path]] = defaultdict(list)
    splits = {s: _scan(d, classes, on_bad_image, skipped) for s, d in folders.items()}
    if skipped:
        log.warning(
            "skipped %d file(s) under %s: %s",
            sum(len(v) for v in skipped.values()),
            root,
            "; ".join(f"{len(v)} {SKIPPED[k]} (e.g. {v[0]})" for k, v in skipped.items()),
        )
    if len(splits["train"]) == 0:
        raise NotFoundError(f"data.root={str(root)!r} holds no readable images.")
    for s in ("val", "test"):
        if s in splits and not len(splits[s]):
            raise DataError(
                f"{root / s} holds no readable images. Add images to it, or remove the folder "
                f"and data.{s}_fraction takes the {s} split from train/."
            )
    per_class = np.bincount(splits["train"].labels, minlength=len(classes))
    if np.count_nonzero(per_class) < 2:
        present = [classes[i] for i in np.flatnonzero(per_class)]
        raise DataError(
            f"data.root={str(root)!r} has images of {len(present)} class(es) ({present}); "
            "classification needs at least 2 sub-folders with images."
        )
    empty = [classes[i] for i in np.flatnonzero(per_class == 0)]
    if empty:
        raise DataError(
            f"class folder(s) {empty} under data.root={str(root)!r} have no readable training "
            "images: the model would have outputs it never learns. Add images, or remove them."
        )
    return classes, splits
