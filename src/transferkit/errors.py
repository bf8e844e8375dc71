"""The mistakes a user can make, as types.

The entry points (``run_cli``) print these as one line and exit with code 2; every other
exception is a bug (ours or a library's) and keeps its traceback (exit code 1). Each type
also derives from the built-in a library user would catch (``ValueError``,
``FileNotFoundError``, ``ImportError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class TransferkitError(Exception):
    """A mistake in a setting, the data or a checkpoint: the message names it and the fix."""


class ConfigError(TransferkitError, ValueError):
    """A setting has a value that cannot work (the message names the key and the choices)."""


class DataError(TransferkitError, ValueError):
    """The data cannot be used as it is (too few images, classes that differ, bad files)."""


class NotFoundError(TransferkitError, FileNotFoundError):
    """A file or folder that a setting names (data, input, weights) does not exist."""


class CheckpointError(TransferkitError, ValueError):
    """A checkpoint cannot be used for what was asked (foreign, truncated, other classes)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint names code (a Hydra ``_target_``) that the user has not allowed to run."""


class MissingPackageError(TransferkitError, ImportError):
    """An optional package (a logger's, the ONNX exporter's) is not installed."""


class WeightsUnavailableError(TransferkitError, RuntimeError):
    """Pretrained weights could not be obtained (no network, unknown name)."""


class RunStopped(BaseException):
    """The run was asked to stop (SIGTERM, SIGINT) and did so cleanly.

    A ``BaseException`` like ``KeyboardInterrupt``, so that no ``except Exception`` on the
    way up swallows it. ``signum`` is the signal; the exit code is ``128 + signum``.
    """

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"stopped by signal {signum}")
        self.signum = signum
