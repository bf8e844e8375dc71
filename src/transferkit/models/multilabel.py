"""Multi-label classification (``task=multilabel``): an image has any set of the classes.

The head's outputs are independent sigmoids. The loss is binary cross-entropy, or the
asymmetric loss of Ridnik et al. (2021) (``model.multilabel_loss=asl``), which focuses on
hard negatives when most labels of most images are negative. Validation logs the mean
average precision over the classes (``val/map``, the default ``monitor``) and macro-F1 at
each class's threshold. The thresholds (0.5 while training) are tuned on the validation
split after training, one per class for the best F1 (:func:`tune_thresholds`), and saved
in the checkpoint, so ``evaluate`` and ``predict`` use them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

from transferkit.errors import ConfigError

LOSSES = ("bce", "asl")


def check_loss(name: str) -> None:
    if name not in LOSSES:
        raise ConfigError(f"model.multilabel_loss={name!r}; choose one of {list(LOSSES)}.")


def multilabel_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    kind: str = "bce",
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
) -> torch.Tensor:
    """Mean over the images of the summed per-class loss (BCE, or ASL with the paper's
    defaults: γ- = 4, γ+ = 0, probability margin 0.05 on negatives)."""
    targets = targets.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(logits)
    p = torch.sigmoid(logits)
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p  # shifted: easy negatives count 0
    loss_pos = targets * (1 - p) ** gamma_pos * torch.log(p.clamp(min=1e-8))
    loss_neg = (1 - targets) * p_neg**gamma_neg * torch.log((1 - p_neg).clamp(min=1e-8))
    return -(loss_pos + loss_neg).sum() / len(logits)


def eval_metrics(num_classes: int, stage: str) -> MetricCollection:
    """``{stage}/map`` (macro average precision) and ``{stage}/f1_macro`` (F1 of the
    decisions at the thresholds, updated with 0/1 predictions)."""
    return MetricCollection(
        {"map": MultilabelAveragePrecision(num_classes, average="macro"),
         "f1_macro": MultilabelF1Score(num_classes, average="macro")},
        prefix=f"{stage}/",
        compute_groups=False,
    )  # fmt: skip


@torch.no_grad()
def tune_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per class, the threshold among the validation probabilities with the best F1 (ties:
    the higher one); 0.5 for a class with no positive image in the validation split."""
    targets = targets.bool()
    thresholds = torch.full((probs.shape[1],), 0.5)
    for c in range(probs.shape[1]):
        positives = int(targets[:, c].sum())
        if positives == 0:
            continue
        order = probs[:, c].argsort(descending=True)
        p, t = probs[order, c], targets[order, c].float()
        tp = t.cumsum(0)  # predicting the first k+1 (the highest) as positive
        f1 = 2 * tp / (torch.arange(1, len(p) + 1) + positives)
        best = int(f1.argmax())
        # between the last chosen and the next probability: robust to tiny shifts
        below = float(p[best + 1]) if best + 1 < len(p) else 0.0
        thresholds[c] = (float(p[best]) + below) / 2
    return thresholds


@torch.no_grad()
def validation_probabilities(
    model: torch.nn.Module, loader: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid outputs and targets over ``loader`` (images or cached features alike: the
    model's ``_logits`` runs whatever the loader gives)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs, targets = [], []
    for x, y in loader:
        probs.append(model._logits(x.to(device)).float().sigmoid().cpu())  # type: ignore[operator]
        targets.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(probs), torch.cat(targets)
