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

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score
from torchmetrics.utilities import dim_zero_cat

from transferkit.errors import ConfigError

log = logging.getLogger("transferkit")

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


class MeanAveragePrecision(MultilabelAveragePrecision):
    """mAP over the classes that have a positive image. torchmetrics' macro average counts a
    class without any (a rare class missing from a small split, or a class the evaluated
    data lacks) as AP 0."""

    def __init__(self, num_labels: int) -> None:
        super().__init__(num_labels, average="none")

    def compute(self) -> torch.Tensor:  # type: ignore[override]
        ap = super().compute()
        present = dim_zero_cat(self.target).sum(0) > 0
        return ap[present].mean() if present.any() else torch.tensor(float("nan"))


def average_precisions(probs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-class AP (NaN for a class without positives) and their mean over the others."""
    ap = MultilabelAveragePrecision(probs.shape[1], average="none")(probs, targets.long())
    present = targets.sum(0) > 0
    ap = torch.where(present, ap, torch.tensor(float("nan")))
    return ap, float(ap[present].mean()) if present.any() else float("nan")


def eval_metrics(num_classes: int, stage: str) -> MetricCollection:
    """``{stage}/map`` (mean average precision over the classes present) and
    ``{stage}/f1_macro`` (F1 of the decisions at the thresholds, from 0/1 predictions)."""
    return MetricCollection(
        {"map": MeanAveragePrecision(num_classes),
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
        targets.append(torch.as_tensor(y).cpu())  # device batches hold them on the GPU
    model.train(was_training)
    return torch.cat(probs), torch.cat(targets)


def tune_and_store_thresholds(
    model: Any, val_loader: Any, best_path: str, out_dir: Path, trainer: Any
) -> None:
    """With the best checkpoint's weights, the per-class thresholds of best F1 on the
    validation split, written into the checkpoints (testing and later loads use them).
    Every rank computes the same thresholds over the whole split on its device; rank zero
    writes them, and the others wait for it before testing reads the checkpoint."""
    from transferkit.checkpoint_io import store_thresholds

    model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)
                          ["state_dict"])  # fmt: skip
    model.to(trainer.strategy.root_device)  # Lightning's teardown left it on the CPU
    probs, targets = validation_probabilities(model, val_loader)
    thresholds = tune_thresholds(probs, targets)
    model.thresholds.copy_(thresholds)
    last = out_dir / "checkpoints" / "last.ckpt"
    if trainer.is_global_zero:
        store_thresholds([best_path, *([last] if last.is_file() else [])], thresholds)
    trainer.strategy.barrier("multilabel thresholds")
    log.info("multi-label thresholds tuned on the validation split: %s",
             ", ".join(f"{t:.2f}" for t in thresholds.tolist()))  # fmt: skip


def resolve_task(task: str, multilabel: bool) -> str:
    """``task: auto`` from the labels; an explicit task must fit them.

    Raises:
        ConfigError: ``multiclass`` with sets of labels, or ``multilabel`` with one class
            per image.
    """
    found = "multilabel" if multilabel else "multiclass"
    if task == "auto":
        return found
    if task not in ("multiclass", "multilabel"):
        raise ConfigError(f"task={task!r}; choose auto, multiclass or multilabel.")
    if task != found:
        how = ("the data gives a set of classes per image" if multilabel else
               "the data gives one class per image (data.label_separator makes a CSV "
               "label column a list)")  # fmt: skip
        raise ConfigError(f"task={task} but {how}: set task={found} or task=auto.")
    return task
