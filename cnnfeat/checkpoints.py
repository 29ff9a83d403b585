"""Read checkpoints safely and rebuild cnnfeat models from them without executing anything from the file.

A checkpoint is loaded with ``weights_only=True`` (no pickled code runs). The model class it names is only
*looked up* among classes that are already imported and derive from :class:`~cnnfeat.models.ImageClassifier`
(cnnfeat's own models, or the caller's ``model_class``); nothing named in a file is ever imported. Its
hyper-parameters must be plain values accepted by that class's ``__init__``, and optimizer/scheduler specs
may only name ``torch.optim`` classes, before anything is constructed.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cnnfeat import lightning_api as pl
from cnnfeat.errors import CheckpointError
from cnnfeat.models.classifier import ImageClassifier

_PLAIN = (str, int, float, bool, type(None))
_SPEC_KEYS = ("optimizer", "scheduler")
_SPEC_PREFIX = "torch.optim."


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, loaded without executing pickled code; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"{path} is empty (0 bytes): it was being written when its process was killed. Use another "
            "checkpoint of the run (checkpoints/epochNN-*.ckpt) or start the run again."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Is the file complete? Checkpoints are written as checkpoints/last.ckpt and "
            "checkpoints/epochNN-val_acc*.ckpt in a run directory."
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    return ckpt


def check_compatible(ckpt: Mapping[str, Any], model: torch.nn.Module, path: str | Path) -> None:
    """Refuse a checkpoint whose weights do not belong to ``model`` (missing or unexpected tensors, shapes)."""
    mine, theirs = model.state_dict(), ckpt["state_dict"]
    if set(mine) != set(theirs):
        raise CheckpointError(
            f"{path} was not saved from {type(model).__name__}: missing {sorted(set(mine) - set(theirs))[:5]}, "
            f"unexpected {sorted(set(theirs) - set(mine))[:5]}"
        )
    shapes = [
        f"{k}: {tuple(v.shape)} in the file, {tuple(mine[k].shape)} in the model"
        for k, v in theirs.items()
        if isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(mine[k].shape)
    ]
    if shapes:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {'; '.join(shapes[:3])}")


def model_classes() -> dict[str, type[ImageClassifier]]:
    """Every imported subclass of ``ImageClassifier`` by ``"module.QualName"`` (what checkpoints record)."""
    found: dict[str, type[ImageClassifier]] = {}
    todo = [ImageClassifier]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found[f"{sub.__module__}.{sub.__qualname__}"] = sub
            todo.append(sub)
    return found


def _check_plain(value: Any, where: str, path: Path) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{path}: hyper-parameter {where} has a non-string key {k!r}")
            _check_plain(v, f"{where}.{k}", path)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]", path)
    elif not isinstance(value, _PLAIN):
        raise CheckpointError(f"{path}: hyper-parameter {where} is a {type(value).__name__}, not a plain value")


def check_hparams(cls: type, hparams: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Hyper-parameters from a file, checked before ``cls(**hparams)``: plain values, known names, safe specs."""
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = [k for k in hparams if k not in known]
    if unknown and not takes_any:
        raise CheckpointError(
            f"{path}: hyper-parameters {unknown} are not arguments of {cls.__name__} (it takes {known}); "
            "was the checkpoint saved from another version or another model?"
        )
    for key, value in hparams.items():
        _check_plain(value, key, path)
        if key in _SPEC_KEYS and value is not None:
            target = value.get("_target_") if isinstance(value, Mapping) else None
            if not isinstance(target, str) or not target.startswith(_SPEC_PREFIX):
                raise CheckpointError(
                    f"{path}: hyper-parameter {key}._target_={target!r} is not a {_SPEC_PREFIX}* class; a checkpoint "
                    "may not name code to run. Build the model yourself and load its state_dict instead."
                )
    return dict(hparams)


def resolve_model_class(ckpt: Mapping[str, Any], path: Path, model_class: type | None = None) -> type:
    """The class to rebuild: ``model_class`` if given, else the one the checkpoint names among imported models."""
    if model_class is not None:
        if not (isinstance(model_class, type) and issubclass(model_class, pl.LightningModule)):
            raise CheckpointError(f"model_class must be a LightningModule subclass, got {model_class!r}")
        return model_class
    name = ckpt.get("cnnfeat_model")
    if not name:
        raise CheckpointError(
            f"{path} was not written by cnnfeat (no model class recorded); pass model_class=YourModel or load "
            "it with YourModel.load_from_checkpoint"
        )
    classes = model_classes()
    if name not in classes:
        raise CheckpointError(
            f"{path} names the model class {name!r}, which is not one of the imported cnnfeat models "
            f"({sorted(classes)}). Nothing named in a checkpoint is imported: import your module first, or pass "
            "model_class=YourModel."
        )
    return classes[name]


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", model_class: type | None = None
) -> tuple[pl.LightningModule, dict]:
    """Rebuild the model a checkpoint was saved from, in eval mode, and return it with the checkpoint's contents."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    cls = resolve_model_class(ckpt, path, model_class)
    hparams = check_hparams(cls, ckpt.get("hyper_parameters") or {}, path)
    if "weights" in hparams:  # a frozen pretrained backbone: its tensors come from the checkpoint, not the hub
        hparams["weights"] = "none"
    model = cls(**hparams)
    check_compatible(ckpt, model, path)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(map_location).eval(), ckpt
