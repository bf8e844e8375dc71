"""Stopping cleanly when a scheduler says so, wherever the run is.

SLURM, Kubernetes and spot instances send SIGTERM, wait a grace period, then SIGKILL. A
run must then stop within seconds, leave nothing half-written, leave a checkpoint it can
resume from exactly, and exit non-zero so the scheduler and scripts can tell it stopped.

- :func:`stop_on_signals` (entered by ``run_cli``) installs the handler for the whole run.
  Outside Lightning's loops it raises :class:`~transferkit.errors.RunStopped` at once: every
  file we write is written atomically, so nothing is left half-done.
- Inside ``Trainer.fit``/``test``, :class:`CheckpointOnStop` puts a handler that only
  records the signal in place of Lightning's (Lightning 2.6's runs a collective inside the
  signal handler, and each rank stops at the batch where its own signal arrived: under DDP
  the ranks then wait for each other forever). The stop is decided at the start of each
  training, validation and test batch, by every rank together (an all-reduce of the
  flag), so all ranks stop at the same batch. Our long loops inside ``fit`` (decoding
  images, building the feature cache) call :func:`check` and stop within a batch.
- At the start of a training batch :class:`CheckpointOnStop` first saves ``last.ckpt``
  (mid-epoch included); with ``transferkit.data.order`` the resumed run continues exactly
  where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

from transferkit.errors import RunStopped

log = logging.getLogger(__name__)

#: Signals that stop a run cleanly. SIGINT (Ctrl-C) keeps Python's KeyboardInterrupt.
STOP_SIGNALS = (signal.SIGTERM,)

_requested: int | None = None


def requested() -> int | None:
    """The stop signal received during this run, if any."""
    return _requested


def check() -> None:
    """Raise :class:`RunStopped` if a stop was requested (call it in long loops)."""
    if _requested is not None:
        raise RunStopped(_requested, f"{signal.Signals(_requested).name} received")


def _handler(signum: int, frame: FrameType | None) -> None:
    """Outside Lightning's loops: stop at once."""
    global _requested
    _requested = signum
    raise RunStopped(signum, f"{signal.Signals(signum).name} received")


def _recording_handler(trainer: L.Trainer) -> Callable[[int, FrameType | None], None]:
    """Inside Lightning's loops: record the signal, pass it on to the processes the launcher
    started (DDP ranks started by this one), and stop at once on a second signal."""

    def handler(signum: int, frame: FrameType | None) -> None:
        global _requested
        again = _requested is not None
        _requested = signum
        if again:
            raise RunStopped(signum, f"{signal.Signals(signum).name} received twice")
        kill = getattr(trainer.strategy.launcher, "kill", None)
        if callable(kill):
            kill(signum)

    return handler


def stop_agreed(trainer: L.Trainer) -> bool:
    """Whether any rank was asked to stop (every rank calls this at the same point)."""
    local = 1 if _requested is not None else 0
    if trainer.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
        return bool(local)
    flag = torch.tensor([local], device=trainer.strategy.root_device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM stops the run cleanly (see the module docstring).

    A stop raises :class:`RunStopped`; Lightning's ``SIGTERMException`` is turned into one. A
    signal that came too late to interrupt anything (during the last seconds of writing the
    report) still raises it at the end, so the exit code says the run was asked to stop.
    """
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _requested = None
    for s in STOP_SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
        check()
    except SIGTERMException as e:
        raise RunStopped(_requested or signal.SIGTERM, "SIGTERM received") from e
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _requested = None


class CheckpointOnStop(L.Callback):
    """Stop at a batch boundary on SIGTERM, every rank at the same one, and save a checkpoint
    the run resumes from exactly.

    At the start of each training batch, the state is the one after the previous optimizer
    step: model, optimizer, loops and callbacks are consistent, and no random draw of the
    next step has happened. The state goes to ``dirpath/filename.ckpt`` (``last.ckpt``, the
    one ``ckpt_path`` resumes from), written atomically by the trainer's checkpoint IO, and
    the resumed run continues with that batch. The checkpoint records the batches done and
    what the data order depends on (batch size, devices, seed), so a resume with other
    settings is refused instead of training on other images.

    A stop during validation or testing saves nothing new (Lightning 2.6 would resume a
    state saved mid-validation without that validation, and the end-of-epoch callbacks that
    use it): the last ``last.ckpt`` (the end of the previous epoch) stays the resume point.
    Nor does a stop between the micro-batches of an accumulated step (their gradients are
    not saved), or before the first step.

    Args:
        dirpath: folder of the checkpoint.
        filename: its name without ``.ckpt``.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.mid_epoch: dict[str, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"mid_epoch": self.mid_epoch} if self.mid_epoch else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mid_epoch = None  # a resumed run is no longer in the middle of that epoch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Put the recording handler in place of Lightning's SIGTERM handler whenever
        Lightning installs its handlers (at the start of fit and test); Lightning's
        teardown puts ours back afterwards."""
        connector = trainer._signal_connector
        if getattr(connector, "_transferkit", False):
            return
        register = connector.register_signal_handlers

        def register_then_take_sigterm() -> None:
            register()  # Lightning's: SLURM auto-requeue on SIGUSR1 stays Lightning's
            if threading.current_thread() is threading.main_thread():
                for s in STOP_SIGNALS:
                    signal.signal(s, _recording_handler(trainer))

        connector.register_signal_handlers = register_then_take_sigterm  # type: ignore[method-assign]
        connector._transferkit = True  # type: ignore[attr-defined]

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if stop_agreed(trainer):
            self._save(trainer)
            raise SIGTERMException

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if stop_agreed(trainer):
            where = "the sanity check" if trainer.sanity_checking else "validation"
            self._not_saved(trainer, where)
            raise SIGTERMException

    def on_test_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if stop_agreed(trainer):
            raise SIGTERMException

    def _save(self, trainer: L.Trainer) -> None:
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)
        if trainer.global_step == 0:
            return self._not_saved(trainer, "the first optimizer step")
        if done % max(1, trainer.accumulate_grad_batches):
            return self._not_saved(trainer, "an accumulated step (accumulate_grad_batches)")
        loader = trainer.train_dataloader
        self.mid_epoch = {
            "batches_done": done,
            "batch_per_device": int(getattr(loader, "batch_size", 0) or 0),
            "devices": int(trainer.world_size),
            "seed": int(getattr(getattr(loader, "sampler", None), "seed", -1)),
        }
        trainer.save_checkpoint(self.path)
        log.warning(
            "stopped at epoch %d, step %d: saved %s; resume with ckpt_path=%s",
            trainer.current_epoch,
            trainer.global_step,
            self.path,
            self.path,
        )
        return None

    def _not_saved(self, trainer: L.Trainer, where: str) -> None:
        log.warning(
            "stopped before or during %s of epoch %d: not a point Lightning resumes exactly, "
            "so no checkpoint is saved; the resume point is %s",
            where,
            trainer.current_epoch,
            describe(self.path),
        )


def describe(path: Path) -> str:
    """``path (epoch E, step S)``, or that there is none yet."""
    if not path.exists():
        return "none yet: nothing to resume"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return f"{path} (epoch {ckpt.get('epoch')}, step {ckpt.get('global_step')})"
    except Exception:
        return str(path)
