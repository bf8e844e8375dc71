"""A callback for the DDP sampler test: each rank saves the indices its training loader
draws each epoch (imported by the DDP processes through ``PYTHONPATH``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class RecordDraws(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        sampler = loader.sampler  # type: ignore[union-attr]
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"indices": list(sampler), "rank": sampler.rank, "replicas": sampler.num_replicas,
             "weights": sampler.weights, "labels": torch.as_tensor(loader.dataset.samples.labels),
             "seed": sampler.seed},  # type: ignore[union-attr]
            self.out / f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.pt",
        )  # fmt: skip
