"""gradual and lp_ft unfreeze exactly the expected blocks at the expected epochs, with the
expected LR in every optimizer group (read after the scheduler stepped), and resume restores
both mid-schedule."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from transferkit.models import ImageClassifier
from transferkit.optim import step_decay
from transferkit.policy import resolve_plan

COUNTS = {"train_size": 16, "min_per_class": 5, "median_per_class": 5, "num_classes": 3}
BASE_LR = 0.1
STEPS_PER_EPOCH = 2


class Recorder(L.Callback):
    """After each epoch's last optimizer step: group LRs, trainable names, Adam state."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.epochs[trainer.current_epoch] = {
            "lr": {g["name"]: g["lr"] for g in opt.param_groups},
            "trainable": {n for n, p in pl_module.backbone.named_parameters() if p.requires_grad},
            "k": pl_module.current_trainable,
            "step": trainer.global_step,
        }


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * STEPS_PER_EPOCH, 3, 32, 32, generator=g)
    y = torch.randint(0, 3, (4 * STEPS_PER_EPOCH,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _model(finetune: dict, scheduler: bool = True) -> ImageClassifier:
    L.seed_everything(0)
    model = ImageClassifier(
        backbone="test_efficientnet",
        num_classes=3,
        image_size=32,
        optimizer=functools.partial(torch.optim.Adam, lr=BASE_LR),
        scheduler=(
            {
                "scheduler": functools.partial(step_decay, every_fraction=0.25, gamma=0.5),
                "interval": "step",
            }
            if scheduler
            else None
        ),
    )
    model.set_plan(resolve_plan(finetune, COUNTS, model.num_blocks))
    return model


def _trainer(epochs: int, *callbacks, **kw) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=list(callbacks),
        **kw,
    )


def _expected_lr(depth: int | None, layer_decay: float, step: int, total: int, scale: float):
    """head: depth None. step_decay(every 25% of training, gamma 0.5), evaluated after
    ``step`` optimizer steps (the scheduler has stepped ``step`` times)."""
    every = max(1, int(0.25 * total))
    layer = 1.0 if depth is None else layer_decay ** (depth + 1)
    return BASE_LR * layer * 0.5 ** (step // every) * scale


def _block_names(model: ImageClassifier, k: int) -> set[str]:
    return {n for b in model.blocks[len(model.blocks) - k :] for n in b} if k else set()


def test_gradual_unfreezes_top_down_with_layerwise_lrs():
    cfg = {"regime": "gradual", "trainable_blocks": 0, "every_n_epochs": 1,
           "blocks_per_step": 2, "final_blocks": "all", "layer_decay": 0.5}  # fmt: skip
    model = _model(cfg)
    n = model.num_blocks  # 6 for test_efficientnet
    assert model.plan.schedule == ((1, 2), (2, 4), (3, 6))
    rec = Recorder()
    epochs = 4
    _trainer(epochs, rec).fit(model, _data())
    total = epochs * STEPS_PER_EPOCH
    for epoch, expected_k in enumerate([0, 2, 4, 6]):
        seen = rec.epochs[epoch]
        assert seen["k"] == expected_k
        assert seen["trainable"] == _block_names(model, expected_k)
        lrs = seen["lr"]
        # every group exists from the first step, for all blocks that will ever train
        expected_groups = {"head"} | {f"block{i:02d}" for i in range(n)}
        assert {name.split("/")[0] for name in lrs} == expected_groups
        for name, lr in lrs.items():
            base = name.split("/")[0]
            depth = None if base == "head" else n - 1 - int(base[5:])
            assert lr == pytest.approx(_expected_lr(depth, 0.5, seen["step"], total, 1.0)), name


def test_lp_ft_probes_then_fine_tunes_everything_at_lower_lr():
    cfg = {"regime": "lp_ft", "lp_epochs": 1, "ft_lr_scale": 0.1, "trainable_bn_stats": False}
    model = _model(cfg)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    rec = Recorder()
    epochs = 3
    _trainer(epochs, rec).fit(model, _data())
    total = epochs * STEPS_PER_EPOCH
    assert rec.epochs[0]["trainable"] == set() and rec.epochs[1]["k"] == model.num_blocks
    for epoch, scale in ((0, 1.0), (1, 0.1), (2, 0.1)):
        step = rec.epochs[epoch]["step"]
        for name, lr in rec.epochs[epoch]["lr"].items():
            assert lr == pytest.approx(_expected_lr(None, 1.0, step, total, scale)), (epoch, name)
    after = model.backbone.state_dict()
    # BatchNorm statistics fixed in both phases; weights changed in the fine-tuning phase
    for k in after:
        if "running" in k:
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])


@pytest.mark.parametrize(
    "cfg",
    [
        {"regime": "lp_ft", "lp_epochs": 1, "ft_lr_scale": 0.1},
        {"regime": "gradual", "every_n_epochs": 1, "blocks_per_step": 3, "layer_decay": 0.7},
    ],
    ids=["lp_ft", "gradual"],
)
def test_resume_mid_schedule_restores_trainable_set_and_lrs(cfg, tmp_path):
    epochs = 3
    full = Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1,
                           filename="e{epoch}", monitor=None)  # fmt: skip
    model = _model(cfg)
    _trainer(epochs, full, ckpt).fit(model, _data())
    final = {k: v.clone() for k, v in model.state_dict().items()}

    resumed = Recorder()
    model2 = _model(cfg)
    # stopped after epoch 1 (index 0 or 1 is mid-schedule for both plans)
    _trainer(epochs, resumed).fit(model2, _data(), ckpt_path=str(tmp_path / "eepoch=1.ckpt"))
    assert set(resumed.epochs) == {2}
    assert resumed.epochs[2]["trainable"] == full.epochs[2]["trainable"]
    assert resumed.epochs[2]["lr"] == pytest.approx(full.epochs[2]["lr"])
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, final[k], msg=k)


def test_each_unfreeze_phase_restarts_early_stopping():
    """LP-FT's fine-tuning phase must not be stopped by the probe's best validation loss."""
    from lightning.pytorch.callbacks import EarlyStopping

    class Seen(L.Callback):
        def __init__(self) -> None:
            self.best: dict[int, float] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.best[trainer.current_epoch] = float(es.best_score)

    es = EarlyStopping(monitor="val/loss", patience=100)
    seen = Seen()
    model = _model({"regime": "lp_ft", "lp_epochs": 2, "ft_lr_scale": 0.5}, scheduler=False)
    _trainer(4, es, seen).fit(model, _data(), _data())
    assert seen.best[0] == float("inf")  # nothing validated yet
    assert seen.best[1] < float("inf")  # the probe's best loss
    assert seen.best[2] == float("inf")  # restarted when the backbone unfroze
    assert seen.best[3] < float("inf")
