"""Read checkpoints safely (``weights_only=True``) with clear errors, and rebuild cnnfeat models from them."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, loaded without executing pickled code; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Is the file complete? Checkpoints are written as checkpoints/last.ckpt and "
            "checkpoints/epochNN-val_acc*.ckpt in a run directory."
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    return ckpt


def check_compatible(ckpt: dict[str, Any], model: torch.nn.Module, path: str | Path) -> None:
    """Refuse a checkpoint whose weights do not belong to ``model`` (missing or unexpected tensors)."""
    mine, theirs = set(model.state_dict()), set(ckpt["state_dict"])
    if mine != theirs:
        raise ValueError(
            f"{path} was not saved from {type(model).__name__}: missing {sorted(mine - theirs)[:5]}, "
            f"unexpected {sorted(theirs - mine)[:5]}"
        )


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[pl.LightningModule, dict]:
    """Rebuild the model a cnnfeat checkpoint was saved from (its class is recorded in the checkpoint)."""
    ckpt = read_checkpoint(path)
    target = ckpt.get("cnnfeat_model")
    if not target:
        raise ValueError(
            f"{path} was not written by cnnfeat (no model class recorded); load it with "
            "YourModel.load_from_checkpoint instead"
        )
    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    hparams = dict(ckpt.get("hyper_parameters", {}))
    if cls.__name__ == "TransferClassifier":
        hparams["weights"] = "none"  # the backbone's tensors come from the checkpoint, not from the hub
    model = cls(**hparams)
    check_compatible(ckpt, model, path)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(map_location).eval(), ckpt
