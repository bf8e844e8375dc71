"""Learning curves: one row per training epoch, kept in ``summary.json`` under ``history``.

Each row has the epoch, the optimizer steps and wall-clock seconds since the fit started
(so they include building a feature cache and the sanity check: the user's wall time),
the epoch means of the training loss and accuracy, the validation loss and accuracy when
that epoch validated (else absent), the head's (largest) learning rate and, for L-BFGS, its
iterations and loss evaluations so far. ``make experiments`` plots these; users can plot
them too without parsing a logger's files.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class History(L.Callback):
    """Record the learning curves of a fit (see the module docstring)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._t0: float | None = None
        self._offset = 0.0  # seconds of earlier runs of a resumed fit
        self._val: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._offset = self.rows[-1]["seconds"] if self.rows else 0.0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self._val = {
            k.replace("/", "_"): float(metrics[k]) for k in ("val/loss", "val/acc") if k in metrics
        }

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row: dict[str, float] = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "seconds": round(self._offset + time.perf_counter() - (self._t0 or 0.0), 3),
        }
        for key in ("train/loss", "train/acc"):
            if key in metrics:
                row[key.replace("/", "_")] = float(metrics[key])
        row.update(self._val)
        self._val = {}
        if trainer.optimizers:
            optimizer = trainer.optimizers[0]
            row["lr"] = max(float(g["lr"]) for g in optimizer.param_groups)
            first = optimizer.param_groups[0]["params"][:1]
            state = optimizer.state.get(first[0], {}) if first else {}
            if "n_iter" in state:  # L-BFGS: iterations and loss evaluations so far
                row["iterations"] = int(state["n_iter"])
                row["func_evals"] = int(state["func_evals"])
        self.rows.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
