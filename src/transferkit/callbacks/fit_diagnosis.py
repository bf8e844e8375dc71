"""Over- and under-fitting diagnosis from the training and validation loss curves.

Logs the generalisation gap ``gap/loss`` (val − train loss) at every epoch that validated and,
at the end, gives a verdict with its evidence for ``summary.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L

from transferkit.errors import ConfigError

VERDICTS = ("overfitting", "underfitting", "ok")


def diagnose_fit(
    history: Sequence[dict[str, float]],
    num_classes: int,
    rise_tolerance: float = 0.05,
    underfit_ratio: float = 0.5,
) -> dict[str, Any]:
    """Verdict on the loss curves: ``overfitting``, ``underfitting`` or ``ok``.

    - *overfitting*: the validation loss rose more than ``rise_tolerance`` (relative) above
      its minimum while the training loss kept falling after that epoch.
    - *underfitting*: both final losses are still above ``underfit_ratio`` × ln(C), the loss
      of a uniform guess over C classes: the model has learnt little even on its own data.
    - *ok*: neither.

    Args:
        history: one entry per validated epoch: ``epoch``, ``train_loss``, ``val_loss``.
        num_classes: number of classes C (sets the chance-level loss ln C).
        rise_tolerance: relative rise of the validation loss that counts as rising.
        underfit_ratio: share of the chance-level loss above which a loss counts as high.

    Returns:
        ``{"fit": verdict, "evidence": {...}}``; ``fit`` is None when nothing validated.

    Raises:
        ValueError: a threshold out of range.
    """
    if rise_tolerance < 0:
        raise ConfigError(f"rise_tolerance={rise_tolerance} must be >= 0.")
    if not 0 < underfit_ratio <= 1:
        raise ConfigError(f"underfit_ratio={underfit_ratio} must be in (0, 1].")
    if not history:
        return {"fit": None, "evidence": {"reason": "no validation ran: nothing to diagnose"}}
    chance = math.log(num_classes)
    best = min(range(len(history)), key=lambda i: history[i]["val_loss"])
    first, at_best, last = history[0], history[best], history[-1]
    evidence: dict[str, Any] = {
        "validated_epochs": len(history),
        "val_loss_min": round(at_best["val_loss"], 4),
        "val_loss_min_epoch": int(at_best["epoch"]),
        "val_loss_last": round(last["val_loss"], 4),
        "train_loss_first": round(first["train_loss"], 4),
        "train_loss_at_val_min": round(at_best["train_loss"], 4),
        "train_loss_last": round(last["train_loss"], 4),
        "gap_last": round(last["val_loss"] - last["train_loss"], 4),
        "chance_loss": round(chance, 4),
    }
    rise = last["val_loss"] - at_best["val_loss"]
    rising = best < len(history) - 1 and rise > rise_tolerance * max(at_best["val_loss"], 1e-8)
    if rising and last["train_loss"] < at_best["train_loss"]:
        after = history[best + 1]
        evidence["val_loss_rising_from_epoch"] = int(after["epoch"])
        evidence["reason"] = (
            f"val loss rose {rise / max(at_best['val_loss'], 1e-8):.0%} from its minimum at "
            f"epoch {at_best['epoch']} while train loss kept falling "
            f"({at_best['train_loss']:.3f} → {last['train_loss']:.3f})"
        )
        return {"fit": "overfitting", "evidence": evidence}
    high = underfit_ratio * chance
    if last["train_loss"] > high and last["val_loss"] > high:
        evidence["reason"] = (
            f"train and val loss ({last['train_loss']:.3f}, {last['val_loss']:.3f}) are both "
            f"above {underfit_ratio:g} × chance level ln({num_classes}) = {chance:.3f}: train "
            "longer, unfreeze more blocks, raise the LR or regularise less"
        )
        return {"fit": "underfitting", "evidence": evidence}
    evidence["reason"] = (
        "train loss below the underfitting level and no sustained rise of the val loss"
    )
    return {"fit": "ok", "evidence": evidence}


class FitDiagnosis(L.Callback):
    """Records (train loss, val loss) per validated epoch, logs ``gap/loss``, diagnoses the fit.

    Reads the epoch means of ``train/loss`` and ``val/loss`` that the module logs. Under
    mixup or label smoothing the train loss is measured against soft targets and is higher
    by construction, so the gap is smaller than for hard labels.

    Args:
        rise_tolerance: see ``diagnose_fit``.
        underfit_ratio: see ``diagnose_fit``.
    """

    def __init__(self, rise_tolerance: float = 0.05, underfit_ratio: float = 0.5) -> None:
        diagnose_fit([], 2, rise_tolerance, underfit_ratio)  # validate the thresholds now
        self.rise_tolerance, self.underfit_ratio = rise_tolerance, underfit_ratio
        self.history: list[dict[str, float]] = []
        self.num_classes = 2
        self._val_loss: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.num_classes = int(pl_module.hparams.get("num_classes", self.num_classes))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/loss")
        self._val_loss = None if value is None else float(value)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        train = trainer.callback_metrics.get("train/loss")
        if self._val_loss is None or train is None:
            return
        row = {
            "epoch": trainer.current_epoch,
            "train_loss": float(train),
            "val_loss": self._val_loss,
        }
        self.history.append(row)
        self._val_loss = None
        pl_module.log("gap/loss", row["val_loss"] - row["train_loss"], on_epoch=True)

    def result(self) -> dict[str, Any]:
        """The verdict and evidence (see ``diagnose_fit``)."""
        return diagnose_fit(
            self.history, self.num_classes, self.rise_tolerance, self.underfit_ratio
        )

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "num_classes": self.num_classes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.num_classes = int(state_dict.get("num_classes", self.num_classes))
