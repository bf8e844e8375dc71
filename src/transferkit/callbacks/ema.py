"""An exponential moving average (EMA) of the weights: validated, checkpointed, exported.

``callbacks=ema`` adds :class:`EMA`. After every optimizer step each floating-point
parameter and buffer of the model moves toward its EMA copy with ``torch.lerp``:
``ema += (1 - d) * (w - ema)``. A frozen weight or frozen BatchNorm statistic never changes,
and ``lerp`` of a value with itself is that value exactly, so the EMA of what is frozen stays
bit-identical to it (an EMA written ``d * ema + (1 - d) * w``, as Lightning's
``WeightAveraging`` default is, drifts by rounding). The decay warms up as in timm's
``ModelEmaV3`` (``min(decay, (1 + t) / (10 + t))`` at step ``t``), so a short fine-tuning
run's EMA is not stuck at the pretrained weights.

Validation runs on the EMA weights (so the best checkpoint and early stopping follow them);
a checkpoint holds them as its ``state_dict`` (what ``evaluate``, ``predict``, ``export`` and
``trainer.test`` load) and the raw weights as ``current_model_state`` (the layout of
Lightning's ``WeightAveraging``), and a resumed run continues both exactly. After training
the model holds the EMA weights.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from transferkit.errors import ConfigError


class EMA(L.Callback):
    """EMA of the weights (see the module docstring).

    Args:
        decay: the EMA's decay per optimizer step (0.999: an average over about 1,000).
        warmup: warm the decay up from 0.1 at the first step (timm's formula).
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"callbacks.ema.decay={decay} must be in (0, 1), e.g. 0.999.")
        self.decay, self.warmup = decay, warmup
        self.steps = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self._swapped = False

    def _tensors(self, module: L.LightningModule) -> dict[str, torch.Tensor]:
        return dict(module.state_dict(keep_vars=True))

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.shadow:  # a resumed run has it from the checkpoint (on the CPU)
            self.shadow = {k: v.detach().clone() for k, v in self._tensors(pl_module).items()}
        self.shadow = {k: v.to(pl_module.device) for k, v in self.shadow.items()}

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        if trainer.global_step <= self.steps:  # not an optimizer step (accumulation)
            return
        weight = 1.0 - self.current_decay()
        for name, tensor in self._tensors(pl_module).items():
            ema = self.shadow[name]
            if ema.dtype.is_floating_point:
                ema.lerp_(tensor.detach().to(ema.device), weight)
            else:
                ema.copy_(tensor.detach())
        self.steps = trainer.global_step

    @torch.no_grad()
    def _swap(self, pl_module: L.LightningModule) -> None:
        for name, tensor in self._tensors(pl_module).items():
            held = tensor.detach().clone()
            tensor.data.copy_(self.shadow[name])
            self.shadow[name].copy_(held)
        self._swapped = not self._swapped

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.shadow and trainer.state.fn == "fit":
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            self._swap(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.shadow and not self._swapped:
            self._swap(pl_module)  # the model keeps the EMA weights from here on
            self._swapped = False
            self.shadow = {}

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.shadow:
            return
        raw = checkpoint["state_dict"]
        if self._swapped:  # saved during validation: the module holds the EMA weights now
            checkpoint["current_model_state"] = {k: self.shadow[k].clone() for k in raw}
            return
        checkpoint["current_model_state"] = raw
        checkpoint["state_dict"] = {k: self.shadow[k].clone() for k in raw}

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != "fit" or "current_model_state" not in checkpoint:
            return  # testing a checkpoint: its state_dict, the EMA weights, is what counts
        self.shadow = {k: v.detach().clone() for k, v in checkpoint["state_dict"].items()}
        pl_module.load_state_dict(checkpoint["current_model_state"])

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
