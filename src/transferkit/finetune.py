"""``transferkit-finetune`` / ``make finetune``: the Hydra entry point.

``finetune(cfg)`` does the wiring (seed, instantiate, plan, fit, test, summarize) and returns
the summary and the objects, so tests and sweeps call it in-process.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
)
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from transferkit import preemption
from transferkit.caching import CachedFeatureDataModule, cache_decision
from transferkit.callbacks.compile_watch import CompileWatch
from transferkit.callbacks.fit_diagnosis import FitDiagnosis
from transferkit.callbacks.history import History
from transferkit.callbacks.speed import TrainSpeed
from transferkit.checkpoint_io import check_resume, early_stopped_epochs
from transferkit.cli import CONFIG_DIR, run_cli
from transferkit.data.balance import AUTO_RATIO, imbalance_ratio
from transferkit.distributed import check_multirun, scaled_optimizer
from transferkit.errors import ConfigError, MissingPackageError
from transferkit.io import write_json
from transferkit.models.finetuning import trainable_names
from transferkit.models.multilabel import resolve_task, tune_and_store_thresholds
from transferkit.optim import check_optimizer_settings
from transferkit.policy import resolve_plan
from transferkit.report import budget_text, write_run_report
from transferkit.trust import TargetPolicy, config_targets

log = logging.getLogger("transferkit")


VALIDATIONS_PER_RUN = 10


def validation_interval(epochs: int) -> int:
    """Validate about ``VALIDATIONS_PER_RUN`` times, every N epochs with N dividing the
    budget, so that the last epoch is validated (and can become the best checkpoint)."""
    every = max(1, epochs // VALIDATIONS_PER_RUN)
    while epochs % every:
        every -= 1
    return every


def check_trainer_settings(trainer_cfg: dict[str, Any]) -> None:
    """Refuse trainer settings that cannot work, before anything is built.

    Raises:
        ConfigError: names the setting and the fix.
    """
    for key in ("max_epochs", "check_val_every_n_epoch"):
        value = trainer_cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):  # fmt: skip
            raise ConfigError(
                f"trainer.{key}={value!r}: give a positive whole number, or null for the "
                "fine-tuning plan's budget."
            )
    if trainer_cfg.get("sync_batchnorm"):
        raise ConfigError(
            "trainer.sync_batchnorm=true uses torch's converter, which drops the activation "
            "timm fuses into its BatchNorm layers (BatchNormAct2d). Use "
            "model.backbone_norm=syncbn instead, which converts them keeping it."
        )


def _objective(cfg: DictConfig, dm: Any, model: Any) -> None:
    """Weigh the loss for imbalanced classes (``data.balance=weighted_loss``; the sampler is
    the DataModule's) and make ``monitor: auto`` concrete: ``val/map`` for multi-label,
    ``val/f1_macro`` for imbalanced classes, else ``val/acc``.

    Raises:
        ConfigError: a ``monitor`` the task does not log.
    """
    ratio = imbalance_ratio(dm.per_class())
    if dm.balance_mode == "weighted_loss":
        model.set_class_weights(dm.class_weights())
    if cfg.monitor == "auto":
        cfg.monitor = ("val/map" if model.multilabel else
                       "val/f1_macro" if ratio > AUTO_RATIO else "val/acc")  # fmt: skip
    logged = model.monitorable()
    for key, mode_key in (("monitor", "mode"), ("stop_monitor", "stop_mode")):
        name, mode = cfg.get(key), cfg.get(mode_key)
        if name is None:
            continue
        if name not in logged:
            raise ConfigError(
                f"{key}={name!r} is not logged for this task; choose one of "
                f"{logged}" + (" (or monitor=auto)." if key == "monitor" else ".")
            )
        wanted = "min" if name.endswith("loss") else "max"
        if mode != wanted:
            raise ConfigError(
                f"{key}={name} with {mode_key}={mode} would keep the worst "
                f"epoch: set {mode_key}={wanted}."
            )
    if dm.balance_mode == "sampler" and dm.augment.get("no_aug") and model.mixup is None:
        weights = dm.class_weights()  # an image of class c is drawn about w[c] times an epoch
        log.warning(
            "data.balance=sampler draws each image of the rarest class about %.0f times an "
            "epoch, and augment=none makes every copy the same: on 100:1 Animal-MNIST that "
            "overfit (macro-F1 below data.balance=none; README, Real-world labels). Use "
            "augment=light with the sampler, or data.balance=weighted_loss.",
            float(weights.max()) if weights is not None else 1.0,
        )
    if ratio > AUTO_RATIO:
        log.info(
            "imbalanced classes: the largest has %.0fx the images of the smallest; balance: "
            "%s (data.balance=%s), monitor: %s",
            ratio, dm.balance_mode, dm.balance, cfg.monitor,
        )  # fmt: skip


def _without_validation(cfg: DictConfig, trainer_cfg: dict[str, Any], callbacks: list) -> list:
    """Train with no validation split (``data.val_fraction=0``): nothing watches a
    validation metric, and the last epoch's weights are the ones tested and kept.

    Raises:
        ConfigError: a setting that needs validation (plateau triggers and schedulers).
    """
    fix = "set data.val_fraction > 0 (or add a val/ folder)"
    if cfg.finetune.get("trigger") == "plateau":
        raise ConfigError(
            f"finetune.trigger=plateau waits for the validation loss, but there are no "
            f"validation images: {fix}, or use finetune.trigger=epochs."
        )
    if (cfg.get("scheduler") or {}).get("monitor"):
        raise ConfigError(
            f"scheduler={cfg.scheduler.get('monitor')!r}-monitoring schedulers need validation "
            f"images, and there are none: {fix}, or pick another scheduler (e.g. cosine)."
        )
    trainer_cfg.update(limit_val_batches=0, num_sanity_val_steps=0)
    kept = [
        c for c in callbacks
        if not isinstance(c, EarlyStopping)
        and not (isinstance(c, ModelCheckpoint) and c.monitor is not None)
    ]  # fmt: skip
    log.warning(
        "no validation images (data.val_fraction=0): no early stopping and no best "
        "checkpoint; training runs its whole budget and the last weights are tested"
    )
    return kept


def _instantiate_trainer(trainer_cfg: dict[str, Any], callbacks: list, loggers: list) -> Any:
    """The Trainer; Lightning's refusal of a setting (devices, precision, strategy) is the
    user's mistake here and becomes a one-line ConfigError."""
    try:
        return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    except Exception as e:
        cause = _cause_of(e, MisconfigurationException)
        if cause is None:
            raise
        raise ConfigError(f"the trainer settings do not work here: {cause}") from e


def build(cfg: DictConfig, datamodule: Any = None) -> dict[str, Any]:
    """Data, model (with its plan), callbacks, loggers and trainer from a composed config;
    ``datamodule``: one built from the same ``cfg.data`` to reuse (its decoded images)."""
    check_multirun(cfg.trainer, _hydra_mode() == "MULTIRUN", _hydra_launcher())
    dm = datamodule if datamodule is not None else instantiate(cfg.data)
    dm.setup("fit")
    counts = dm.counts()
    optimizer = instantiate(cfg.optimizer)
    check_optimizer_settings(optimizer)
    model = instantiate(
        cfg.model,
        num_classes=dm.num_classes,
        class_names=dm.classes,
        task=resolve_task(cfg.get("task", "auto"), dm.multilabel),
        optimizer=optimizer,
        scheduler=instantiate(cfg.scheduler),
        _recursive_=False,
    )
    _objective(cfg, dm, model)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [_instantiate_logger(k, c) for k, c in (cfg.get("logger") or {}).items()]
    if not loggers:  # the LR monitor needs a logger; with logger=none there is nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer_cfg: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    if not trainer_cfg.get("enable_progress_bar", True):  # one switch turns the bar off
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    check_trainer_settings(trainer_cfg)
    if not len(dm.splits.get("val", ())):
        callbacks = _without_validation(cfg, trainer_cfg, callbacks)
    user_epochs = trainer_cfg.get("max_epochs")
    user_every = trainer_cfg.get("check_val_every_n_epoch")
    # The plan's budget needs the number of devices, which the trainer resolves ("auto",
    # -1, a list): build it first, then give it the budget.
    trainer_cfg.update(max_epochs=user_epochs or 1, check_val_every_n_epoch=user_every or 1)
    requested_precision = trainer_cfg.get("precision", "32-true")
    if str(requested_precision) == "auto":  # measured below, once the plan is applied
        trainer_cfg["precision"] = "32-true"
    trainer = _instantiate_trainer(trainer_cfg, callbacks, loggers)

    finetune_cfg = OmegaConf.to_container(cfg.finetune, resolve=True)
    plan = resolve_plan(
        finetune_cfg,  # type: ignore[arg-type]
        counts,
        model.num_blocks,
        dm.batch_size,
        max_epochs=user_epochs,
        world_size=trainer.world_size,
        accumulate=trainer.accumulate_grad_batches,
        budget_rules=budget_rules(cfg),
    )
    resume_from = None  # finetune=auto: the race's winner goes on from its checkpoint
    if finetune_cfg.get("regime") == "auto" and finetune_cfg.get("race"):  # type: ignore[union-attr]
        plan, resume_from = _measure_depth(cfg, plan, counts, dm, trainer)
    model.set_plan(plan)
    dm.set_preprocessing(model.preprocessing)
    log.info("fine-tuning plan: %s", plan.reason)
    precision = _choose_precision(requested_precision, cfg.model.get("channels_last"), model,
                                  dm, trainer)  # fmt: skip
    if precision.precision != trainer_cfg["precision"]:
        trainer_cfg["precision"] = precision.precision
        trainer = _instantiate_trainer(trainer_cfg, callbacks, loggers)
    b = plan.budget
    log.info("budget: %s", budget_text(b))
    trainer.fit_loop.max_epochs = b["epochs"]
    trainer.check_val_every_n_epoch = user_every or validation_interval(b["epochs"])
    measured = plan.measured or {}
    # finetune=auto: early stopping ended the winner's race run, as the fixed run would have
    # ended: going on trains nothing more (Lightning does not keep the stop in a checkpoint).
    # Resuming the run's last.ckpt later is capped as any resume is (_keep_early_stop).
    stopped = measured.get("stopped_epochs") if resume_from else None
    if stopped:
        trainer.fit_loop.max_epochs = min(b["epochs"], int(stopped))
    late = [e for e, _ in plan.schedule if e >= trainer.max_epochs]
    if late and plan.trigger == "epochs":
        log.warning(
            "the %s schedule steps at epochs %s fall outside the %d-epoch budget and will not "
            "happen; raise trainer.max_epochs or shorten the schedule",
            plan.regime,
            late,
            trainer.max_epochs,
        )
    fit_dm, cache = _feature_cache(cfg, dm, model, plan)
    # data.batch_size is per device; the LR rule (if any) follows the global batch
    model.optimizer_factory = scaled_optimizer(
        model.optimizer_factory, cfg.get("lr_scaling"), dm.batch_size * trainer.world_size
    )
    return {
        "datamodule": dm,
        "fit_datamodule": fit_dm,
        "feature_cache": cache,
        "model": model,
        "plan": plan,
        "precision": precision,
        "trainer": trainer,
        "resume_from": resume_from,
    }


def _measure_depth(cfg: DictConfig, plan: Any, counts: dict[str, int], dm: Any,
                   trainer: Any) -> tuple[Any, str | None]:  # fmt: skip
    """``finetune=auto``: the table's plan with the depth the race measured (or the one a
    resumed checkpoint or rank 0 holds), and the checkpoint of the race's winner to go on
    from (or None); see ``transferkit.autodepth``."""
    from transferkit import autodepth
    from transferkit.policy import epochs_for_steps, steps_per_epoch, with_depth

    accumulate = trainer.accumulate_grad_batches

    def epochs_of(steps: int) -> int:  # a candidate runs on one device
        return epochs_for_steps(steps, counts["train_size"], dm.batch_size, 1, accumulate)

    if not len(dm.splits.get("val", ())) and not cfg.get("ckpt_path"):
        raise ConfigError(
            "finetune=auto races candidate depths on the validation split, and this run has "
            "none: set data.val_fraction > 0 (or add a val/ folder), or choose the depth "
            "(finetune=table, or finetune=partial finetune.trainable_blocks=N)."
        )
    log.info("fine-tuning plan (the table's prior): %s", plan.reason)
    decision = autodepth.decide(
        cfg,
        plan.total_blocks,
        plan.trainable_blocks,
        int(plan.budget["steps"]),
        epochs_of,
        datamodule=dm,
        world_size=trainer.world_size,
        external=_shared_timing_impossible(trainer),
        steps_per_epoch=steps_per_epoch(counts["train_size"], dm.batch_size, 1, accumulate),
        rule=plan.rule,
    )
    plan = with_depth(plan, decision.blocks, decision.as_dict(), decision.reason)
    return plan, decision.resume_from


def budget_rules(cfg: DictConfig) -> list[Any]:
    """The table a fixed regime takes its step budget from: ``finetune.rules`` when the
    config has them, else the shipped ``finetune=table`` rows."""
    rules: Any = cfg.finetune.get("rules")
    if rules is None:
        table: Any = OmegaConf.load(Path(CONFIG_DIR) / "finetune" / "table.yaml")
        rules = table.get("rules")
    return list(OmegaConf.to_container(rules, resolve=True) or [])


def _shared_timing_impossible(trainer: Any) -> str | None:
    """Why the processes of this run could not share rank 0's timing, if they could not:
    several nodes, processes another launcher starts (torchrun, SLURM), or forked workers
    (CUDA must not be used before a fork)."""
    if trainer.world_size <= 1:
        return None
    if trainer.num_nodes > 1:
        return f"{trainer.num_nodes} nodes"
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is not None and env.creates_processes_externally:  # (Lightning's own children
        # take rank 0's choice before this matters: see precision.resolve)
        return "processes started by an outside launcher (torchrun, srun)"
    if getattr(trainer.strategy, "_start_method", None) == "fork":
        return "forked processes (ddp_fork, ddp_notebook)"
    return None


def _choose_precision(requested: Any, channels_last: Any, model: Any, dm: Any, trainer: Any) -> Any:
    """``trainer.precision`` and ``model.channels_last``, ``auto`` measured on the model as
    planned (see ``transferkit.precision``); the model is switched to the chosen layout."""
    from lightning.pytorch.accelerators import CUDAAccelerator

    from transferkit import precision as P

    cuda = isinstance(trainer.accelerator, CUDAAccelerator)
    device = trainer.strategy.root_device
    size = int(dm.image_size)

    def timer(setting: P.Setting) -> float:
        return P.time_steps(model, setting, dm.batch_size, size, device)

    choice = P.resolve(
        requested,
        channels_last,
        cuda=cuda,
        world_size=trainer.world_size,
        bf16=torch.cuda.is_bf16_supported,
        timer=timer,
        external=_shared_timing_impossible(trainer),
    )
    if model.hparams.get("compile"):  # the probe's copies must not count against the limit
        torch._dynamo.reset()
    model.set_channels_last(choice.channels_last)
    log.info("precision: %s (%s)", P.label((choice.precision, choice.channels_last)), choice.reason)
    return choice


def _feature_cache(cfg: DictConfig, dm: Any, model: Any, plan: Any) -> tuple[Any, str]:
    """The DataModule to fit on: cached frozen-prefix outputs when that is exact, else ``dm``."""
    trainable = trainable_names(model.blocks, plan.max_trainable, model._bn_params, plan.bn_mode)
    split, why = cache_decision(
        cfg.finetune.get("cache_features", "auto"),
        plan,
        model.backbone,
        trainable,
        augment=dm.augment,
        mixup=getattr(model, "mixup", None) is not None,
    )
    log.info("feature caching: %s", why)
    if split is None:
        return dm, why
    model.use_cached_features(split)
    budget = float(cfg.finetune.get("cache_memory_gb", 4.0))
    return CachedFeatureDataModule(dm, split, budget, Path(cfg.paths.output_dir) / "cache"), why


def _plain(cfg: DictConfig) -> Any:
    """The config as plain containers, interpolations left unresolved."""
    return OmegaConf.to_container(cfg, resolve=False)


def _hydra_launcher() -> str:
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().launcher.get("_target_", "")) if HydraConfig.initialized() else ""


def _hydra_mode() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    mode = HydraConfig.get().mode if HydraConfig.initialized() else None
    return mode.name if mode is not None else None


def _cause_of(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in the chain of causes of ``error``, if any."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, kind):
        cause = cause.__cause__
    return cause


def _instantiate_logger(name: str, node: DictConfig) -> Any:
    """A logger; a missing optional package (wandb, mlflow, ...) is a user error."""
    try:
        return instantiate(node)
    except Exception as e:
        cause = _cause_of(e, ModuleNotFoundError)
        if cause is None:
            raise
        raise MissingPackageError(
            f"logger={name} needs a package that is not installed ({cause}). Install it with "
            f"pip install 'transferkit[loggers]' (or pip install {name}), or use logger=csv."
        ) from e


def _keep_early_stop(ckpt: dict[str, Any], ckpt_path: str, trainer: Any) -> None:
    """Resuming a run early stopping had ended trains nothing more: its result stays. Only
    a stop the resumed run's early stopping inherits counts (Lightning restores a callback's
    state by its key): without early stopping, or monitoring another metric, it trains on."""
    keys = {cb.state_key for cb in trainer.callbacks if isinstance(cb, EarlyStopping)}
    stop = early_stopped_epochs(ckpt, keys)
    loop = trainer.fit_loop
    if stop is None:
        return
    if loop.min_steps and int(ckpt.get("global_step") or 0) < loop.min_steps:
        return  # Lightning trains on after a stop until min_steps
    epochs = max(stop[0], loop.min_epochs or 0)  # and until min_epochs
    if int(ckpt.get("epoch") or 0) >= epochs:  # the saved epoch's index; the stop's is below
        return  # saved later: a resume before this rule trained on past the stop
    loop.max_epochs = min(loop.max_epochs, epochs)
    log.info(
        "early stopping ended this run after %d epochs (%s): resuming from %s trains no "
        "more. To train on from it, resume with ~callbacks.early_stopping (Lightning "
        "restores the patience it ran out), and a larger trainer.max_epochs to go past its "
        "budget.",
        epochs,
        stop[1],
        ckpt_path,
    )


def _early_stop_result(trainer: Any) -> dict[str, Any] | None:
    """Whether early stopping ended the fit, after how many epochs and why; None without
    early stopping. Read before testing: restoring the best checkpoint for the test restores
    the callbacks' state too, and the best came before the stop (patience checks later)."""
    stoppers = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
    if not stoppers:
        return None
    for stopper in stoppers:
        if stopper.stopping_reason == EarlyStoppingReason.NOT_STOPPED:
            continue
        # Lightning never clears a stop: with min_epochs the run went on to it, and a run
        # resumed past a stop (before _keep_early_stop) ended elsewhere
        after = max(stopper.stopped_epoch + 1, trainer.fit_loop.min_epochs or 0)
        if after == trainer.current_epoch:
            return {"monitor": stopper.monitor, "stopped": True, "after_epochs": after,
                    "reason": stopper.stopping_reason.name.lower()}  # fmt: skip
    return {"monitor": stoppers[0].monitor, "stopped": False, "after_epochs": None,
            "reason": None}  # fmt: skip


def finetune(cfg: DictConfig, datamodule: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit, test the best checkpoint, write ``summary.json``; return (summary, objects).
    ``datamodule``: one built from the same ``cfg.data`` to reuse (see :func:`build`)."""
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    if cfg.finetune.get("regime") == "auto" and cfg.finetune.get("race"):
        from transferkit.autodepth import check_settings

        check_settings(cfg)  # before anything is built, resumed or not
    objects = build(cfg, datamodule)
    dm, model, plan, trainer = (objects[k] for k in ("datamodule", "model", "plan", "trainer"))
    fit_dm = objects["fit_datamodule"]  # dm itself, or its cached frozen-prefix features
    out_dir = Path(cfg.paths.output_dir)

    if cfg.get("ckpt_path"):  # the targets this run's config names are the user's own
        policy = TargetPolicy.from_config(cfg, also=config_targets(_plain(cfg)))
        order = {"batch_per_device": dm.batch_size, "devices": trainer.world_size, "seed": dm.seed}
        ckpt = check_resume(cfg.ckpt_path, cfg.model.backbone, dm.classes, policy, order)
        _keep_early_stop(ckpt, cfg.ckpt_path, trainer)
        del ckpt
    go_on = objects.get("resume_from")  # finetune=auto's winner, from its last race round
    resuming = bool(cfg.get("ckpt_path") or go_on)  # in its own folder: checkpoints are there
    if resuming:
        _keep_earlier_metrics(trainer)  # before Lightning's CSV logger deletes it
    lr_find = None
    if cfg.get("tune") and cfg.tune.get("lr_find"):  # range test, then train at its suggestion
        from transferkit.lr_find import tune_lr

        lr_find = tune_lr(cfg, objects)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            if resuming:  # expected checkpoints, and no log left to delete (moved aside)
                warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
                warnings.filterwarnings("ignore", "Experiment logs directory .* exists and is not")
            trainer.fit(model, datamodule=fit_dm, ckpt_path=cfg.get("ckpt_path") or go_on)
    finally:
        if go_on:
            _settle_race_state(Path(go_on), trainer, model)
    # A SIGTERM that came after Lightning's last look at it (fit was ending): stop before
    # testing rather than run on, since test() starts with Lightning's flag cleared.
    preemption.check()
    fit_seconds = time.perf_counter() - start
    # Before testing: restoring the best checkpoint also restores the callbacks' state.
    fit = next((c.result() for c in trainer.callbacks if isinstance(c, FitDiagnosis)), None)
    history = next((c.rows for c in trainer.callbacks if isinstance(c, History)), None)
    early_stop = _early_stop_result(trainer)
    speed = next((c for c in trainer.callbacks if isinstance(c, TrainSpeed)), None)
    # and the training so far: a resumed run's speed and seconds are the whole run's (also
    # one Lightning requeued on SLURM, from its own checkpoint; 0 for a new run)
    images_per_second = round(speed.images_per_second, 1) if speed else None
    if speed:
        fit_seconds += speed.earlier_fit_seconds

    checkpoint = trainer.checkpoint_callback
    best_path = getattr(checkpoint, "best_model_path", "") or None
    if (
        best_path
        and checkpoint.dirpath
        and (os.path.realpath(Path(best_path).parent) != os.path.realpath(checkpoint.dirpath))
    ):
        # restored from a checkpoint written elsewhere (finetune=auto's race) and never
        # bettered here: not this run's file; test the weights as they are
        best_path = None
    best_score = getattr(checkpoint, "best_model_score", None)
    if model.multilabel and best_path and len(dm.splits.get("val", ())):
        tune_and_store_thresholds(model, fit_dm.val_dataloader(), best_path, out_dir, trainer)
    test_metrics: dict[str, float] = {}
    if cfg.get("test", True) and len(dm.splits.get("test", ())):
        results = trainer.test(model, datamodule=fit_dm, ckpt_path=best_path, verbose=False)
        test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    model.use_cached_features(None)  # from here on (report, predictions) the model sees images

    watch = next((c for c in trainer.callbacks if isinstance(c, CompileWatch)), None)
    summary: dict[str, Any] = {
        "backbone": cfg.model.backbone,
        "num_classes": dm.num_classes,
        "train_size": len(dm.splits["train"]),
        "val_size": len(dm.splits.get("val", ())),
        "test_size": len(dm.splits.get("test", ())),
        "trainable_blocks": max(model.current_trainable, plan.trainable_blocks),  # reached
        "total_blocks": plan.total_blocks,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "epochs": trainer.current_epoch,
        "global_steps": trainer.global_step,
        # the best checkpoint's score, when it is chosen by val/acc (else see objective)
        "best_val_acc": None
        if best_score is None or cfg.monitor != "val/acc"
        else float(best_score),
        # what sweeps optimise: the best validation value of `monitor`, never a test metric
        "objective": {
            "name": cfg.monitor,
            "mode": cfg.mode,
            "value": None if best_score is None else float(best_score),
        },
        "test_acc": test_metrics.get("test/acc"),
        "test_loss": test_metrics.get("test/loss"),
        "test_acc_top5": test_metrics.get("test/acc_top5"),
        "test_f1_macro": test_metrics.get("test/f1_macro"),
        "test_map": test_metrics.get("test/map"),
        "task": "multilabel" if model.multilabel else "multiclass",
        "test_balanced_acc": test_metrics.get("test/balanced_acc"),
        "balance": dm.balance_mode,
        "precision": objects["precision"].as_dict(),
        "compile": watch and {"mode": model.hparams["compile"], **watch.as_dict()},
        "fit_seconds": round(fit_seconds, 2),  # a resumed run's: up to its checkpoint too
        "train_images_per_second": images_per_second,
        "best_checkpoint": best_path,
        "feature_cache": objects["feature_cache"],
        "fit": fit and fit["fit"],  # overfitting | underfitting | ok (FitDiagnosis callback)
        "fit_evidence": fit and fit["evidence"],
        "lr_find": lr_find,
        "history": history,  # learning curves per epoch (History callback)
        "early_stopping": early_stop,  # None: no early stopping in this run
        "plan": {
            **{k: plan.as_dict()[k] for k in ("regime", "trainable_blocks", "total_blocks")},
            "rule": plan.rule,
            "measured": plan.measured,
            "schedule": plan.as_dict()["schedule"],
            "budget": plan.budget,
            "reason": plan.reason,
            **plan.counts,
        },
    }
    _write_summary(out_dir, summary)
    if cfg.get("report", True):
        write_run_report(cfg, summary, objects)
    return summary, objects


def _settle_race_state(state: Path, trainer: L.Trainer, model: Any) -> None:
    """After the final run of ``finetune=auto``'s winner, which went on from ``state`` (its
    race checkpoint, adopted into this run). A winner early stopping had ended trains
    nothing more, and a run stopped (SIGTERM, an error) before its first step, or before
    the state was restored, trained nothing either. No epoch ended, so the run's ``last``
    checkpoint (the state to resume from) was not written, or is a stale file of an earlier
    run in the folder. ``state`` is the run's state then, its callbacks' folders already
    this run's and its model's hyperparameters this run's too: with this run's plan, which
    holds the decision a resume takes, it becomes that file. Then ``state`` is deleted. The
    race's best checkpoint, if the run never bettered it, gets this run's plan too. (Only on
    one device: the race goes on from its checkpoints only there.)"""
    import io

    from transferkit.io import atomic_write_bytes

    def restamp(ckpt: dict[str, Any], *paths: Path) -> None:
        model.on_save_checkpoint(ckpt)  # the race candidate's plan → this run's
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        for path in paths:
            atomic_write_bytes(path, buf.getvalue())

    mine = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    lasts = dict.fromkeys(  # unmonitored checkpoints of one fixed name: the state at the end
        Path(cb.dirpath) / f"{cb.filename}{cb.FILE_EXTENSION}"
        for cb in mine
        if cb.monitor is None and cb.dirpath and cb.filename and "{" not in cb.filename
    )
    if lasts and state.is_file():
        ckpt = torch.load(state, map_location="cpu", weights_only=True)
        # nothing trained past it (fewer steps: stopped before the state was even restored)
        if trainer.global_step <= int(ckpt.get("global_step", -1)):
            restamp(ckpt, *lasts)
    state.unlink(missing_ok=True)
    for cb in mine:  # the race's best checkpoint, adopted and never bettered: this run's plan
        best = cb.best_model_path
        if cb.monitor is None or not best or not os.path.isfile(best) or not cb.dirpath:
            continue
        if os.path.realpath(os.path.dirname(best)) == os.path.realpath(cb.dirpath):
            ckpt = torch.load(best, map_location="cpu", weights_only=True)
            if not ((ckpt.get("transferkit") or {}).get("plan") or {}).get("measured"):
                restamp(ckpt, Path(best))


@rank_zero_only
def _keep_earlier_metrics(trainer: Any) -> None:
    """A run resumed in its own folder (the README's way) would lose the ``metrics.csv`` of
    its earlier part: Lightning's CSV logger deletes the file it finds there. Move it aside
    to ``metrics.before-resume-<n>.csv`` first."""
    from lightning.pytorch.loggers import CSVLogger

    for lg in trainer.loggers:
        if not isinstance(lg, CSVLogger):
            continue
        path = Path(lg.log_dir) / "metrics.csv"
        if path.is_file():
            n = 1
            while (kept := path.with_name(f"metrics.before-resume-{n}.csv")).exists():
                n += 1
            path.rename(kept)
            log.info("resumed in the same folder: the earlier metrics.csv is kept as %s", kept)


@rank_zero_only
def _write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    write_json(out_dir / "summary.json", summary)
    objective = summary["objective"]
    if summary["task"] == "multilabel":
        tested = ["test_map", "test_f1_macro"]
    else:
        tested = ["test_acc", *(["test_f1_macro"] if objective["name"] != "val/acc" else [])]
    rows = [("plan", summary["plan"]["reason"])]
    for key in ("backbone", "train_size", "val_size", "test_size", "trainable_blocks",
                "total_blocks", "trainable_params", "epochs", "objective", *tested,
                "fit_seconds", "train_images_per_second"):  # fmt: skip
        if key == "objective":
            rows.append((f"best {objective['name']}", objective["value"]))
        else:
            rows.append((key, summary.get(key)))
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {_fmt(v)}" for k, v in rows]
    print("\ntransferkit summary\n" + "\n".join(lines) + f"\n  written to {out_dir}/summary.json")


def _fmt(v: Any) -> str:
    if isinstance(v, float) and not math.isnan(v):
        return f"{v:.4f}" if v < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    """Hydra's entry point. Returns the objective sweepers optimise (Optuna and others): the
    best validation value of ``monitor``, never the test accuracy."""
    summary, _ = run_cli(lambda: finetune(cfg))
    value = summary["objective"]["value"]
    return float("nan") if value is None else value  # no validation: a failed trial, not a crash


if __name__ == "__main__":
    main()
