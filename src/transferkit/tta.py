"""Test-time augmentation for ``evaluate`` and ``predict`` (``tta=flip|five_crop``).

:class:`TTA` wraps a loaded classifier: it runs each view of the batch and averages the
class probabilities, returning their logarithm (so ``softmax`` gives the average and the
cross-entropy is that of the average). It needs nothing from training, only the checkpoint,
so it works in any process (fastai's TTA breaks after ``load_learner``, fastai #2764).

- ``flip``: the image and its mirror image.
- ``five_crop``: the image resized to ``image_size / FIVE_CROP_FILL`` and its four corner
  and centre crops at ``image_size`` (:func:`tta_preprocessing` gives the larger resize).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchvision.transforms import functional as TF

from transferkit.errors import ConfigError

MODES = ("none", "flip", "five_crop")
#: The share of the resized image each of the five crops covers (torchvision's 0.875).
FIVE_CROP_FILL = 0.875


def check_tta(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"tta={mode!r}; choose one of {list(MODES)}.")


def tta_preprocessing(preprocessing: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """The evaluation preprocessing the views are cut from (larger for ``five_crop``)."""
    out = dict(preprocessing)
    if mode == "five_crop":
        out["image_size"] = round(int(preprocessing["image_size"]) / FIVE_CROP_FILL)
        out["crop_pct"] = 1.0
    return out


class TTA(nn.Module):
    """``model`` averaged over the views of ``mode`` (log of the mean probabilities)."""

    def __init__(self, model: nn.Module, mode: str, image_size: int) -> None:
        super().__init__()
        check_tta(mode)
        self.model, self.mode, self.size = model, mode, image_size
        self.train(model.training)

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.mode == "flip":
            return [x, x.flip(-1)]
        if self.mode == "five_crop":
            return list(TF.five_crop(x, [self.size, self.size]))
        return [x]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.model, "multilabel", False):  # independent sigmoids: their logit
            p = torch.stack([self.model(v).float().sigmoid() for v in self.views(x)]).mean(0)
            p = p.clamp(1e-7, 1 - 1e-7)
            return p.log() - (1 - p).log()
        probs = torch.stack([self.model(v).float().softmax(-1) for v in self.views(x)])
        return probs.mean(0).clamp_min(1e-12).log()
