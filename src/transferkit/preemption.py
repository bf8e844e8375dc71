"""Stopping cleanly when a scheduler says so, wherever the run is.

SLURM, Kubernetes and spot instances send SIGTERM, wait a grace period, then SIGKILL. A
run must then stop within seconds, leave nothing half-written, leave a checkpoint it can
resume from exactly, and exit non-zero so the scheduler and scripts can tell it stopped.

- :func:`stop_on_signals` (entered by ``run_cli``) installs the handler for the whole run.
  Outside Lightning's loops the handler raises :class:`~transferkit.errors.RunStopped` at
  once: every file we write is written atomically, so nothing is left half-done.
- Inside ``Trainer.fit``/``test`` Lightning installs its own handler over ours and calls
  ours from it; we only record the signal there. Lightning then stops at the next batch
  boundary of the training, validation or test loop; our long loops inside ``fit`` (decoding
  images, building the feature cache) call :func:`check` and stop within a batch.
- :class:`CheckpointOnStop` saves ``last.ckpt`` at that batch boundary, mid-epoch included;
  with ``transferkit.data.order`` the resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
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
    global _requested
    again = _requested is not None
    _requested = signum
    if signal.getsignal(signum) is not _handler and not again:
        return  # Lightning's handler called ours: it stops at the next batch boundary
    raise RunStopped(signum, f"{signal.Signals(signum).name} received")


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
    """Save a resumable checkpoint the moment Lightning stops training on SIGTERM.

    Lightning raises ``SIGTERMException`` after a training step, where the model, optimizer,
    loops and callbacks are consistent: the state goes to ``dirpath/filename.ckpt``
    (``last.ckpt``, the one ``ckpt_path`` resumes from), written atomically by the trainer's
    checkpoint IO, and the resumed run continues with the next batch.

    A stop during the epoch's last batch or its validation saves nothing new: Lightning
    2.6 resumes such a state without the epoch's validation and end-of-epoch callbacks
    (early stopping, the best checkpoint), so it would not continue exactly. ``last.ckpt``
    from the end of the previous epoch stays the resume point, and at most that epoch is
    trained again. Nothing is saved before the first step or while testing.

    Args:
        dirpath: folder of the checkpoint.
        filename: its name without ``.ckpt``.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exc: Any) -> None:
        if not isinstance(exc, SIGTERMException) or trainer.state.fn != "fit":
            return
        if trainer.sanity_checking or trainer.global_step == 0:
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        if trainer.validating or epoch_loop.batch_progress.is_last_batch:
            where = "its validation" if trainer.validating else "its last batch"
            kept = f"{self.path} (end of the previous epoch)" if self.path.exists() else "none"
            log.warning(
                "stopped during %s of epoch %d: not a point Lightning resumes exactly, so no "
                "checkpoint is saved; resume point: %s",
                where,
                trainer.current_epoch,
                kept,
            )
            return
        trainer.save_checkpoint(self.path)
        log.warning(
            "stopped at epoch %d, step %d: saved %s; resume with ckpt_path=%s",
            trainer.current_epoch,
            trainer.global_step,
            self.path,
            self.path,
        )
