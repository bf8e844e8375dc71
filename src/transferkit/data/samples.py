"""Labelled image collections and the pure functions that split and subsample them."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch
from PIL import Image

from transferkit.errors import ConfigError, DataError


class Records(Protocol):
    """Encoded images held elsewhere (a Hugging Face data set's column), decoded on access."""

    def __len__(self) -> int: ...

    def take(self, index: np.ndarray) -> Records: ...

    def open(self, i: int) -> tuple[IO[bytes] | Path, str]:
        """The i-th image as a file to decode, and its name for messages."""
        ...


@dataclass
class Samples:
    """Images of one split with integer labels.

    One of ``images`` (an in-memory ``uint8`` array, ``(N, H, W)`` or ``(N, H, W, C)``),
    ``paths`` (image files decoded on access) or ``records`` (encoded images of a data set)
    holds the pixels.
    """

    labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[Path] | None = None
    bad: list[Path] = field(default_factory=list)
    records: Records | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Sequence[int] | np.ndarray) -> Samples:
        index = np.asarray(index, dtype=np.int64)
        return Samples(
            labels=self.labels[index],
            images=None if self.images is None else self.images[index],
            paths=None if self.paths is None else [self.paths[i] for i in index],
            records=None if self.records is None else self.records.take(index),
        )

    def load(self, i: int) -> Image.Image:
        """The i-th image as RGB (greyscale, palette, RGBA, 16-bit and CMYK are converted)."""
        if self.images is not None:
            return Image.fromarray(self.images[i]).convert("RGB")
        if self.records is not None:
            return read_rgb(*self.records.open(i))
        assert self.paths is not None
        return read_rgb(self.paths[i])


class ConcatRecords:
    """Several :class:`Records` as one (``evaluate split=all`` of a Hugging Face data set)."""

    def __init__(self, parts: Sequence[Records], where: np.ndarray | None = None) -> None:
        self.parts = list(parts)
        self.where = where if where is not None else np.asarray(
            [(k, i) for k, part in enumerate(self.parts) for i in range(len(part))], np.int64
        ).reshape(-1, 2)  # fmt: skip

    def __len__(self) -> int:
        return len(self.where)

    def take(self, index: np.ndarray) -> ConcatRecords:
        return ConcatRecords(self.parts, self.where[index])

    def open(self, i: int) -> tuple[IO[bytes] | Path, str]:
        part, j = self.where[i]
        return self.parts[int(part)].open(int(j))


def concat_samples(parts: Sequence[Samples]) -> Samples:
    """The samples of several splits as one (their pixels held the same way)."""
    labels = np.concatenate([p.labels for p in parts])
    if all(p.images is not None for p in parts):
        return Samples(labels=labels, images=np.concatenate([p.images for p in parts]))
    if all(p.records is not None for p in parts):
        return Samples(labels=labels, records=ConcatRecords([p.records for p in parts]))  # type: ignore[misc]
    return Samples(labels=labels, paths=[f for p in parts for f in (p.paths or [])])


class BadImageError(DataError):
    """A file that does not decode to an image; ``kind`` is ``unreadable``, ``bomb`` or
    ``missing``."""

    def __init__(self, path: Path | str, kind: str, detail: str) -> None:
        super().__init__(f"cannot read image {path} ({kind}: {detail})")
        self.path, self.kind = path, kind


def read_rgb(path: Path | IO[bytes], name: str | None = None) -> Image.Image:
    """Decode ``path`` (a file name or an open binary file, called ``name`` in messages)
    fully and convert it to RGB.

    A decompression bomb (more pixels than Pillow's ``Image.MAX_IMAGE_PIXELS``, where
    Pillow only warns below twice that) is refused before it is decoded.

    Raises:
        BadImageError: the file is unreadable, truncated, not an image, or a bomb.
    """
    label = name or str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                im.load()
                return to_rgb(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImageError(label, "bomb", str(e)) from e
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
            raise BadImageError(label, "unreadable", f"{type(e).__name__}: {e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit greyscale is rescaled, alpha dropped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        image = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def label_of(labels: np.ndarray, i: int) -> Any:
    """The i-th label as a batchable value: an ``int`` class, or (multi-label, a 2-D
    ``labels`` of 0/1 per class) a float tensor."""
    if labels.ndim == 1:
        return int(labels[i])
    return torch.from_numpy(np.asarray(labels[i], dtype=np.float32))


def per_class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class (multi-label: images that have the class)."""
    if labels.ndim == 1:
        return np.bincount(labels, minlength=num_classes)
    return np.asarray(labels, dtype=np.int64).sum(0)


def strata(labels: np.ndarray, min_group: int = 10) -> np.ndarray:
    """One group per image to stratify by: its class, or (multi-label) its rarest class, so
    that rare classes are spread over the splits. Multi-label groups smaller than
    ``min_group`` (and images without a class) are pooled into one extra group, merged into
    the largest when it is small itself: a group must be big enough to split."""
    if labels.ndim == 1:
        return labels
    counts = labels.sum(0).astype(np.float64)
    rarity = np.where(labels > 0, counts[None, :], np.inf)
    key = rarity.argmin(1)
    pooled = labels.shape[1]
    key[~(labels > 0).any(1)] = pooled
    sizes = np.bincount(key, minlength=pooled + 1)
    key[sizes[key] < min_group] = pooled
    sizes = np.bincount(key, minlength=pooled + 1)
    if 0 < sizes[pooled] < min_group:
        key[key == pooled] = int(sizes[:pooled].argmax())
    return key


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], seed: int, class_names: Sequence[str]
) -> list[np.ndarray]:
    """Split indices per class into ``[rest, *fractions]`` parts, reproducibly.

    Each class contributes ``round(n * f)`` (at least 1 when ``f > 0``) images to each part,
    so every class appears in every split.

    Raises:
        ValueError: a class has too few images for the requested splits.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in range(len(class_names)):
        idx = np.flatnonzero(labels == c)
        if not len(idx):  # a stratum without images (multi-label's "no class", say)
            continue
        idx = idx[rng.permutation(len(idx))]
        sizes = [max(1, round(len(idx) * f)) if f > 0 else 0 for f in fractions]
        if sum(sizes) >= len(idx):
            needed = sum(sizes) + 1
            raise DataError(
                f"class '{class_names[c]}' has {len(idx)} image(s), too few for a training "
                f"split plus validation/test fractions {list(fractions)} (needs at least "
                f"{needed}). Add images, or lower data.val_fraction / data.test_fraction, or "
                "provide explicit train/val/test folders."
            )
        start = 0
        for k, size in enumerate(sizes, start=1):
            parts[k].append(idx[start : start + size])
            start += size
        parts[0].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def interleave_classes(labels: np.ndarray) -> np.ndarray:
    """An order of ``labels`` in which every class appears among the first C images (C
    classes), and then the classes take turns in proportion to their size.

    Evaluation splits come grouped by class; in this order ``trainer.limit_val_batches`` /
    ``limit_test_batches`` (and a partial epoch) see every class instead of the first one
    only. Within a class the order is kept.
    """
    labels = np.asarray(labels)
    key = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        key[idx] = np.arange(len(idx)) / len(idx)
    return np.lexsort((labels, key))  # by share of the class done, then by class


def limit_per_class(
    labels: np.ndarray, n: int | Sequence[int], seed: int, num_classes: int | None = None
) -> np.ndarray:
    """Indices of at most ``n`` images per class (or ``n[c]`` of class ``c``), chosen
    reproducibly.

    Raises:
        ConfigError: a limit below 1, or a list whose length is not the number of classes.
    """
    classes = int(num_classes if num_classes is not None else labels.max() + 1)
    limits = [n] * classes if isinstance(n, (int, np.integer)) else list(n)
    if len(limits) != classes:
        raise ConfigError(
            f"data.limit_per_class has {len(limits)} limits for {classes} classes: give one "
            "per class, in the order of the class names, or a single number."
        )
    if any(not isinstance(k, (int, np.integer)) or k < 1 for k in limits):
        raise ConfigError(f"data.limit_per_class must be >= 1, got {n}; use null for no limit.")
    rng = np.random.default_rng(seed + 1)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(np.sort(idx[rng.permutation(len(idx))[: limits[int(c)]]]))
    return np.sort(np.concatenate(keep))
