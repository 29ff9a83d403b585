"""cnnfeat's own error types: mistakes a user can fix, each with a message that says what to do.

The command-line entry points catch :class:`CnnfeatError` only and print its message (exit code 2); any other
exception, including a ``ValueError`` raised inside torch, NumPy or scikit-learn, is a bug and keeps its
traceback. Each class also derives from the builtin a caller would expect (``ValueError`` for a bad
argument, ``OSError`` for a file that cannot be written), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

from typing import Any


class CnnfeatError(Exception):
    """Base class of every error cnnfeat raises for a problem the user can fix."""


class ConfigError(CnnfeatError, ValueError):
    """A configuration value or argument is invalid (the message names it and the valid choices)."""


def check_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    """Refuse ``value`` unless it is an integer (not a bool) >= ``minimum`` (or None when ``allow_none``)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}{' or null' if allow_none else ''}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Refuse anything but ``True``/``False`` (a string ``"false"`` would count as true)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


class DataError(CnnfeatError, RuntimeError):
    """Data files are missing, unreadable or corrupt, or a cache could not be written."""


class WeightsError(CnnfeatError, RuntimeError):
    """Pretrained weights are missing or do not fit the network."""


class CheckpointError(CnnfeatError, ValueError):
    """A checkpoint is missing, unreadable, foreign, unsafe, or does not match the run."""


class CheckpointWriteError(CnnfeatError, OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


class RunDirectoryBusy(CnnfeatError, RuntimeError):
    """Another live process is writing into the same run directory."""


class TrainingDiverged(CnnfeatError, RuntimeError):
    """The loss or the weights became NaN or infinite; the run was stopped and marked ``diverged``."""

    def __init__(self, message: str, epoch: int, step: int, loss: float) -> None:
        super().__init__(message)
        self.epoch, self.step, self.loss = epoch, step, loss
