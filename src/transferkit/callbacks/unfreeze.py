"""Apply the fine-tuning plan's schedule: unfreeze blocks and scale LRs at epoch starts.

Parameter groups for every block that will ever train exist from the start (see
``ImageClassifier.configure_optimizers``), so unfreezing only flips ``requires_grad``: the
optimizer, any scheduler, the LR monitor and resume keep working unchanged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

if TYPE_CHECKING:
    from transferkit.models.classifier import ImageClassifier

log = logging.getLogger(__name__)


class FinetuneSchedule(L.Callback):
    """Follow ``pl_module.plan`` epoch by epoch.

    State (saved in checkpoints): the LR scale already applied to the optimizer, so a run
    resumed after the ``lp_ft`` switch does not scale twice.
    """

    def __init__(self) -> None:
        self.applied_scale = 1.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: ImageClassifier) -> None:  # type: ignore[override]
        plan = pl_module.plan
        epoch = trainer.current_epoch
        k = plan.trainable_at(epoch)
        if k != pl_module.current_trainable:
            pl_module.apply_trainable(k)
            rank_zero_info(
                f"epoch {epoch}: last {k} of {plan.total_blocks} backbone blocks trainable"
            )
        scale = plan.lr_scale_at(epoch)
        if scale != self.applied_scale:
            ratio = scale / self.applied_scale
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] *= ratio
                    if "initial_lr" in group:
                        group["initial_lr"] *= ratio
            for config in trainer.lr_scheduler_configs:
                base = getattr(config.scheduler, "base_lrs", None)
                if base is not None:
                    config.scheduler.base_lrs = [b * ratio for b in base]
            self.applied_scale = scale
            rank_zero_info(f"epoch {epoch}: learning rates × {ratio:g}")

    def state_dict(self) -> dict[str, Any]:
        return {"applied_scale": self.applied_scale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied_scale = float(state_dict["applied_scale"])
