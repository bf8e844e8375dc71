"""Transforms built from timm's data config of the backbone, plus Cutout and the batch-level
mixup / CutMix the LightningModule applies in its training step."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from torchvision import transforms as T

from transferkit.errors import ConfigError

#: Keys of an ``augment`` config that are not per-image ``create_transform`` options.
BATCH_KEYS = ("mixup",)


class Cutout(torch.nn.Module):
    """Zero ``n_holes`` random square patches of side ``size`` (DeVries & Taylor, 2017).

    Works on a normalised ``(C, H, W)`` tensor; patches may overlap the border (then only
    the part inside the image is cut), as in the paper.
    """

    def __init__(self, size: int = 16, n_holes: int = 1, p: float = 1.0) -> None:
        super().__init__()
        if size < 1 or n_holes < 1:
            raise ConfigError(f"Cutout needs size >= 1 and n_holes >= 1, got {size}, {n_holes}.")
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
            ``auto_augment``, ``re_prob``, ...) and ``cutout`` (size/n_holes/p or None);
            ``mixup`` is a batch transform (see ``BatchMixup``) and is ignored here.
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
    options = {k: v for k, v in (augment or {}).items() if k not in BATCH_KEYS}
    cutout = options.pop("cutout", None)
    for key in ("scale", "ratio"):
        if options.get(key) is not None:
            options[key] = tuple(options[key])
    tf = create_transform(is_training=True, **common, **options)
    if cutout:
        tf = T.Compose([tf, Cutout(**cutout)])
    return tf


class BatchMixup:
    """timm's ``Mixup`` (mixup and/or CutMix, with label smoothing) for any batch size.

    Returns the mixed images and soft targets (rows sum to 1). timm mixes a batch with its
    flipped self and needs an even batch size: an odd batch mixes all but its last image,
    which keeps its (smoothed) one-hot target.

    Args:
        num_classes: number of classes.
        label_smoothing: smoothing folded into the soft targets.
        **options: ``Mixup`` options (``mixup_alpha``, ``cutmix_alpha``, ``prob``,
            ``switch_prob``, ``mode``, ...).
    """

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, **options: Any) -> None:
        for key in ("mixup_alpha", "cutmix_alpha", "prob", "switch_prob"):
            value = options.get(key, 0.0)
            if value is not None and float(value) < 0:
                raise ConfigError(f"augment.mixup.{key}={value} must be >= 0.")
        self.num_classes = num_classes
        self.label_smoothing = float(options.get("label_smoothing", label_smoothing))
        options["label_smoothing"] = self.label_smoothing
        self.mixup = Mixup(num_classes=num_classes, **options)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(x) - len(x) % 2
        if n == 0:
            return x, self._one_hot(y)
        mixed, soft = self.mixup(x[:n], y[:n])
        if n == len(x):
            return mixed, soft
        return torch.cat([mixed, x[n:]]), torch.cat([soft, self._one_hot(y[n:])])

    def _one_hot(self, y: torch.Tensor) -> torch.Tensor:
        return mixup_target(y, self.num_classes, lam=1.0, smoothing=self.label_smoothing)
