"""Transforms built from timm's data config of the backbone, plus Cutout."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from timm.data import create_transform
from torchvision import transforms as T


class Cutout(torch.nn.Module):
    """Zero ``n_holes`` random square patches of side ``size`` (DeVries & Taylor, 2017).

    Works on a normalised ``(C, H, W)`` tensor; patches may overlap the border (then only
    the part inside the image is cut), as in the paper.
    """

    def __init__(self, size: int = 16, n_holes: int = 1, p: float = 1.0) -> None:
        super().__init__()
        if size < 1 or n_holes < 1:
            raise ValueError(f"Cutout needs size >= 1 and n_holes >= 1, got {size}, {n_holes}.")
        self.size, self.n_holes, self.p = size, n_holes, p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.p < 1.0 and torch.rand(()) >= self.p:
            return img
        h, w = img.shape[-2:]
        mask = torch.ones(h, w, dtype=img.dtype)
        for _ in range(self.n_holes):
            cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
            y0, y1 = max(0, cy - self.size // 2), min(h, cy + self.size - self.size // 2)
            x0, x1 = max(0, cx - self.size // 2), min(w, cx + self.size - self.size // 2)
            mask[y0:y1, x0:x1] = 0
        return img * mask

    def extra_repr(self) -> str:
        return f"size={self.size}, n_holes={self.n_holes}, p={self.p}"


def build_transform(
    preprocessing: Mapping[str, Any],
    train: bool,
    augment: Mapping[str, Any] | None = None,
) -> Callable[[Any], torch.Tensor]:
    """A transform for PIL images from timm's ``create_transform``.

    Args:
        preprocessing: ``image_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``.
        train: training transform (augmentation) or evaluation transform.
        augment: keyword arguments for timm's ``create_transform`` (``scale``, ``hflip``,
            ``auto_augment``, ``re_prob``, ...) and ``cutout`` (size/n_holes/p or None).
    """
    size = int(preprocessing["image_size"])
    common = dict(
        input_size=(3, size, size),
        interpolation=preprocessing["interpolation"],
        mean=tuple(preprocessing["mean"]),
        std=tuple(preprocessing["std"]),
    )
    if not train:
        return create_transform(is_training=False, crop_pct=preprocessing["crop_pct"], **common)
    options = dict(augment or {})
    cutout = options.pop("cutout", None)
    for key in ("scale", "ratio"):
        if options.get(key) is not None:
            options[key] = tuple(options[key])
    tf = create_transform(is_training=True, **common, **options)
    if cutout:
        tf = T.Compose([tf, Cutout(**cutout)])
    return tf
