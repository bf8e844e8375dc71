"""Image files from any listing (a folder, a CSV manifest): each decoded once to check it,
bad ones skipped and counted or fatal, and the checks every labelled set of splits must pass."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferkit import preemption
from transferkit.data.samples import BadImageError, Samples, per_class_counts, read_rgb
from transferkit.errors import ConfigError, DataError, NotFoundError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
#: How each kind of skipped file is named in the log.
SKIPPED = {
    "other": "not image files",
    "missing": "missing",
    "unreadable": "unreadable",
    "bomb": "decompression bombs",
}


def is_image_file(path: Path) -> bool:
    """A visible file whose extension (any case) is an image format's."""
    return (
        path.is_file()
        and not path.name.startswith(".")
        and (path.suffix.lower() in IMAGE_EXTENSIONS)
    )


def check_on_bad_image(value: str) -> None:
    if value not in ("skip", "fail"):
        raise ConfigError(f"data.on_bad_image must be 'skip' or 'fail', got {value!r}.")


class Skipped(defaultdict[str, list[Path | str]]):
    """Files left out, by kind (``SKIPPED``)."""

    def __init__(self) -> None:
        super().__init__(list)

    def log(self, where: object) -> None:
        if self:
            log.warning(
                "skipped %d file(s) under %s: %s",
                sum(len(v) for v in self.values()),
                where,
                "; ".join(f"{len(v)} {SKIPPED[k]} (e.g. {v[0]})" for k, v in self.items()),
            )


def readable(
    keys: Sequence[Any],
    check: Callable[[Any], None],
    on_bad_image: str,
    skipped: Skipped,
) -> list[int]:
    """Indices of the ``keys`` (files, records) that ``check`` decodes; the others are
    counted in ``skipped`` (``on_bad_image=skip``) or stop with their name (``fail``)."""
    kept = []
    for i, key in enumerate(keys):
        preemption.check()  # a scan of many images stops promptly on SIGTERM
        try:
            check(key)
        except BadImageError as e:
            if on_bad_image == "fail":
                raise DataError(
                    f"{e}. Remove or fix it, or set data.on_bad_image=skip to skip unreadable "
                    "images."
                ) from e
            skipped[e.kind].append(e.path)
            continue
        kept.append(i)
    return kept


def _check_file(f: Path) -> None:
    if not f.is_file():
        raise BadImageError(f, "missing", "no such file")
    read_rgb(f)


def read_files(entries: Iterable[tuple[Path, Any]], on_bad_image: str, skipped: Skipped) -> Samples:
    """The entries whose file decodes to an image (a missing file counts as a bad one).
    Labels are class indices, or (multi-label) 0/1 rows."""
    entries = list(entries)
    files = [f for f, _ in entries]
    kept = readable(files, _check_file, on_bad_image, skipped)
    keep = set(kept)
    return Samples(
        labels=np.asarray([entries[i][1] for i in kept], dtype=np.int64),
        paths=[files[i] for i in kept],
        bad=[f for i, f in enumerate(files) if i not in keep],
    )


def check_splits(
    source: str,
    classes: Sequence[str],
    splits: dict[str, Samples],
    empty_split: Callable[[str], str],
) -> None:
    """What every labelled data set must have before training.

    Args:
        source: the setting that names the data (``data.root='...'``), for the messages.
        classes: class names, in label order.
        splits: ``train`` and any of ``val``/``test`` the source gives.
        empty_split: the message for a given split (``val``, ``test``) without a readable
            image, naming the fix.

    Raises:
        NotFoundError: no readable training image.
        DataError: an empty given split, fewer than two classes with training images, or a
            class without training images (an output the model would never learn).
    """
    if len(splits["train"]) == 0:
        raise NotFoundError(f"{source} holds no readable images.")
    for s in ("val", "test"):
        if s in splits and not len(splits[s]):
            raise DataError(empty_split(s))
    per_class = per_class_counts(splits["train"].labels, len(classes))
    if np.count_nonzero(per_class) < 2:
        present = [classes[int(i)] for i in np.flatnonzero(per_class)]
        raise DataError(
            f"{source} has images of {len(present)} class(es) ({present}); classification "
            "needs at least 2 classes with images."
        )
    empty = [classes[int(i)] for i in np.flatnonzero(per_class == 0)]
    if empty:
        raise DataError(
            f"class(es) {empty} of {source} have no readable training images: the model would "
            "have outputs it never learns. Add images, or remove them."
        )


def check_split_classes(source: str, found: dict[str, set[str]], unit: str) -> list[str]:
    """The class names of given splits, those of ``train``.

    Raises:
        DataError: a class only in ``val`` or ``test`` (it would become an output with no
            training image), naming near-matches like Cat/cat.
    """
    train = found["train"]
    extra = {s: sorted(names - train) for s, names in found.items() if names - train}
    if extra:
        lowered = {c.strip().lower(): c for c in train}
        where = "; ".join(
            f"{s}{unit} has {', '.join(_with_hint(c, lowered, unit) for c in names)}"
            for s, names in extra.items()
        )
        raise DataError(
            f"{source}: the classes differ between the splits: {where}, which train{unit} does "
            f"not have (train{unit} has {sorted(train)}). Rename them to match train{unit} "
            "(names are case-sensitive), or remove them."
        )
    for s, names in found.items():
        missing = sorted(train - names)
        if missing and s != "train":
            log.warning("%s%s has no class %s: no %s images of them", s, unit, missing, s)
    return sorted(train)


def _with_hint(name: str, lowered: dict[str, str], unit: str) -> str:
    near = lowered.get(name.strip().lower())
    return f"{name!r} (train{unit} has {near!r})" if near else repr(name)
