"""Training throughput: images per second over training batches only (validation excluded).

The counts travel in the checkpoint, with the fit's wall seconds so far: a resumed run's
``summary.json`` reports the whole run's training, not only the part after the resume (a
resume that trains nothing more reported a speed of 0 and the seconds of its own call).
An earlier part's wall seconds run from its fit's start to its last checkpoint: its setup
before the fit and any training after that checkpoint (redone on resume) are not counted.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class TrainSpeed(L.Callback):
    """Counts training images and the seconds spent in training epochs minus validation."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self.earlier_fit_seconds = 0.0  # wall seconds of the fit up to the checkpoint resumed
        self._t0: float | None = None
        self._fit_t0: float | None = None

    def _pause(self) -> None:
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.images += len(batch[0]) * trainer.world_size

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training:
            self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def state_dict(self) -> dict[str, Any]:
        now = time.perf_counter()
        running = now - self._t0 if self._t0 is not None else 0.0  # a save mid-epoch (SIGTERM)
        fit = now - self._fit_t0 if self._fit_t0 is not None else 0.0
        return {"images": self.images, "seconds": self.seconds + running,
                "fit_seconds": self.earlier_fit_seconds + fit}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.images = int(state_dict.get("images", 0))
        self.seconds = float(state_dict.get("seconds", 0.0))
        self.earlier_fit_seconds = float(state_dict.get("fit_seconds", 0.0))
