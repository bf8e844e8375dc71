"""``finetune=auto``: how many blocks to fine-tune, decided by a short race on the data.

The count-keyed table (``finetune=table``) gives the prior: the step budget for the data size
and a depth. ``auto`` then measures. Every candidate depth of ``finetune.race.candidates``
(by default 0, a quarter and half of the backbone's blocks) trains a short run of the
same recipe, ``fractions[0]`` of the budget, on the training split and is scored by its
best validation so far (the weights its run would test if it ended there). Successive
halving (Jamieson & Talwalkar 2016; Li et al. 2017, Hyperband) keeps the better ``1/eta``
of them for a longer round (``fractions[1]``). Among the last round's candidates, the
cheapest to finish whose score is within ``z`` standard errors of the best is the choice: a
deeper network must beat a cheaper one by more than the validation split can resolve. The
cost is what is left to train, ranked without a clock so that a seed always gives the same
depth: nothing for a candidate early stopping ended, else the same remaining steps at a
cost per step that grows with the blocks trained (:func:`cost`). The error is the paired one
(the candidates are scored on the same images, so only the images they disagree on count).
The chosen depth then trains the full budget, going on from its race checkpoint when that
is exact. Going on, a candidate validates when the whole run at its depth would, and each
round ends on such a validation, so early stopping acts as in that run: one it ends is
finished (its result stands), and the final run of a finished winner trains nothing more.

The race composes with the rest of a run:

- each candidate runs through :func:`transferkit.finetune.finetune`, so a shallow one
  trains on its cached frozen prefix (``finetune.cache_features``) and costs little, and
  the prefix is computed once per depth: the DataModule the runs share keeps it for the
  candidate's next round and the final run (:mod:`transferkit.caching`); each round runs
  the deepest candidate first, as a shallower one's frozen prefix starts with its blocks
  and goes on from its kept features;
- the random state is restored after the race, so the final run is the fixed-depth run;
- under DDP rank 0 races on its device before the processes start and hands the decision
  down in the environment (:data:`ENV`); processes that an outside launcher started
  (torchrun, SLURM) cannot share it, and take the table's depth instead;
- a resumed run takes the decision its checkpoint holds and does not race again.

:func:`halving` and :func:`pick` are pure (the runner is passed in), so the decision logic
is tested without training.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from transferkit.callbacks.speed import TrainSpeed
from transferkit.errors import CheckpointError, ConfigError
from transferkit.policy import parse_blocks

log = logging.getLogger("transferkit")

#: Environment variable holding rank 0's decision for the processes Lightning starts.
ENV = "TRANSFERKIT_AUTO_DECISION"


@dataclass(frozen=True)
class Trial:
    """One candidate's short run: its depth, steps, validation score and cost."""

    blocks: int
    steps: int
    score: float
    val_size: int
    seconds: float
    round: int
    finished: bool = False  # early stopping ended its run: nothing is left to train

    @property
    def se(self) -> float:
        """Binomial standard error of the score on ``val_size`` images."""
        return binomial_se(self.score, self.val_size)


@dataclass(frozen=True)
class Decision:
    """What the race chose and why, for the plan, ``summary.json`` and the report."""

    blocks: int
    prior_blocks: int
    trials: tuple[Trial, ...] = ()
    seconds: float = 0.0
    reason: str = ""
    source: str = "race"  # race | checkpoint | rank 0 | table
    resume_from: str | None = None  # the winner's checkpoint, for the final run to go on from
    stopped_steps: int | None = None  # early stopping ended the winner's race run here
    stopped_epochs: int | None = None  # ... after this many epochs

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trials"] = [asdict(t) for t in self.trials]
        d.pop("resume_from")  # a file of this process only
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> Decision:
        trials = tuple(Trial(**t) for t in d.get("trials") or ())
        return cls(
            blocks=int(d["blocks"]),
            prior_blocks=int(d.get("prior_blocks", d["blocks"])),
            trials=trials,
            seconds=float(d.get("seconds", 0.0)),
            reason=str(d.get("reason", "")),
            source=source,
            stopped_steps=None if d.get("stopped_steps") is None else int(d["stopped_steps"]),
            stopped_epochs=None if d.get("stopped_epochs") is None else int(d["stopped_epochs"]),
        )


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` images (0.5/n floor: a perfect
    score on few images is not certain)."""
    if n <= 0:
        return float("inf")
    p = min(max(p, 0.5 / n), 1 - 0.5 / n)
    return math.sqrt(p * (1 - p) / n)


def ladder(spec: Sequence[Any], total: int) -> list[int]:
    """The candidate depths, as block counts in increasing order (duplicates dropped)."""
    if not spec:
        raise ConfigError(
            "finetune.race.candidates is empty; give depths such as [0, 0.25, 0.5, all]."
        )
    blocks = {parse_blocks(v, total, "finetune.race.candidates") for v in spec}
    return sorted(blocks)


def diff_se(best: Trial, other: Trial, paired: Mapping[tuple[int, int], Any] | None) -> float:
    """Standard error of ``best.score - other.score``. Both were scored on the same
    validation images: with their per-image correctness (``paired[(blocks, round)]``) it is
    the paired error (McNemar: only the images they disagree on count), else that of two
    independent binomial estimates, ``sqrt(se_a² + se_b²)``, which overstates it."""
    a = paired.get((best.blocks, best.round)) if paired else None
    b = paired.get((other.blocks, other.round)) if paired else None
    if a is not None and b is not None and len(a) == len(b) and len(a) > 0:
        d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
        n = len(d)
        mean = sum(d) / n
        var = max(sum(x * x for x in d) / n - mean * mean, 0.25 / n)  # one image's worth
        return math.sqrt(var / n)
    return math.hypot(best.se, other.se)


def cost(t: Trial) -> tuple[bool, int]:
    """The rank of what is left to train ``t``'s depth to the budget, cheapest first:
    nothing once early stopping ended it; else, as the last round's candidates all trained
    the same steps, the same remaining steps, each dearer the more blocks train (a shallow
    candidate trains on its cached frozen prefix). Measured seconds are not used: they vary
    from run to run, and the same seed must give the same depth."""
    return (not t.finished, t.blocks)


def _state(t: Trial) -> str:
    return "finished" if t.finished else f"{t.steps} steps"


def pick(
    trials: Sequence[Trial], z: float = 1.0, paired: Mapping[tuple[int, int], Any] | None = None
) -> tuple[Trial, str]:
    """The cheapest trial (:func:`cost`) whose score is within ``z`` standard errors
    (:func:`diff_se`) of the best; of equal scores the cheaper is the best. Returns it and
    the reason."""
    if not trials:
        raise ValueError("pick() needs at least one trial")
    best = min(trials, key=lambda t: (-t.score, cost(t)))
    se = {id(t): diff_se(best, t, paired) for t in trials}
    close = [t for t in trials if best.score - t.score <= z * se[id(t)] + 1e-12]
    chosen = min(close, key=cost)
    if chosen is best:
        return chosen, f"{chosen.blocks} blocks scored best ({chosen.score:.3f})"
    kind = "paired " if paired and (chosen.blocks, chosen.round) in paired else ""
    return chosen, (
        f"{chosen.blocks} blocks ({chosen.score:.3f}, {_state(chosen)}) are within "
        f"{z:g} {kind}standard error ({se[id(chosen)]:.3f}) of the best, {best.blocks} blocks "
        f"({best.score:.3f}, {_state(best)}), and cheaper to finish"
    )


#: A candidate's short run: ``(blocks, steps, round) -> (score, validation images, seconds,
#: per-image correctness or None[, steps it trained: fewer when early stopping ended it[,
#: whether early stopping ended it]])``.
Runner = Callable[[int, int, int], tuple[Any, ...]]


def round_steps(budget_steps: int, fractions: Sequence[float], min_steps: int) -> list[int]:
    """Steps of each round: its share of the budget, at least ``min_steps`` and more than
    the round before, never more than the budget.

    Raises:
        ConfigError: a share outside (0, 1], or shares that do not grow.
    """
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(
            f"finetune.race.fractions={list(fractions)!r}: give growing shares of the budget "
            "in (0, 1], one per round, e.g. [0.125, 0.5]."
        )
    if any(b <= a for a, b in itertools.pairwise(fractions)):
        raise ConfigError(
            f"finetune.race.fractions={list(fractions)!r} must grow from round to round."
        )
    out: list[int] = []
    for f in fractions:
        steps = max(min_steps, round(budget_steps * f), out[-1] + 1 if out else 0)
        out.append(min(budget_steps, steps))
    return out


def halving(
    candidates: Sequence[int],
    run: Runner,
    budget_steps: int,
    fractions: Sequence[float] = (0.125, 0.5),
    eta: int = 2,
    min_steps: int = 10,
    z: float = 1.0,
    snap: Callable[[int], int] | None = None,
    keep_close: bool = False,
) -> tuple[int, list[Trial], str]:
    """Successive halving over ``candidates`` (block counts).

    Round ``r`` trains each remaining candidate ``fractions[r]`` of ``budget_steps`` (see
    :func:`round_steps`; ``snap`` moves each round's end to where the run validates)
    through ``run``; the best ``ceil(n / eta)`` go on to the next, and with ``keep_close``
    also every other candidate within ``z`` standard errors (:func:`diff_se`) of the
    round's best (with ``z=0``, as for a monitored loss, only ties). The choice is
    :func:`pick` over the last round's trials.

    Returns:
        the chosen block count, every trial, and the reason.
    """
    if eta < 2:
        raise ConfigError(f"finetune.race.eta={eta!r}: keep the best 1/eta, with eta >= 2.")
    plan = round_steps(budget_steps, fractions, min_steps)
    if snap is not None:
        snapped: list[int] = []
        for steps in plan:  # still growing: a round that snaps onto the last one is dropped
            steps = min(budget_steps, snap(steps))
            if not snapped or steps > snapped[-1]:
                snapped.append(steps)
        plan = snapped
    alive = list(candidates)
    trials: list[Trial] = []
    last: list[Trial] = []
    paired: dict[tuple[int, int], Any] = {}
    for r, steps in enumerate(plan):
        last = []
        # the deepest first: its frozen prefix is the start of the shallower ones', whose
        # cached features then go on from its own (transferkit.caching)
        for blocks in sorted(alive, reverse=True):
            score, val_size, seconds, correct, *more = run(blocks, steps, r)
            steps_done = int(more[0]) if more else steps
            ended = bool(more[1]) if len(more) > 1 else False
            last.append(Trial(blocks, steps_done, float(score), int(val_size), float(seconds), r,
                              ended))  # fmt: skip
            if correct is not None:
                paired[(blocks, r)] = correct
        last.sort(key=lambda t: t.blocks)
        trials += last
        if len(alive) <= 1 or r == len(plan) - 1:
            break
        keep = max(1, math.ceil(len(alive) / eta))
        ranked = sorted(last, key=lambda t: (-t.score, cost(t)))
        kept = ranked[:keep]
        if keep_close:
            top = ranked[0]
            kept += [t for t in ranked[keep:]
                     if top.score - t.score <= z * diff_se(top, t, paired) + 1e-12]  # fmt: skip
        alive = sorted(t.blocks for t in kept)
    chosen, why = pick(last, z, paired)
    return chosen.blocks, trials, why


def snapper(val_every: int | None, per_epoch: int, epochs_of: Callable[[int], int],
            min_steps: int) -> Callable[[int], int]:  # fmt: skip
    """The round end :func:`halving` trains to: the whole run's validation (every
    ``val_every`` epochs of ``per_epoch`` steps) nearest the round's share of the budget, and
    no fewer than ``min_steps``; unmoved when the run validates only at its end
    (``val_every`` None) or the round is shorter than an epoch."""

    def snap(steps: int) -> int:
        if not val_every or steps < per_epoch:
            return steps
        every = val_every * per_epoch
        snapped = max(1, math.floor(epochs_of(steps) / val_every + 0.5)) * every
        return snapped if snapped >= min_steps else math.ceil(min_steps / every) * every

    return snap


class ValRecorder(Callback):
    """A Lightning callback that keeps, for the best validation so far (the most images
    right; the first of equals, as the best checkpoint is), whether each validation image
    was classified right: the race's paired comparison. Its state goes into the checkpoint,
    so a round that goes on from the previous one keeps it. Multi-class only."""

    def __init__(self) -> None:
        self.correct: list[bool] | None = None
        self._parts: list[Any] = []

    def state_dict(self) -> dict[str, Any]:
        return {"correct": self.correct} if self.correct is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        correct = state_dict.get("correct")
        self.correct = [bool(x) for x in correct] if correct is not None else None

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._parts = []
            pl_module._val_record = self._parts

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(pl_module, "_val_record", None) is self._parts and self._parts:
            import torch

            latest = torch.cat(self._parts).tolist()
            if self.correct is None or sum(latest) > sum(self.correct):
                self.correct = latest
        pl_module._val_record = None


# -- running the race ----------------------------------------------------------------------


def inherited() -> Decision | None:
    """Rank 0's decision, in a process Lightning started for DDP."""
    value = os.environ.get(ENV)
    if value and int(os.environ.get("LOCAL_RANK", "0") or 0) > 0:
        try:
            return Decision.from_dict(json.loads(value), "rank 0")
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{ENV} holds no valid decision ({e}); unset it.") from e
    return None


def from_checkpoint(path: str) -> Decision | None:
    """The decision a checkpoint of an ``auto`` run holds (read without running code)."""
    from transferkit.checkpoint_io import read_checkpoint

    plan = (read_checkpoint(path).get("transferkit") or {}).get("plan") or {}
    measured = plan.get("measured")
    if not measured:
        return None
    try:
        return Decision.from_dict(measured, "checkpoint")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"ckpt_path={str(path)!r} holds no valid finetune=auto decision ({e}); resume "
            "with a checkpoint this version wrote, or set ckpt_path=null."
        ) from e


def candidate_config(cfg: Any, blocks: int, steps: int, epochs: int, out_dir: Path,
                     batches: int | None = None, resume: Path | None = None,
                     rule: Mapping[str, Any] | None = None,
                     val_every: int | None = None) -> Any:  # fmt: skip
    """The config of one candidate's short run: ``finetune=partial`` at ``blocks`` for
    ``steps`` steps (``epochs`` epochs; ``batches``: the batches of a run shorter than an
    epoch) with the run's own recipe, on one device, without testing, logging or a report;
    validated every ``val_every`` epochs, as the whole run at that depth would be (so its
    early stopping and best checkpoint are that run's), else once at its end; ``resume``:
    the checkpoint of its previous round; ``rule``: the table's row the data matched, whose
    settings (``bn_mode``, ``layer_decay``, ...) the final run keeps too."""
    from omegaconf import OmegaConf, open_dict

    c = copy.deepcopy(cfg)
    with open_dict(c):
        ft = c.finetune
        race_keys = ("regime", "rules", "race", "steps", "trainable_blocks", "why")
        kept = {k: v for k, v in OmegaConf.to_container(ft, resolve=True).items()  # type: ignore[union-attr]
                if k not in race_keys}  # fmt: skip
        kept.update({k: v for k, v in (rule or {}).items()
                     if not k.startswith("max_") and k not in race_keys})  # fmt: skip
        c.finetune = OmegaConf.create(
            {**kept, "regime": "partial", "trainable_blocks": blocks, "steps": steps}
        )
        c.trainer.max_epochs = None
        # the whole run's validations (its rounds end on one), or once, on the last weights
        c.trainer.check_val_every_n_epoch = val_every if val_every and batches is None else epochs
        c.trainer.num_sanity_val_steps = 0
        c.trainer.enable_progress_bar = False
        if int(c.trainer.get("num_nodes") or 1) > 1 or str(c.trainer.get("devices")) not in (
            "1", "auto"
        ):  # fmt: skip
            c.trainer.devices = 1
            c.trainer.num_nodes = 1
            c.trainer.strategy = "auto"
        if c.trainer.get("devices") == "auto":
            c.trainer.devices = 1
        if batches is not None:  # shorter than an epoch: the first batches of epoch 0
            c.trainer.limit_train_batches = batches
        if c.get("callbacks") is None:
            c.callbacks = {}
        c.callbacks.val_record = {"_target_": "transferkit.autodepth.ValRecorder"}
        c.logger = None
        c.test = False
        c.report = False
        c.ckpt_path = str(resume) if resume is not None else None
        if c.get("tune"):
            c.tune.lr_find = False
        c.paths.output_dir = str(out_dir)
    return c


def adopt(last: Path, into: Path, checkpoints: Path) -> None:
    """Make the winner's race checkpoint ``last`` the run's own, written to ``into``: its
    best checkpoint is copied into the run's ``checkpoints`` folder and the checkpoint
    callbacks' state points there, so the best validation of the race counts, as it would
    in the fixed run. (A callback whose folder is elsewhere keeps its state; the run then
    ignores a best checkpoint that is not in its own folder.)"""
    import torch

    from transferkit.io import atomic_write_bytes

    # Lightning keeps the folder as os.path.realpath gives it (a symlink in the path resolved)
    olds = {str(last.parent), os.path.realpath(last.parent)}
    new = os.path.realpath(checkpoints)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)

    def swap(v: Any) -> Any:
        if isinstance(v, str):
            for old in olds:
                if v == old or v.startswith(old + os.sep):
                    return new + v[len(old) :]
            return v
        if isinstance(v, dict):
            return {swap(k): swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    def moved(ckpt: dict[str, Any]) -> bytes:
        """``ckpt`` with its checkpoint callbacks' folders the run's own (testing from a
        checkpoint restores them too, and Lightning warns of a folder that changed)."""
        callbacks = ckpt.get("callbacks") or {}
        for key, state in list(callbacks.items()):
            if str(key).startswith("ModelCheckpoint") and isinstance(state, dict):
                callbacks[key] = swap(state)
        callbacks.pop(ValRecorder.__qualname__, None)  # the race's own; the run has none
        # the race's training is the decision's time, not the run's (its speed and seconds)
        callbacks.pop(TrainSpeed.__qualname__, None)
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        return buf.getvalue()

    for key, state in list((ckpt.get("callbacks") or {}).items()):
        if str(key).startswith("ModelCheckpoint") and isinstance(state, dict):
            best = Path(str(state.get("best_model_path") or ""))
            mine = os.path.realpath(best.parent) == os.path.realpath(last.parent)
            if best.name and mine and best.is_file() and best.name != last.name:
                checkpoints.mkdir(parents=True, exist_ok=True)
                kept = torch.load(best, map_location="cpu", weights_only=True)
                atomic_write_bytes(checkpoints / best.name, moved(kept))
    atomic_write_bytes(into, moved(ckpt))


def continuable(cfg: Any, world_size: int) -> bool:
    """Whether a candidate's run can go on where it stopped and be the run it would have
    been from the start: a constant learning rate (``scheduler=none``; a schedule is laid
    out over the run's length) on one device (the race runs on one), and no LR range test
    (the final run's tuned LR would be replaced by the race's with its optimizer state)."""
    scheduler = cfg.get("scheduler") or {}
    tuned = bool((cfg.get("tune") or {}).get("lr_find"))  # the final run's LR is not the race's
    return scheduler.get("scheduler") is None and world_size == 1 and not tuned


def check_settings(cfg: Any) -> bool:
    """Check what ``finetune.race`` says that nothing else checks before the run is built
    (a resumed run or a DDP child never races, and must not take a bad value silently);
    returns ``keep_close``.

    Raises:
        ConfigError: a ``keep_close`` that is not true or false.
    """
    settings = cfg.finetune.get("race") or {}
    keep_close = settings.get("keep_close", False)
    if not isinstance(keep_close, bool):
        raise ConfigError(f"finetune.race.keep_close={keep_close!r}; give true or false.")
    return keep_close


def race(cfg: Any, total_blocks: int, prior_blocks: int, budget_steps: int,
         epochs_of: Callable[[int], int], datamodule: Any = None,
         steps_per_epoch: int | None = None, world_size: int = 1,
         rule: Mapping[str, Any] | None = None) -> Decision:  # fmt: skip
    """Run the race for the composed run config ``cfg`` (``finetune=auto``);
    ``epochs_of(steps)``: the epochs a candidate of ``steps`` steps runs; ``datamodule``:
    the run's own, whose decoded images the candidates share.

    With a constant LR (:func:`continuable`) a candidate's next round continues its
    previous one from its checkpoint, and the winner's checkpoint is kept (the
    decision's ``resume_from``) for the final run to continue: no step of the winner is
    trained twice. A run shorter than an epoch trains the epoch's first batches and is
    restarted, not continued."""
    from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states

    from transferkit.finetune import finetune

    settings = cfg.finetune.get("race") or {}
    candidates = ladder(list(settings.get("candidates", [0, 0.25, 0.5])), total_blocks)
    keep_close = check_settings(cfg)
    root = Path(cfg.paths.output_dir) / "auto"
    keep = bool(settings.get("keep_runs", False))
    go_on = continuable(cfg, world_size) and bool(settings.get("continue", True))
    whole: dict[int, Path] = {}  # blocks → the last.ckpt of its last whole-epoch run
    # blocks → (score, validation images, correctness, steps, epochs) of a run early
    # stopping ended
    finished: dict[int, tuple[float, int, Any, int, int]] = {}
    per_epoch = steps_per_epoch or 0
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    prefixes: dict[int, str] = {}  # blocks → the fingerprint of its cached frozen prefix
    # Going on, a candidate validates when the whole run at its depth would, and each round
    # ends on such a validation: its early stopping and best checkpoint are that run's, so
    # the winner's final run is the fixed run (and stops where it would).
    val_every = None
    if go_on and per_epoch:
        from transferkit.finetune import validation_interval

        user_every = cfg.trainer.get("check_val_every_n_epoch")
        budget_epochs = epochs_of(budget_steps)
        val_every = int(user_every or validation_interval(budget_epochs))
        if budget_epochs % val_every:  # the run's last epoch is not validated: rounds are
            val_every = None  # scored once, at their end (the final run then differs)
    min_steps = int(settings.get("min_steps", 10))
    snap = snapper(val_every, per_epoch, epochs_of, min_steps)

    def run(blocks: int, steps: int, rnd: int) -> tuple[Any, ...]:
        if blocks in finished:  # early stopping ended it: its result stands, at no cost
            score, val_size, correct, done, _ = finished[blocks]
            return score, val_size, 0.0, correct, done, True
        out = root / f"blocks{blocks}"
        short = steps < per_epoch
        resume = whole.pop(blocks, None) if go_on and not short else None
        if resume is None:
            shutil.rmtree(out, ignore_errors=True)
        c = candidate_config(cfg, blocks, steps, epochs_of(steps), out,
                             batches=steps * accumulate if short else None,
                             resume=resume, rule=rule, val_every=val_every)  # fmt: skip
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # one summary, the run's own
                summary, objects = finetune(c, datamodule)
            recorder = next(
                (cb for cb in objects["trainer"].callbacks if isinstance(cb, ValRecorder)), None
            )
            correct = recorder.correct if recorder is not None else None
            logged = objects["trainer"].callback_metrics.get(cfg.monitor)
            stopped = any(
                isinstance(cb, EarlyStopping)
                and cb.stopping_reason != EarlyStoppingReason.NOT_STOPPED
                for cb in objects["trainer"].callbacks
            )
            trained = int(objects["trainer"].global_step)
            epochs_done = int(objects["trainer"].current_epoch)
            prefix = getattr(objects.get("fit_datamodule"), "prefix_key", None)
            if prefix:
                prefixes[blocks] = prefix
            del objects
        finally:
            if datamodule is not None:  # the next run (and the final one) sets its own
                datamodule.trainer = None
        seconds = time.perf_counter() - start
        # the best validation so far: the weights the run would test if it ended here
        score = summary["objective"]["value"]
        if score is None and logged is not None:  # no checkpoint callback watches it
            score = float(logged)
        if cfg.monitor == "val/acc" and correct:
            recorded = sum(correct) / len(correct)
            if score is None:
                score = recorded
            elif abs(recorded - float(score)) > 1e-6:
                correct = None  # not the record of the best validation: no paired error
        if score is None:
            raise ConfigError(
                "finetune=auto races candidate depths on the validation split, and this run "
                "has none: set data.val_fraction > 0, or choose a depth (finetune=table, "
                "finetune=partial finetune.trainable_blocks=...)."
            )
        if not (cfg.monitor == "val/acc" and correct):
            correct = None  # a paired comparison only of accuracies (image by image)
        if cfg.mode == "min":  # losses: smaller is better; the race maximises
            score = -float(score)
        log.info("auto: %d blocks, %d steps: %s %.4f in %.0f s", blocks, steps,
                 cfg.monitor, abs(score), seconds)  # fmt: skip
        last = out / "checkpoints" / "last.ckpt"
        if go_on and not short and last.is_file():
            whole[blocks] = last
            if stopped:
                finished[blocks] = (float(score), int(summary["val_size"]), correct, trained,
                                    epochs_done)  # fmt: skip
        elif not keep:
            shutil.rmtree(out, ignore_errors=True)
        return float(score), int(summary["val_size"]), seconds, correct, trained, blocks in finished

    states = _collect_rng_states(include_cuda=True)
    start = time.perf_counter()
    winner: int | None = None
    stopped_steps: int | None = None
    stopped_epochs: int | None = None
    try:
        blocks, trials, why = halving(
            candidates,
            run,
            budget_steps,
            fractions=[float(f) for f in settings.get("fractions", (0.125, 0.5))],
            eta=int(settings.get("eta", 2)),
            min_steps=min_steps,
            # a loss is no proportion: no binomial error, the best wins
            z=float(settings.get("z", 1.0)) if cfg.mode == "max" else 0.0,
            snap=snap,
            keep_close=keep_close,
        )
        winner = blocks
        resume_from = None
        if blocks in whole:  # the winner goes on from its last round
            resume_from = root / "continue.ckpt"
            adopt(whole[blocks], resume_from, Path(cfg.paths.output_dir) / "checkpoints")
            if blocks in finished:  # early stopping ended it: nothing more to train
                stopped_steps, stopped_epochs = finished[blocks][3:]
    finally:
        _set_rng_states(states)
        store = getattr(datamodule, "prefix_features", None)
        if store is not None:  # the final run needs the winner's features, not the others'
            kept = prefixes.get(winner) if winner is not None else None
            for key in [k for k in store if k[1] != kept]:
                del store[key]
        if not keep:
            for sub in root.glob("blocks*"):
                shutil.rmtree(sub, ignore_errors=True)
    seconds = time.perf_counter() - start
    reason = f"measured: {why} after racing {candidates} blocks ({seconds:.0f} s)"
    done = max(t.steps for t in trials if t.blocks == blocks)
    if stopped_steps is not None:
        reason += f"; early stopping ended it after {stopped_steps} steps of the race"
    elif resume_from is not None:
        reason += f"; it goes on from its {done} steps of the race"
    return Decision(blocks, prior_blocks, tuple(trials), round(seconds, 2), reason,
                    resume_from=str(resume_from) if resume_from else None,
                    stopped_steps=stopped_steps, stopped_epochs=stopped_epochs)  # fmt: skip


def table_only(prior_blocks: int, why: str) -> Decision:
    return Decision(prior_blocks, prior_blocks, (), 0.0, why, "table")


def decide(cfg: Any, total_blocks: int, prior_blocks: int, budget_steps: int,
           epochs_of: Callable[[int], int], datamodule: Any = None, world_size: int = 1,
           external: str | None = None,
           steps_per_epoch: int | None = None,
           rule: Mapping[str, Any] | None = None) -> Decision:  # fmt: skip
    """The depth of a ``finetune=auto`` run: from its checkpoint when resuming, from rank 0
    in a DDP child, else measured (and handed to the DDP children)."""
    if cfg.get("ckpt_path"):
        saved = from_checkpoint(cfg.ckpt_path)
        if saved is not None:
            if not 0 <= saved.blocks <= total_blocks:  # a file's word, checked before use
                raise CheckpointError(
                    f"ckpt_path={str(cfg.ckpt_path)!r} says finetune=auto chose "
                    f"{saved.blocks} blocks, and this backbone has {total_blocks}; resume with "
                    "a checkpoint of this run, or set ckpt_path=null."
                )
            return saved
        return table_only(prior_blocks, "resumed from a checkpoint without a race: the table")
    given = inherited()
    if given is not None:
        return given
    if external:
        return table_only(
            prior_blocks,
            f"{external}: the processes cannot share one race, so the table's depth "
            "(run finetune=auto on one device first and pass its depth, or use finetune=table)",
        )
    decision = race(cfg, total_blocks, prior_blocks, budget_steps, epochs_of, datamodule,
                    steps_per_epoch, world_size, rule)  # fmt: skip
    if world_size > 1:
        os.environ[ENV] = json.dumps(decision.as_dict())
    return decision


def plot_race(measured: Mapping[str, Any], path: Path, monitor: str = "val/acc") -> Path | None:
    """A small figure of the race: each trial's validation score with its standard error
    against the seconds it took, the chosen depth marked. None without trials."""
    from transferkit.experiments.common import save_figure

    trials = measured.get("trials") or []
    if not trials:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for rnd in sorted({t["round"] for t in trials}):
        ts = [t for t in trials if t["round"] == rnd]
        ax.errorbar(
            [t["seconds"] for t in ts],
            [abs(t["score"]) for t in ts],
            yerr=[binomial_se(abs(t["score"]), t["val_size"]) for t in ts],
            fmt="o" if rnd == 0 else "s",
            capsize=3,
            label=f"round {rnd + 1} ({ts[0]['steps']} steps)",
        )
        for t in ts:
            ax.annotate(str(t["blocks"]), (t["seconds"], abs(t["score"])),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)  # fmt: skip
    last = [t for t in trials if t["round"] == max(x["round"] for x in trials)]
    chosen = [t for t in last if t["blocks"] == measured["blocks"]]
    if chosen:
        ax.scatter([chosen[0]["seconds"]], [abs(chosen[0]["score"])], s=160,
                   facecolors="none", edgecolors="black", label="chosen")  # fmt: skip
    ax.set_xlabel("seconds of the short run")
    ax.set_ylabel(f"best {monitor} (± 1 s.e.)")
    ax.set_title("finetune=auto: the race (labels: trainable blocks)", fontsize=9)
    save_figure(fig, path, (ax,))
    return path
