"""Apply the fine-tuning plan's schedule: unfreeze blocks and scale LRs.

Parameter groups for every block that will ever train exist from the start (see
``ImageClassifier.configure_optimizers``), so unfreezing only flips ``requires_grad``: the
optimizer, any scheduler, the LR monitor and resume keep working unchanged. Under DDP the
module all-reduces the gradients of parameters unfrozen after wrapping
(``ImageClassifier.on_before_optimizer_step``).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_info

if TYPE_CHECKING:
    from transferkit.models.classifier import ImageClassifier

log = logging.getLogger(__name__)


class FinetuneSchedule(L.Callback):
    """Follow ``pl_module.plan``: at each epoch start (``trigger: epochs``) or when the
    monitored validation metric plateaus (``trigger: plateau``).

    State saved in checkpoints: the LR scale already applied to the optimizer (so a run
    resumed after the ``lp_ft`` switch does not scale twice) and, for plateau triggers, the
    schedule stage, best value and wait count.

    Args:
        monitor: metric watched by the plateau trigger.
        mode: ``min`` or ``max``.
    """

    def __init__(self, monitor: str = "val/loss", mode: str = "min") -> None:
        self.monitor, self.mode = monitor, mode
        self.applied_scale = 1.0
        self.stage = 0
        self.applied_stage = 0
        self.best = math.inf if mode == "min" else -math.inf
        self.wait = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: ImageClassifier) -> None:  # type: ignore[override]
        plan = pl_module.plan
        epoch = trainer.current_epoch
        if plan.trigger == "plateau":
            k = plan.trainable_at_stage(self.stage)
            scale = plan.ft_lr_scale if self.stage > 0 else 1.0
        else:
            k = plan.trainable_at(epoch)
            scale = plan.lr_scale_at(epoch)
        if k != pl_module.current_trainable:
            if plan.trigger == "plateau":  # a stage reached in this process, not restored
                phase_change = self.stage != self.applied_stage
            else:  # from the plan alone, so a resumed run decides as the original did
                phase_change = epoch > 0 and plan.trainable_at(epoch - 1) != k
            pl_module.apply_trainable(k)
            rank_zero_info(
                f"epoch {epoch}: last {k} of {plan.total_blocks} backbone blocks trainable"
            )
            if phase_change:
                self._restart_early_stopping(trainer)
        self.applied_stage = self.stage
        if scale != self.applied_scale:
            self._scale_lrs(trainer, scale / self.applied_scale)
            self.applied_scale = scale
            rank_zero_info(f"epoch {epoch}: learning rates × {scale:g} of their base")

    def on_validation_end(self, trainer: L.Trainer, pl_module: ImageClassifier) -> None:  # type: ignore[override]
        plan = pl_module.plan
        if plan.trigger != "plateau" or trainer.sanity_checking:
            return
        if self.stage >= len(plan.schedule) or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        better = value < self.best if self.mode == "min" else value > self.best
        if better:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= plan.patience:
            self.stage += 1
            self.wait = 0
            self.best = math.inf if self.mode == "min" else -math.inf
            rank_zero_info(f"{self.monitor} plateaued: unfreezing at the next epoch")

    @staticmethod
    def _restart_early_stopping(trainer: L.Trainer) -> None:
        """A new phase gets its own patience: the loss of a network that just gained
        trainable blocks first rises, and the previous phase's best would stop it before it
        learns (LP-FT lost its fine-tuning phase that way). Checkpointing keeps the overall
        best, so nothing is lost if the new phase never beats the old one."""
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, EarlyStopping):
                cb.wait_count = 0
                cb.best_score = torch.tensor(math.inf if cb.mode == "min" else -math.inf)

    @staticmethod
    def _scale_lrs(trainer: L.Trainer, ratio: float) -> None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for key in ("lr", "initial_lr", "max_lr", "min_lr"):  # max/min: OneCycleLR
                    if key in group:
                        group[key] *= ratio
        for config in trainer.lr_scheduler_configs:
            base = getattr(config.scheduler, "base_lrs", None)
            if base is not None:
                config.scheduler.base_lrs = [b * ratio for b in base]

    def state_dict(self) -> dict[str, Any]:
        return {
            "applied_scale": self.applied_scale,
            "stage": self.stage,
            "applied_stage": self.applied_stage,
            "best": self.best,
            "wait": self.wait,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied_scale = float(state_dict["applied_scale"])
        self.stage = int(state_dict.get("stage", 0))
        self.applied_stage = int(state_dict.get("applied_stage", self.stage))
        self.best = float(state_dict.get("best", self.best))
        self.wait = int(state_dict.get("wait", 0))
