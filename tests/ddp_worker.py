"""A tiny fine-tuning run for tests/test_ddp.py, launched as a script so that Lightning's
``ddp`` strategy can start the second process the way it does for users.

    python tests/ddp_worker.py OUT_DIR DEVICES REGIME [nosync] [fp16] [late_sync_after_unscale]

Saves each rank's start and end state dicts to OUT_DIR. ``nosync`` disables the all-reduce
of parameters unfrozen after DDP wrapped the model, to show what goes wrong without it.
``fp16`` trains with a gradient scaler and gives rank 1 alone a non-finite gradient in a
late-unfrozen parameter; ``late_sync_after_unscale`` moves the all-reduce back to where it
was, after the scaler's inf check.
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


class InfOnOneRank(L.Callback):
    """At one step after the unfreeze, rank 1 alone gets a non-finite gradient in a
    parameter unfrozen after DDP wrapped the model (an fp16 overflow, say)."""

    def __init__(self, step: int) -> None:
        self.step, self.hooked = step, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        p = pl_module.backbone.conv_head.weight
        if self.hooked or trainer.global_rank != 1 or not p.requires_grad:
            return
        p.register_hook(lambda g: g * float("inf") if trainer.global_step == self.step else g)
        self.hooked = True


class SaveScale(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        scale = trainer.precision_plugin.scaler.get_scale()
        torch.save(torch.tensor(scale), f"{self.out}/scale_rank{trainer.global_rank}.pt")


def main() -> None:
    out, devices, regime = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    flags = sys.argv[4:]
    torch.set_num_threads(1)
    if "nosync" in flags:
        ImageClassifier.on_after_backward = lambda self: None  # type: ignore[method-assign]
    if "late_sync_after_unscale" in flags:  # where the all-reduce was: after the inf check
        sync = ImageClassifier.on_after_backward
        ImageClassifier.on_after_backward = lambda self: None  # type: ignore[method-assign]
        ImageClassifier.on_before_optimizer_step = lambda self, opt: sync(self)  # type: ignore[method-assign]
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
    extra: list[L.Callback] = []
    plugins = []
    if "fp16" in flags:  # fp16 loss scaling as on a GPU, with torch's CPU GradScaler
        from lightning.pytorch.plugins.precision import MixedPrecision

        scaler = torch.amp.GradScaler("cpu")
        plugins.append(MixedPrecision("16-mixed", "cpu", scaler=scaler))
        extra += [InfOnOneRank(step=5), SaveScale(out)]
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveState(out), *extra],
        use_distributed_sampler=False,
        plugins=plugins,
    )
    trainer.fit(model, loader)


if __name__ == "__main__":
    main()
