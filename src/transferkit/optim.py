"""Learning-rate schedules with one contract: ``factory(optimizer, total_steps, **options)``.

Hydra configs in ``conf/scheduler/`` select them with ``_partial_: true``; the module passes
the optimizer and the number of optimizer steps (``trainer.estimated_stepping_batches``).
"""

from __future__ import annotations

import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau


def _check_fraction(name: str, value: float, *, closed: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"scheduler.scheduler.{name}={value} must be in {interval}.")


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
        raise ValueError(f"scheduler.scheduler.pct_start={pct_start} must be in (0, 1).")
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
        raise ValueError(f"scheduler.scheduler.every_fraction={every_fraction} must be in (0, 1].")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"scheduler.scheduler.gamma={gamma} must be in (0, 1].")
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
        raise ValueError(f"scheduler.scheduler.factor={factor} must be in (0, 1).")
    if mode not in ("min", "max"):
        raise ValueError(f"scheduler.scheduler.mode={mode!r}; choose 'min' or 'max'.")
    return ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience)
