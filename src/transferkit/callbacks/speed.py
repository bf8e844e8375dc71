"""Training throughput: images per second over training batches only (validation excluded)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class TrainSpeed(L.Callback):
    """Counts training images and the seconds spent in training epochs minus validation."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._t0: float | None = None

    def _pause(self) -> None:
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

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
