"""What every console script shares: where the configs are, and how a run ends.

``run_cli`` turns the user's mistakes (:mod:`transferkit.errors`) into one line and exit
code 2, a clean stop on SIGTERM into exit code 143 (128 + the signal), and leaves every
other exception alone: a bug keeps its traceback and exits 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

from transferkit.console import quiet_third_party
from transferkit.errors import ConfigError, NotFoundError, RunStopped, TransferkitError
from transferkit.preemption import stop_on_signals


def config_dir() -> str:
    """The shipped configs: ``transferkit/conf`` inside an installed wheel, else the
    repository's top-level ``conf/`` (a clone, or an editable install of one).

    Raises:
        NotFoundError: neither exists (a broken installation).
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "finetune.yaml").is_file():
            return str(candidate)
    raise NotFoundError(
        f"transferkit's configs are missing: neither {here / 'conf'} nor "
        f"{here.parents[1] / 'conf'} holds finetune.yaml. Reinstall transferkit."
    )


CONFIG_DIR = config_dir()

T = TypeVar("T")


def _raised_by_hydra_call(exc: BaseException) -> bool:
    """A ``TypeError`` raised while Hydra *called* a target with a config's arguments (an
    unknown or missing key), not inside the target's own code: the innermost frame of its
    traceback is Hydra's (``_call_target``, or a deferred ``_partial_`` target)."""
    tb: TracebackType | None = exc.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    module = last.tb_frame.f_globals.get("__name__", "") if last is not None else ""
    return module.startswith("hydra._internal.")


def user_error(exc: BaseException) -> BaseException | None:
    """The user's mistake behind ``exc`` (Hydra's ``instantiate`` wraps errors), or None.

    Our typed errors, a missing mandatory config value, and a config whose arguments do
    not fit the ``_target_`` it names count; anything else is a bug.
    """
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, TransferkitError):
            return cause
        if isinstance(cause, MissingMandatoryValue):
            return ConfigError(str(cause))
        if isinstance(cause, InstantiationException) and str(cause).startswith(
            "Error locating target"
        ):  # a _target_ that does not exist (a typo in a class name)
            where = str(cause).split(", set env var")[0]
            why = " ".join(str(cause.__cause__).split())
            return ConfigError(f"{where}: check the spelling of that _target_ ({why}).")
        if isinstance(cause, TypeError) and _raised_by_hydra_call(cause):
            return ConfigError(
                f"{cause}: a config key its _target_ does not take, or a missing one. Fix "
                "that key in its config group (or the override that set it)."
            )
        cause = cause.__cause__
    return None


def run_cli(task: Callable[[], T]) -> T:
    """Run ``task`` as a console script does.

    - A user error prints ``error: <message>`` and exits with code 2 (``TRANSFERKIT_DEBUG=1``
      re-raises it with the traceback).
    - SIGTERM stops the run cleanly (see :mod:`transferkit.preemption`) and exits with
      ``128 + 15``, so schedulers and scripts can tell it was stopped.
    - Any other exception propagates: a traceback and exit code 1.
    """
    quiet_third_party()
    try:
        with stop_on_signals():
            return task()
    except RunStopped as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        sys.exit(128 + stopped.signum)
    except Exception as e:
        cause = user_error(e)
        if cause is None or os.environ.get("TRANSFERKIT_DEBUG"):
            raise
        print(f"error: {cause}\n(set TRANSFERKIT_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
