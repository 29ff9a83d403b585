"""The Lightning package cnnfeat builds on: ``pytorch_lightning`` or the unified ``lightning.pytorch``.

The two distributions hold the same code under two names, and a ``lightning.pytorch.Trainer`` refuses a
callback, module or DataModule derived from ``pytorch_lightning`` classes (and vice versa). So cnnfeat's
classes derive from whichever package this module picks, once per process, at cnnfeat's first import:

1. ``CNNFEAT_LIGHTNING=lightning.pytorch`` (or ``pytorch_lightning``) when set;
2. otherwise the one the program has already imported (``import lightning.pytorch as pl`` before importing
   cnnfeat picks ``lightning.pytorch``);
3. otherwise ``pytorch_lightning`` if it is installed, else ``lightning.pytorch``.

Every cnnfeat module imports Lightning names from here, and the Hydra configs name Lightning classes through
the ``${pl:...}`` resolver (``_target_: ${pl:callbacks.ModelCheckpoint}``), so the command line follows the
same choice. One process uses one of the two.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from cnnfeat.errors import ConfigError

ENV = "CNNFEAT_LIGHTNING"
CHOICES = ("pytorch_lightning", "lightning.pytorch")


def choose() -> str:
    """The package name by the rules in the module docstring."""
    wanted = os.environ.get(ENV)
    if wanted:
        wanted = "lightning.pytorch" if wanted == "lightning" else wanted
        if wanted not in CHOICES:
            raise ConfigError(f"{ENV}={wanted!r}: choose one of {CHOICES}")
        return wanted
    if "lightning.pytorch" in sys.modules and "pytorch_lightning" not in sys.modules:
        return "lightning.pytorch"
    return "pytorch_lightning" if importlib.util.find_spec("pytorch_lightning") else "lightning.pytorch"


PACKAGE = choose()
pl = importlib.import_module(PACKAGE)
_callbacks = importlib.import_module(f"{PACKAGE}.callbacks")
_loggers = importlib.import_module(f"{PACKAGE}.loggers")
_io = importlib.import_module(f"{PACKAGE}.plugins.io")
_rank_zero = importlib.import_module(f"{PACKAGE}.utilities.rank_zero")
_exceptions = importlib.import_module(f"{PACKAGE}.utilities.exceptions")

Callback = pl.Callback
LightningModule = pl.LightningModule
LightningDataModule = pl.LightningDataModule
Trainer = pl.Trainer
seed_everything = pl.seed_everything
ModelCheckpoint = _callbacks.ModelCheckpoint
LearningRateMonitor = _callbacks.LearningRateMonitor
ProgressBar = _callbacks.ProgressBar
TensorBoardLogger = _loggers.TensorBoardLogger
CSVLogger = _loggers.CSVLogger
CheckpointIO = _io.CheckpointIO
TorchCheckpointIO = _io.TorchCheckpointIO
rank_zero_only = _rank_zero.rank_zero_only
rank_zero_warn = _rank_zero.rank_zero_warn
#: what Lightning raises when it refuses a setting (a user's mistake, not a bug)
MisconfigurationException = _exceptions.MisconfigurationException


def target(name: str) -> str:
    """The import path of a Lightning class in the chosen package, e.g. ``target("Trainer")``."""
    return f"{PACKAGE}.{name}"
