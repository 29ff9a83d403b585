"""Your own ``nn.Module`` as a cnnfeat classifier (``model=custom model.net._target_=my_package.MyNet``).

``model.net`` is a spec like Hydra's: ``_target_`` is the class's import path, the other keys its keyword arguments
(``+model.net.width=32`` on the command line). ``num_classes`` and ``in_channels`` (from the data) are passed too
when the class's ``__init__`` takes arguments of those names and the spec does not set them. The class must be an
``nn.Module`` that turns images (N, C, H, W) in [0, 1] into logits (N, num_classes); the model checks this once on
an example input. ``features(x)`` is the input of the network's last ``Linear`` call on that input (found on the
traced graph), the penultimate vector the UMAP maps; ``freeze=backbone`` trains only that layer.

Checkpoints: the spec is saved as plain values. Training imports the class (your config, like Hydra's own
``_target_``). Rebuilding from a checkpoint (:func:`cnnfeat.run.checkpoints.load_model`, ``cnnfeat-explore``) imports
nothing named in the file: the class must already be imported (``import my_package`` first) and be an
``nn.Module``, otherwise the checkpoint is refused with a message that says so, before anything is built.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cnnfeat import graph as cgraph
from cnnfeat.errors import ConfigError, check_int
from cnnfeat.models.classifier import NetClassifier, check_freeze, plain

#: the arguments the classifier passes to the network's class when it takes them and the spec leaves them out
PASSED = ("num_classes", "in_channels")


def _lookup(module: Any, qualname: str) -> Any:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def resolve_net_class(target: Any, import_modules: bool = True, where: str = "model.net") -> type[nn.Module]:
    """The ``nn.Module`` subclass that ``target`` (``package.module.ClassName``) names.

    ``import_modules=False`` (checkpoints): only modules already imported are searched; nothing is imported.
    """
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(
            f"{where}._target_ must name your network's class, e.g. {where}._target_=my_package.MyNet, got {target!r}"
        )
    parts = target.split(".")
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ConfigError(f"{where}._target_={target!r} is not an import path like my_package.module.MyNet")
    found, errors = None, []
    for i in range(len(parts) - 1, 0, -1):  # the longest module prefix that exists
        module_name = ".".join(parts[:i])
        module = sys.modules.get(module_name)
        if module is None and import_modules:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                errors.append(str(e))
                continue
        if module is not None:
            found = _lookup(module, ".".join(parts[i:]))
            break
    if found is None:
        if not import_modules:
            raise ConfigError(
                f"{where}._target_={target!r} is not imported. Nothing named in a checkpoint is imported: import "
                f"{parts[0]} in your program first (then the class is looked up), or build the model yourself and "
                "load its state_dict."
            )
        raise ConfigError(
            f"{where}._target_={target!r} cannot be imported ({'; '.join(errors) or 'no such attribute'}). Is the "
            "package installed, or its folder on PYTHONPATH (e.g. PYTHONPATH=. cnnfeat-train ...)?"
        )
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ConfigError(f"{where}._target_={target!r} is a {type(found).__name__}, not an nn.Module class")
    return found


def check_spec(net: Any, import_modules: bool = True) -> tuple[type[nn.Module], dict[str, Any]]:
    """``(class, keyword arguments)`` of a ``model.net`` spec; Hydra keys other than ``_target_`` are refused."""
    net = plain(net)
    if not isinstance(net, Mapping):
        raise ConfigError(f"model.net must be a mapping with a _target_ (your network's class), got {net!r}")
    kwargs = {k: v for k, v in net.items() if k != "_target_"}
    bad = [k for k in kwargs if not isinstance(k, str) or not k.isidentifier() or k.startswith("_")]
    if bad:
        raise ConfigError(f"model.net: {bad} are not keyword arguments (Hydra keys other than _target_ are refused)")
    return resolve_net_class(net.get("_target_"), import_modules), kwargs


def last_linear(net: nn.Module, example: torch.Tensor) -> str:
    """Name of the module of the last ``Linear`` call of one forward pass (the last ``Conv2d`` if there is none)."""
    graph = cgraph.trace_graph(net, example)
    calls = [n for n in graph if n.kind == "module" and not n.alias]
    for kind in (nn.Linear, nn.Conv2d):
        hits = [n for n in calls if isinstance(n.module, kind)]
        if hits:
            return cgraph.split_call(hits[-1].name)[0]
    raise ConfigError(f"{type(net).__name__} calls no Linear or Conv2d layer: features() has no penultimate vector")


class CustomClassifier(NetClassifier):
    """Your ``nn.Module`` (``net``: ``{"_target_": "pkg.MyNet", **kwargs}``) wrapped as a cnnfeat classifier.

    Images arrive as the DataModule gives them ((N, in_channels, image_size, image_size), in [0, 1]); your network
    does its own normalisation. ``freeze``: ``none`` | ``backbone`` (only the last Linear trains). See the module
    docstring for what is passed to your class and how checkpoints are reloaded.
    """

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        freeze: str | None = "none",
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(num_classes=num_classes, optimizer=optimizer, scheduler=scheduler)
        check_int("model.in_channels", in_channels)
        check_int("model.image_size", image_size)
        frozen = check_freeze(freeze)
        net = plain(net)  # saved as plain values
        cls, kwargs = check_spec(net)
        self.save_hyperparameters()
        params = inspect.signature(cls.__init__).parameters
        passed = {"num_classes": num_classes, "in_channels": in_channels}
        kwargs.update({k: v for k, v in passed.items() if k in params and k not in kwargs})
        target = f"{cls.__module__}.{cls.__qualname__}"
        try:
            module = cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"model.net ({target}): {e}") from e
        example = torch.zeros(1, in_channels, image_size, image_size)
        try:
            head = last_linear(module, example)
            with torch.no_grad():
                out = module.eval()(example)
        except RuntimeError as e:
            if example.is_meta:  # built on the meta device (checkpoints): let the caller build it for real
                raise
            raise ConfigError(
                f"model.net ({target}) fails on a {tuple(example.shape)} input: {str(e).splitlines()[0][:200]}"
            ) from e
        module.train()
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"model.net ({target}) returns {shape} for a {tuple(example.shape)} input; the classifier needs "
                f"logits (N, {num_classes}): num_classes={num_classes} (from the data)"
            )
        self.attach(module, head, in_channels, image_size, freeze=frozen)

    @classmethod
    def check_checkpoint_hparams(cls, hparams: Mapping[str, Any]) -> None:
        """Before a checkpoint is rebuilt: its network class must be imported already and an ``nn.Module``."""
        check_spec(hparams.get("net"), import_modules=False)
