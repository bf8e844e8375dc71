"""Every choice of every toolbox config group composes from the real conf/ and trains; each
optimizer config builds the named torch optimizer with its configured hyper-parameters; the
schedulers keep their contracts."""

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, ReduceLROnPlateau

from transferkit.finetune import finetune
from transferkit.models import ImageClassifier
from transferkit.models.norms import BACKBONE_NORMS, NORMS
from transferkit.optim import cosine_with_warmup, one_cycle, plateau, step_decay

from .conftest import CONF_DIR, tiny_overrides


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


GROUPS = {
    g: choices(g) for g in ("optimizer", "scheduler", "augment", "regularization", "model/head")
}
EXPECTED_OPTIMIZER = {
    "sgd": torch.optim.SGD,
    "momentum": torch.optim.SGD,
    "nesterov": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "lbfgs": torch.optim.LBFGS,  # one merged group: see test_lbfgs_history.py
}
EXPECTED_SCHEDULER = {
    "none": None,
    "cosine": LambdaLR,
    "onecycle": OneCycleLR,
    "step": LambdaLR,
    "plateau": ReduceLROnPlateau,
}
N_ROWS = max(len(c) for c in [*GROUPS.values(), NORMS, BACKBONE_NORMS])


def row(i: int) -> dict[str, str]:
    """Row i of a covering design: choice i mod n of every group (not the full product)."""
    pick = {g: c[i % len(c)] for g, c in GROUPS.items()}
    # the MLP head carries the head norm: use it in every row but the last
    pick["model/head"] = "linear" if i == N_ROWS - 1 else "mlp"
    if pick["model/head"] == "mlp":
        pick["model.head.norm"] = NORMS[i % len(NORMS)]
    pick["model.backbone_norm"] = BACKBONE_NORMS[i % len(BACKBONE_NORMS)]
    pick["regularization.l1"] = "1e-5" if i % 2 else "0.0"
    if pick["model.backbone_norm"] == "instancenorm":  # needs maps over 1x1 at the top
        pick["data.image_size"] = "64"
    return pick


def test_the_rows_cover_every_choice():
    rows = [row(i) for i in range(N_ROWS)]
    assert set(GROUPS["optimizer"]) == set(EXPECTED_OPTIMIZER)
    assert set(GROUPS["scheduler"]) == set(EXPECTED_SCHEDULER)
    assert {"none", "light", "strong", "cutout", "autoaugment", "mixup"} <= set(GROUPS["augment"])
    for group, options in [*GROUPS.items(), ("model.head.norm", NORMS),
                           ("model.backbone_norm", BACKBONE_NORMS)]:  # fmt: skip
        assert {r.get(group) for r in rows} >= set(options), group


@pytest.mark.parametrize("i", range(N_ROWS))
def test_every_group_choice_composes_and_trains(i, image_folder, tmp_path, make_cfg):
    pick = row(i)
    overrides = [f"{k}={v}" for k, v in pick.items()]
    cfg = make_cfg(
        *tiny_overrides(image_folder, tmp_path / "run", *overrides, "debug=fast", "test=false")
    )
    summary, objects = finetune(cfg)
    trainer, model = objects["trainer"], objects["model"]
    assert trainer.global_step > 0
    assert type(trainer.optimizers[0]) is EXPECTED_OPTIMIZER[pick["optimizer"]]
    scheduler = EXPECTED_SCHEDULER[pick["scheduler"]]
    configs = trainer.lr_scheduler_configs
    assert (not configs) if scheduler is None else isinstance(configs[0].scheduler, scheduler)
    assert model.hparams["l1"] == float(pick["regularization.l1"])
    assert (model.mixup is not None) == (pick["augment"] == "mixup")
    assert summary["fit"] in ("overfitting", "underfitting", "ok")
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_the_issue_example_composes(make_cfg, tmp_path, image_folder):
    cfg = make_cfg(
        *tiny_overrides(image_folder, tmp_path),
        "optimizer=rmsprop", "scheduler=cosine", "augment=strong", "regularization.l1=1e-5",
        "model/head=mlp", "model.head.norm=batchrenorm",
    )  # fmt: skip
    assert cfg.model.l1 == 1e-5 and cfg.model.head.norm == "batchrenorm"
    assert cfg.optimizer._target_ == "torch.optim.RMSprop"
    assert cfg.data.augment.auto_augment.startswith("rand")


def _tiny_model(**kw) -> ImageClassifier:
    return ImageClassifier("test_efficientnet", 3, image_size=32, **kw)


@pytest.mark.parametrize("name", sorted(set(EXPECTED_OPTIMIZER) - {"lbfgs"}))
def test_optimizer_config_builds_the_named_optimizer(name, make_cfg):
    cfg = make_cfg(f"optimizer={name}")
    factory = instantiate(cfg.optimizer)
    assert isinstance(factory, functools.partial)
    opt = _tiny_model(optimizer=factory).configure_optimizers()
    assert type(opt) is EXPECTED_OPTIMIZER[name]
    options = OmegaConf.to_container(cfg.optimizer)
    for key, value in options.items():
        if key.startswith("_") or key in ("lr", "weight_decay"):
            continue
        for group in opt.param_groups:
            got = group[key]
            assert (list(got) if isinstance(got, tuple) else got) == value, (name, key)
    head = next(g for g in opt.param_groups if g["name"] == "head")
    assert head["lr"] == options["lr"] and head["weight_decay"] == options["weight_decay"]
    assert all(g["weight_decay"] == 0 for g in opt.param_groups if "no_decay" in g["name"])
    assert (name == "nesterov") == any(g.get("nesterov", False) for g in opt.param_groups)
    assert (name in ("momentum", "nesterov")) == (opt.param_groups[0].get("momentum", 0) > 0)


def _sgd(*lrs: float, momentum: float = 0.0) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=momentum)


def _lrs(opt, sched, steps):
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return torch.tensor(out)


def test_cosine_warms_up_to_each_group_lr_then_decays():
    opt = _sgd(1.0, 0.1)
    lrs = _lrs(opt, cosine_with_warmup(opt, 100, warmup_fraction=0.1, min_factor=0.01), 100)
    assert lrs[0, 0] < 0.1 and lrs[:10, 0].diff().gt(0).all()
    assert lrs[:, 0].max() == pytest.approx(1.0, rel=1e-3)
    assert torch.allclose(lrs[:, 1], lrs[:, 0] * 0.1)  # layer-wise ratios kept
    assert lrs[-1, 0] == pytest.approx(0.01, abs=2e-3)


def test_one_cycle_peaks_at_each_group_lr_and_leaves_plain_sgd_momentum_alone():
    opt = _sgd(1.0, 0.5)
    lrs = _lrs(opt, one_cycle(opt, 50), 50)
    assert lrs[:, 0].max() == pytest.approx(1.0) and lrs[:, 1].max() == pytest.approx(0.5)
    assert all(g["momentum"] == 0.0 for g in opt.param_groups)
    opt = _sgd(1.0, momentum=0.9)
    one_cycle(opt, 50)
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.95)  # cycled where used


def test_step_decay_and_bad_options_name_the_value():
    opt = _sgd(1.0)
    lrs = _lrs(opt, step_decay(opt, 9, every_fraction=1 / 3, gamma=0.5), 9)
    assert lrs[:, 0].tolist() == [1.0] * 3 + [0.5] * 3 + [0.25] * 3
    with pytest.raises(ValueError, match=r"warmup_fraction=1\.5"):
        cosine_with_warmup(_sgd(1.0), 10, warmup_fraction=1.5)
    with pytest.raises(ValueError, match="gamma=2"):
        step_decay(_sgd(1.0), 10, gamma=2)
    with pytest.raises(ValueError, match="mode='up'"):
        plateau(_sgd(1.0), 10, mode="up")  # type: ignore[arg-type]


def test_plateau_steps_on_validation_epochs_with_the_stop_monitor(make_cfg):
    cfg = make_cfg("scheduler=plateau", "stop_monitor=val/loss", "stop_mode=min")
    node = instantiate(cfg.scheduler)
    assert node["monitor"] == "val/loss" and node["interval"] == "epoch"
    model = _tiny_model(optimizer=functools.partial(torch.optim.SGD, lr=0.1), scheduler=node)
    model._trainer = SimpleNamespace(check_val_every_n_epoch=3, estimated_stepping_batches=30)
    config = model.configure_optimizers()["lr_scheduler"]
    assert isinstance(config["scheduler"], ReduceLROnPlateau)
    assert config["monitor"] == "val/loss" and config["frequency"] == 3
    assert config["scheduler"].mode == "min"
