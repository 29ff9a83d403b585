"""Read checkpoints safely and rebuild cnnfeat models from them without executing anything from the file.

A checkpoint is loaded with ``weights_only=True`` (no pickled code runs). The model class it names is only
*looked up* among classes that are already imported and derive from :class:`~cnnfeat.models.ImageClassifier`
(cnnfeat's own models, or the caller's ``model_class``); nothing named in a file is ever imported. Its
hyper-parameters must be plain values accepted by that class's ``__init__``, optimizer/scheduler specs may
only name ``torch.optim`` classes (looked up, not imported: :mod:`cnnfeat.models.optim`), and a class that builds
something its hyper-parameters name checks them first (``check_checkpoint_hparams``: a custom network's class must
already be imported, :mod:`cnnfeat.models.custom`), before anything is constructed; the model is then built on
the ``meta`` device and its shapes compared with the file's weights before any memory is allocated for it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cnnfeat.errors import CheckpointError, CnnfeatError, ConfigError
from cnnfeat.models import optim
from cnnfeat.models.classifier import ImageClassifier
from cnnfeat.run import lightning_api as pl
from cnnfeat.run.checkpoint_io import omegaconf_allowed

_PLAIN = (str, int, float, bool, type(None))
_SPEC_KINDS: dict[str, optim.Kind] = {"optimizer": "optimizer", "scheduler": "scheduler"}
log = logging.getLogger("cnnfeat")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, loaded without executing pickled code; clear errors for bad files."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"Checkpoint {path} is a directory, not a .ckpt file")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"{path} is empty (0 bytes): it was being written when its process was killed. Use another "
            "checkpoint of the run (checkpoints/epochNN-*.ckpt) or start the run again."
        )
    try:
        with omegaconf_allowed():
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line]
        if refused:  # a whole file holding an object a safe load does not run
            raise CheckpointError(
                f"{path} holds a Python object that cnnfeat does not load (it reads checkpoints without running "
                f"pickled code): {refused[0][:200]}. Was it written by another program?"
            ) from e
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Is the file complete? Checkpoints are written as checkpoints/last.ckpt and "
            "checkpoints/epochNN-val_acc*.ckpt in a run directory."
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    state = ckpt["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: its state_dict is not a mapping of names to tensors")
    for key, kind in (("hyper_parameters", Mapping), ("cnnfeat_model", str)):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], kind):
            raise CheckpointError(f"{path}: {key} is a {type(ckpt[key]).__name__}, not a {kind.__name__}")
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
        if key in _SPEC_KINDS and value is not None:
            try:
                optim.check_spec(value, _SPEC_KINDS[key], key)
            except ConfigError as e:
                raise CheckpointError(
                    f"{path}: hyper-parameter {str(e).rstrip('.')}. A checkpoint may not name code to run; build "
                    "the model yourself and load its state_dict instead."
                ) from None
    check = getattr(cls, "check_checkpoint_hparams", None)  # a class that builds what its hparams name checks it here
    if callable(check):
        try:
            check(hparams)
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return dict(hparams)


def build_checked(cls: type, hparams: Mapping[str, Any], ckpt: Mapping[str, Any], path: Path) -> pl.LightningModule:
    """``cls(**hparams)``, first built on the ``meta`` device (no memory) and compared with the checkpoint's weights,
    so that a file cannot make cnnfeat allocate what its own tensors do not hold (``num_classes=10**9``)."""
    try:
        with torch.device("meta"):
            shell = cls(**hparams)
    except CnnfeatError as e:  # the class refused a value from the file
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # a class that cannot be built without memory: compare after building it for real
        log.debug("%s cannot be built on the meta device (%s); building it directly", cls.__name__, e)
    else:
        check_compatible(ckpt, shell, path)
        del shell
    model = cls(**hparams)
    check_compatible(ckpt, model, path)
    return model


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
    model = build_checked(cls, hparams, ckpt, path)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(map_location).eval(), ckpt


def reference_model(path: str | Path | None) -> pl.LightningModule | None:
    """The network a checkpoint was saved from (``load_model``: eval mode, CPU), or ``None`` for no path.

    The config's edge for callbacks that compare with another network: ``conf/callbacks/cross_cka.yaml`` builds its
    ``reference`` with this from ``reference_ckpt``, so the callback receives a module and never opens a file.
    """
    if path is None or str(path) in ("", "null"):
        return None
    return load_model(path)[0]
