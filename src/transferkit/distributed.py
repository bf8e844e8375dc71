"""Scaling out: the LR rule for the global batch, and Hydra multirun vs re-launching DDP."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from transferkit.errors import ConfigError

log = logging.getLogger(__name__)

LR_RULES = ("none", "linear", "sqrt")


def lr_scale(rule: str, global_batch: int, reference_batch: int) -> float:
    """Factor for the LR when ``global_batch`` images make one step.

    Raises:
        ValueError: unknown rule or non-positive batch sizes.
    """
    if rule not in LR_RULES:
        raise ConfigError(f"lr_scaling.rule={rule!r}; choose one of {list(LR_RULES)}.")
    if global_batch < 1 or reference_batch < 1:
        raise ConfigError(
            f"lr_scaling needs positive batch sizes, got global {global_batch}, "
            f"reference {reference_batch}."
        )
    ratio = global_batch / reference_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def scaled_optimizer(
    factory: Callable[..., Any], lr_scaling: Mapping[str, Any] | None, global_batch: int
) -> Callable[..., Any]:
    """The optimizer partial with its ``lr`` rescaled for the global batch."""
    if not lr_scaling or lr_scaling.get("rule", "none") == "none":
        return factory
    factor = lr_scale(lr_scaling["rule"], global_batch, int(lr_scaling["reference_batch"]))
    if not isinstance(factory, functools.partial) or "lr" not in factory.keywords:
        raise ConfigError("lr_scaling needs an optimizer config with an explicit lr.")
    lr = factory.keywords["lr"] * factor
    log.info(
        "lr_scaling=%s: global batch %d vs reference %d -> lr %.3g",
        lr_scaling["rule"],
        global_batch,
        lr_scaling["reference_batch"],
        lr,
    )
    return functools.partial(factory.func, *factory.args, **{**factory.keywords, "lr": lr})


def relaunching_strategy(trainer_cfg: Mapping[str, Any]) -> bool:
    """Whether Lightning will start the other ranks by re-running the command line."""
    strategy = str(trainer_cfg.get("strategy", "auto"))
    devices = trainer_cfg.get("devices", "auto")
    many = devices in (-1, "-1") or (isinstance(devices, int) and devices > 1)
    many = many or (isinstance(devices, (list, tuple)) and len(devices) > 1)
    many = many or int(trainer_cfg.get("num_nodes", 1)) > 1
    return many and strategy.startswith("ddp") and "spawn" not in strategy


def check_multirun(trainer_cfg: Mapping[str, Any], multirun: bool, launcher: str = "") -> None:
    """Refuse ``hydra -m`` with a re-launching DDP strategy before anything starts.

    The ranks Lightning re-launches would each start the whole sweep again in the wrong run
    directory. ``ddp_spawn`` starts ranks inside the job and combines with multirun, and so
    does a launcher that runs each job as its own cluster job (submitit on SLURM: SLURM
    starts the ranks, and Lightning does not re-launch).

    Raises:
        ValueError: with the two ways around.
    """
    if launcher.endswith("SlurmLauncher"):  # submitit's local launcher does re-launch
        return
    if multirun and relaunching_strategy(trainer_cfg):
        raise ConfigError(
            f"hydra -m (multirun) cannot combine with trainer.strategy="
            f"{trainer_cfg.get('strategy')}: its extra processes re-run the command line. Use "
            "trainer.strategy=ddp_spawn (or trainer=ddp_spawn_cpu) for sweeps, or run each "
            "configuration as its own command (a shell loop over the values), or send the "
            "sweep to a cluster (hydra/launcher=slurm)."
        )
