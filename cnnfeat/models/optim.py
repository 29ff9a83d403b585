"""Optimizer and scheduler specs (``{"_target_": "torch.optim.SGD", "lr": 0.2}``), checked and built without
importing anything.

A spec may come from a checkpoint someone else wrote, so its ``_target_`` is *looked up*, never imported: the
module part must already be loaded and be ``torch.optim`` or one of its submodules, and the name must be an
:class:`~torch.optim.Optimizer` (or learning-rate scheduler) class defined there. A prefix is not a class check:
``torch.optim.optimizer.torch.hub.load`` starts with ``torch.optim.`` but names a function in another package,
and is refused. Its other keys must be plain keyword arguments of that class (numbers, strings, booleans and
lists of them); nested specs and Hydra's ``_partial_`` / ``_args_`` keys are refused, so nothing else in the
spec is instantiated either. A class of your own can be allowed from code with :func:`allow`.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from cnnfeat.errors import ConfigError

Kind = Literal["optimizer", "scheduler"]

_BASES: dict[str, tuple[type, ...]] = {"optimizer": (Optimizer,), "scheduler": (LRScheduler, ReduceLROnPlateau)}
#: the argument the builder passes itself (a spec may not set it)
_PASSED = {"optimizer": "params", "scheduler": "optimizer"}
_PLAIN = (str, int, float, bool, type(None))
_allowed: set[type] = set()


def allow(cls: type) -> type:
    """Allow an optimizer or scheduler class of your own in specs (by ``module.QualName``); usable as a decorator.

    Only code can do this: a spec in a file can name such a class after the program imported and allowed it.
    """
    if not (isinstance(cls, type) and issubclass(cls, _BASES["optimizer"] + _BASES["scheduler"])):
        raise ConfigError(f"allow() takes an Optimizer or LRScheduler subclass, got {cls!r}")
    _allowed.add(cls)
    return cls


def _allowed_by_name() -> dict[str, type]:
    return {f"{c.__module__}.{c.__qualname__}": c for c in _allowed}


def resolve(target: Any, kind: Kind, where: str) -> type:
    """The class ``target`` names, looked up in already-imported ``torch.optim`` modules (nothing is imported)."""
    bases = _BASES[kind]
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{where}._target_ must name a torch.optim {kind} class, got {target!r}")
    cls = _allowed_by_name().get(target)
    if cls is None:
        module_name, _, name = target.rpartition(".")
        module = sys.modules.get(module_name)
        in_torch_optim = module_name == "torch.optim" or module_name.startswith("torch.optim.")
        obj = getattr(module, name, None) if module is not None and in_torch_optim and name.isidentifier() else None
        defined_there = isinstance(obj, type) and (obj.__module__ or "").startswith("torch.optim")
        cls = obj if defined_there and issubclass(obj, bases) else None
    if cls is None:
        examples = "torch.optim.SGD, torch.optim.Adam" if kind == "optimizer" else "torch.optim.lr_scheduler.StepLR"
        raise ConfigError(
            f"{where}._target_={target!r} is not a torch.optim {kind} class (e.g. {examples}). Specs are looked "
            "up, never imported: a class of your own must be allowed from code with cnnfeat.models.optim.allow(cls)."
        )
    return cls


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_value(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise ConfigError(
            f"{where} must be a plain value (number, string, boolean or a list of them), got {type(value).__name__}"
        )


def check_spec(spec: Any, kind: Kind, where: str) -> tuple[type, dict[str, Any]]:
    """``(class, keyword arguments)`` of a spec, or a :class:`ConfigError` naming the key that is not allowed."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must be a mapping with a _target_, got {type(spec).__name__}")
    if "_target_" not in spec:
        raise ConfigError(f"{where} needs a _target_ (e.g. torch.optim.SGD), got {dict(spec)}")
    cls = resolve(spec["_target_"], kind, where)
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [n for n, p in params.items() if n not in ("self", _PASSED[kind]) and p.kind is not p.VAR_KEYWORD]
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_") or key == _PASSED[kind]:
            raise ConfigError(f"{where}.{key} is not an argument a spec may set (nested and Hydra keys are refused)")
        if key not in known and not takes_any:
            raise ConfigError(f"{where}.{key} is not an argument of {cls.__name__} (it takes {known})")
        _check_value(value, f"{where}.{key}")
    return cls, kwargs


def build_optimizer(spec: Mapping[str, Any], params: Iterable[torch.nn.Parameter], where: str) -> Optimizer:
    """The optimizer a checked spec names, over ``params``."""
    cls, kwargs = check_spec(spec, "optimizer", where)
    return cls(params, **kwargs)


def build_scheduler(spec: Mapping[str, Any], optimizer: Optimizer, where: str) -> Any:
    """The learning-rate scheduler a checked spec names, for ``optimizer``."""
    cls, kwargs = check_spec(spec, "scheduler", where)
    return cls(optimizer, **kwargs)
