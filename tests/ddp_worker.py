"""A tiny fine-tuning run for tests/test_ddp.py, launched as a script so that Lightning's
``ddp`` strategy can start the second process the way it does for users.

    python tests/ddp_worker.py OUT_DIR DEVICES REGIME [nosync]

Saves each rank's start and end state dicts to OUT_DIR. ``nosync`` disables the all-reduce
of parameters unfrozen after DDP wrapped the model, to show what goes wrong without it.
"""

import functools
import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from transferkit.models import ImageClassifier
from transferkit.policy import resolve_plan

PLANS = {
    "gradual": {"regime": "gradual", "trainable_blocks": 0, "every_n_epochs": 1,
                "blocks_per_step": 3, "trainable_bn_stats": False},
    "partial": {"regime": "partial", "trainable_blocks": 3, "trainable_bn_stats": False},
}  # fmt: skip
GLOBAL_BATCH = 8


class SaveState(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def _save(self, trainer: L.Trainer, module: L.LightningModule, tag: str) -> None:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        torch.save(state, f"{self.out}/{tag}_rank{trainer.global_rank}.pt")

    def on_fit_start(self, trainer, pl_module):
        self._save(trainer, pl_module, "start")

    def on_fit_end(self, trainer, pl_module):
        self._save(trainer, pl_module, "end")


def main() -> None:
    out, devices, regime = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    if "nosync" in sys.argv[4:]:
        ImageClassifier.on_before_optimizer_step = lambda self, optimizer: None  # type: ignore[method-assign]
    L.seed_everything(0)
    model = ImageClassifier(
        backbone="test_efficientnet",
        num_classes=3,
        image_size=32,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    )
    counts = {"train_size": 32, "min_per_class": 10, "median_per_class": 10, "num_classes": 3}
    model.set_plan(resolve_plan(PLANS[regime], counts, model.num_blocks))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 3, (32,), generator=g)
    # Without shuffling, DistributedSampler gives rank r the samples r, r+2, ...: the global
    # batch of each step is the same 8 samples as a single process with batch size 8.
    # (Lightning's own sampler always shuffles the training set, so we bring ours.)
    dataset = TensorDataset(x, y)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    sampler = DistributedSampler(dataset, num_replicas=devices, rank=rank, shuffle=False)
    loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // devices, sampler=sampler)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveState(out)],
        use_distributed_sampler=False,
    )
    trainer.fit(model, loader)


if __name__ == "__main__":
    main()
