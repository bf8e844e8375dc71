"""Learning-rate schedules with one contract, ``factory(optimizer, total_steps, **options)``,
and the L-BFGS adapter (``optimizer=lbfgs``).

Hydra configs in ``conf/scheduler/`` select the schedules with ``_partial_: true``; the module
passes the optimizer and the number of optimizer steps (``trainer.estimated_stepping_batches``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

from torch.optim import LBFGS, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from transferkit.errors import ConfigError


def check_optimizer_settings(factory: Any) -> None:
    """Refuse optimizer settings torch would reject mid-run (or silently misuse) up front.

    Raises:
        ConfigError: ``lr`` not a positive finite number, negative ``weight_decay``, or
            ``momentum`` outside [0, 1).
    """
    kw = getattr(factory, "keywords", {}) or {}
    lr = kw.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                           or not 0 < lr < math.inf):  # fmt: skip
        raise ConfigError(f"optimizer.lr={lr!r} must be a positive number, e.g. optimizer.lr=1e-3.")
    if float(kw.get("weight_decay", 0.0) or 0.0) < 0:
        raise ConfigError(f"optimizer.weight_decay={kw['weight_decay']} must be >= 0.")
    if "momentum" in kw and not 0.0 <= float(kw["momentum"]) < 1.0:
        raise ConfigError(f"optimizer.momentum={kw['momentum']} must be in [0, 1).")


def _check_fraction(name: str, value: float, *, closed: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ConfigError(f"scheduler.scheduler.{name}={value} must be in {interval}.")


def cosine_with_warmup(
    optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.05, min_factor: float = 0.0
) -> LRScheduler:
    """Linear warm-up to each group's LR, then cosine decay to ``min_factor`` of it.

    Raises:
        ValueError: ``warmup_fraction`` outside [0, 1) or ``min_factor`` outside [0, 1].
    """
    _check_fraction("warmup_fraction", warmup_fraction)
    _check_fraction("min_factor", min_factor, closed=True)
    warmup = int(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = (step - warmup) / max(1, total_steps - warmup)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return LambdaLR(optimizer, factor)


def one_cycle(optimizer: Optimizer, total_steps: int, pct_start: float = 0.3) -> LRScheduler:
    """OneCycleLR peaking at each group's own LR (layer-wise LRs are kept).

    Momentum (or Adam's beta1) cycles inversely only where the optimizer uses it: plain SGD
    (momentum 0), Adagrad and RMSprop without momentum keep their settings.

    Raises:
        ValueError: ``pct_start`` outside (0, 1).
    """
    if not 0.0 < pct_start < 1.0:
        raise ConfigError(f"scheduler.scheduler.pct_start={pct_start} must be in (0, 1).")
    cycle = "betas" in optimizer.defaults or any(
        g.get("momentum", 0.0) > 0 for g in optimizer.param_groups
    )
    return OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=max(1, int(total_steps)),
        pct_start=pct_start,
        cycle_momentum=cycle,
    )


def step_decay(
    optimizer: Optimizer, total_steps: int, every_fraction: float = 0.33, gamma: float = 0.1
) -> LRScheduler:
    """Multiply every LR by ``gamma`` each ``every_fraction`` of training.

    Raises:
        ValueError: ``every_fraction`` outside (0, 1] or ``gamma`` outside (0, 1].
    """
    if not 0.0 < every_fraction <= 1.0:
        raise ConfigError(f"scheduler.scheduler.every_fraction={every_fraction} must be in (0, 1].")
    if not 0.0 < gamma <= 1.0:
        raise ConfigError(f"scheduler.scheduler.gamma={gamma} must be in (0, 1].")
    every = max(1, int(every_fraction * total_steps))
    return LambdaLR(optimizer, lambda step: gamma ** (step // every))


def plateau(
    optimizer: Optimizer,
    total_steps: int,
    factor: float = 0.1,
    patience: int = 1,
    mode: Literal["min", "max"] = "min",
) -> ReduceLROnPlateau:
    """Reduce every LR by ``factor`` when the monitored metric stops improving (per epoch).

    Raises:
        ValueError: ``factor`` outside (0, 1) or ``mode`` not ``min``/``max``.
    """
    del total_steps
    if not 0.0 < factor < 1.0:
        raise ConfigError(f"scheduler.scheduler.factor={factor} must be in (0, 1).")
    if mode not in ("min", "max"):
        raise ConfigError(f"scheduler.scheduler.mode={mode!r}; choose 'min' or 'max'.")
    return ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience)


def lbfgs(
    params: Iterable[Any],
    lr: float = 1.0,
    max_iter: int = 20,
    history_size: int = 10,
    line_search_fn: str | None = "strong_wolfe",
    weight_decay: float = 0.0,
    tolerance_grad: float = 1e-7,
    tolerance_change: float = 1e-9,
) -> LBFGS:
    """``torch.optim.LBFGS`` fed with the module's parameter groups.

    L-BFGS takes one parameter group (one learning rate) and has no weight decay; the module
    hands over a head group and, for the decay/no-decay split, a second group at the same LR.
    These are merged. Each optimizer step runs up to ``max_iter`` iterations, re-evaluating the
    loss through Lightning's closure: use it full-batch (``data.batch_size`` at least the
    training-set size), on cached features (``finetune=linear_probe``), where it is exact.

    Raises:
        ValueError: groups at different learning rates (layer-wise LRs, ``lp_ft``), or a
            weight decay; both name the fix.
    """
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    lrs = sorted({float(g.get("lr", lr)) for g in groups})
    if len(lrs) > 1:
        raise ConfigError(
            f"optimizer=lbfgs takes one learning rate, but the fine-tuning plan gives parameter "
            f"groups at {lrs}: use finetune.layer_decay=1.0 and a regime without an LR change "
            "(finetune=linear_probe or partial)."
        )
    if weight_decay or any(g.get("weight_decay", 0.0) for g in groups):
        raise ConfigError(
            "optimizer=lbfgs has no weight decay: set optimizer.weight_decay=0 (regularise with "
            "regularization.l1 or model.head.dropout instead)."
        )
    if line_search_fn not in (None, "strong_wolfe"):
        raise ConfigError(
            f"optimizer.line_search_fn={line_search_fn!r}; choose strong_wolfe or null."
        )
    merged = [p for g in groups for p in g["params"]]
    return LBFGS(
        merged,
        lr=lrs[0] if lrs else lr,
        max_iter=max_iter,
        history_size=history_size,
        line_search_fn=line_search_fn,
        tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change,
    )
