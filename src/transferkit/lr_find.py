"""``transferkit-lr-find`` / ``make lr-find``: the learning-rate range test (Smith, 2017).

Builds the configured model and data exactly like ``finetune`` (same plan, same frozen
blocks), runs Lightning's ``Tuner.lr_find`` and writes ``lr_find.png`` (loss against LR) and
``lr_find.json`` (the suggestion and the curve) to the run directory. ``tune.lr_find=true``
runs the same test inside ``finetune`` and trains with the suggested LR.

Every optimizer group carries its own LR derived from ``optimizer.lr`` (the head's LR; blocks
get ``lr · layer_decay ** depth``). During the sweep Lightning sets every group to the same
swept value; the suggestion then becomes ``optimizer.lr``, from which the groups' LRs are
derived again.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from transferkit.cli import CONFIG_DIR, run_cli
from transferkit.errors import ConfigError
from transferkit.finetune import build
from transferkit.io import atomic_write_bytes, write_json

log = logging.getLogger("transferkit")


def base_lr(model: L.LightningModule) -> float:
    """The optimizer's configured base LR (``optimizer.lr``)."""
    factory = getattr(model, "optimizer_factory", None)
    return float(getattr(factory, "keywords", {}).get("lr", 1e-3))


def set_base_lr(model: L.LightningModule, lr: float) -> None:
    """Make ``lr`` the optimizer's base LR (``optimizer.lr``) for the next ``configure_optimizers``.

    Raises:
        ValueError: ``lr`` is not a positive finite number.
        TypeError: the model's optimizer is not a ``functools.partial`` (a Hydra ``_partial_``).
    """
    if not (lr > 0 and lr < float("inf")):
        raise ConfigError(f"learning rate {lr!r} must be a positive finite number.")
    factory = getattr(model, "optimizer_factory", None)
    if not isinstance(factory, functools.partial):
        raise ConfigError(
            f"the model's optimizer is {factory!r}, not a partial; configure it with "
            "`_partial_: true` (see conf/optimizer/)."
        )
    model.optimizer_factory = functools.partial(  # type: ignore[assignment]
        factory.func, *factory.args, **{**factory.keywords, "lr": float(lr)}
    )


def run_lr_find(objects: dict[str, Any], tune: Any) -> dict[str, Any]:
    """Run the range test on built objects; the model's weights are restored afterwards.

    Args:
        objects: ``build``'s result (``trainer``, ``model``, ``datamodule``).
        tune: the ``tune`` config node (``min_lr``, ``max_lr``, ``num_training``,
            ``early_stop_threshold``).

    Returns:
        ``suggestion`` (steepest descent per decade of the bias-corrected smoothed loss;
        None when the curve is too short), ``lightning_suggestion``, ``configured_lr`` and
        the curve.

    Raises:
        ValueError: ``min_lr``/``max_lr``/``num_training`` out of range.
    """
    min_lr, max_lr = float(tune.min_lr), float(tune.max_lr)
    num_training = int(tune.num_training)
    if not 0 < min_lr < max_lr:
        raise ConfigError(
            f"tune.min_lr={min_lr} and tune.max_lr={max_lr} need 0 < min_lr < max_lr."
        )
    if num_training < 20:
        raise ConfigError(
            f"tune.num_training={num_training} is too few steps for a suggestion (it skips "
            "the first 10); use 50 or more."
        )
    trainer, model = objects["trainer"], objects["model"]
    # The sweep is num_training steps whatever the epoch budget (a small data set has few
    # steps per epoch); Lightning only bounds the steps.
    max_epochs, trainer.fit_loop.max_epochs = trainer.fit_loop.max_epochs, -1
    try:
        finder = Tuner(trainer).lr_find(
            model,
            datamodule=objects.get("fit_datamodule", objects["datamodule"]),  # features if cached
            min_lr=min_lr,
            max_lr=max_lr,
            num_training=num_training,
            early_stop_threshold=tune.get("early_stop_threshold"),
            update_attr=False,
        )
    finally:
        trainer.fit_loop.max_epochs = max_epochs
    if finder is None:  # fast_dev_run
        return {"suggestion": None, "configured_lr": base_lr(model), "lr": [], "loss": []}
    lightning_suggestion = finder.suggestion()
    lrs = [float(v) for v in finder.results["lr"]]
    losses = unbias(finder.results["loss"])
    return {
        "suggestion": steepest_descent(lrs, losses),
        "lightning_suggestion": lightning_suggestion,
        "configured_lr": base_lr(model),
        "min_lr": min_lr,
        "max_lr": max_lr,
        "steps": len(lrs),
        "lr": lrs,
        "loss": losses,
    }


def unbias(smoothed: list[float], beta: float = 0.98) -> list[float]:
    """Redo the bias correction of Lightning's smoothed loss (a sweep from step 0).

    Lightning 2.x divides the moving average of step ``t`` by ``1 − β^(t+2)`` (it reads
    ``global_step`` after the step), not ``1 − β^(t+1)``: its first points are about half
    the true loss, which draws a false rise at the smallest LRs.
    """
    return [
        float(s) * (1 - beta ** (t + 2)) / (1 - beta ** (t + 1)) for t, s in enumerate(smoothed)
    ]


def steepest_descent(
    lrs: list[float], losses: list[float], skip_begin: int = 10, skip_end: int = 1
) -> float | None:
    """The LR where the smoothed loss falls fastest per decade (gradient over log10 LR).

    Lightning's own suggestion differentiates over the LR itself, where the dense small LRs
    of an exponential sweep turn noise into steep slopes; it is kept in the JSON as
    ``lightning_suggestion``. None when fewer than 3 finite points remain.
    """
    lo, hi = skip_begin, len(lrs) - skip_end
    keep = [i for i in range(lo, hi) if math.isfinite(losses[i])]
    if len(keep) < 3:
        return None
    x = torch.tensor([math.log10(lrs[i]) for i in keep], dtype=torch.float64)
    y = torch.tensor([losses[i] for i in keep], dtype=torch.float64)
    return lrs[keep[int(torch.gradient(y, spacing=[x])[0].argmin())]]


@rank_zero_only
def save_lr_find(out_dir: Path, result: dict[str, Any]) -> None:
    """Write ``lr_find.json`` and ``lr_find.png`` (loss against LR, log axis, suggestion)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(out_dir / "lr_find.json", result)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.plot(result["lr"], result["loss"], color="tab:blue", label="training loss (smoothed)")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (base, every group)")
    ax.set_ylabel("loss")
    ax.axvline(result["configured_lr"], color="grey", ls="--", label="configured optimizer.lr")
    if result["suggestion"] is not None:
        i = result["lr"].index(result["suggestion"])
        ax.plot(
            [result["suggestion"]], [result["loss"][i]], "o", color="tab:red", markersize=8,
            label=f"suggestion {result['suggestion']:.2e} (steepest descent)",
        )  # fmt: skip
    ax.set_title("learning-rate range test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out_dir / "lr_find.png", buf.getvalue())


def tune_lr(cfg: DictConfig, objects: dict[str, Any]) -> dict[str, Any]:
    """Range test on built objects, files written, suggestion applied as ``optimizer.lr``.

    Returns:
        ``suggestion``, ``configured_lr`` and ``applied`` (the LR training will use).
    """
    result = run_lr_find(objects, cfg.tune)
    save_lr_find(Path(cfg.paths.output_dir), result)
    applied = result["configured_lr"]
    if result["suggestion"] is None:
        log.warning("LR finder gave no suggestion; keeping optimizer.lr=%g", applied)
    else:
        applied = result["suggestion"]
        set_base_lr(objects["model"], applied)
        log.info("LR finder: optimizer.lr %g -> %g", result["configured_lr"], applied)
    return {k: result[k] for k in ("suggestion", "configured_lr")} | {"applied": applied}


def lr_find(cfg: DictConfig) -> dict[str, Any]:
    """Build like ``finetune``, run the range test, write the plot and the JSON."""
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    objects = build(cfg)
    result = run_lr_find(objects, cfg.tune)
    out_dir = Path(cfg.paths.output_dir)
    save_lr_find(out_dir, result)
    print(
        f"\nLR finder: suggestion {result['suggestion']} (configured optimizer.lr "
        f"{result['configured_lr']:g}); written to {out_dir}/lr_find.png and lr_find.json\n"
        f'apply it: make finetune ARGS="optimizer.lr={result["suggestion"]}" '
        "or tune.lr_find=true"
    )
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    return run_cli(lambda: lr_find(cfg))["suggestion"]


if __name__ == "__main__":
    main()
