"""What the LightningModule logs per stage, from torchmetrics.

Accuracy alone hides a model that never predicts a rare class (it scores 98 % on a set with
2 % defects), so validation and test also log macro-F1 and balanced accuracy (the mean of
the per-class recalls); either can be the ``monitor``. Top-5 accuracy with more than five
classes.
"""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall


def eval_metrics(num_classes: int, stage: str) -> MetricCollection:
    """``{stage}/acc``, ``/acc_top5`` (more than 5 classes), ``/f1_macro``, ``/balanced_acc``."""
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
        "balanced_acc": MulticlassRecall(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=f"{stage}/")  # type: ignore[arg-type]
