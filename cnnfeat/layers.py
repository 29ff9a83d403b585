"""Find layers of any ``nn.Module`` by name and read their outputs.

Module names are those of ``named_modules()`` (``conv1``, ``features.0``); ``trace``, ``activation_after`` and
``capture`` work on the nodes of ``cnnfeat.graph`` (functional ops, each call of a module), whose names
extend them. Errors are ``LayerError`` and list the valid names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from cnnfeat import graph as _graph
from cnnfeat.graph import LayerError, unknown_names

__all__ = [
    "ACTIVATIONS",
    "LayerCall",
    "LayerError",
    "activation_after",
    "capture",
    "conv_layers",
    "relu_layers",
    "resolve_layers",
    "trace",
]

#: Modules treated as the ReLU-type activation of a conv layer.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)


def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """All ``Conv2d`` layers, by name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def relu_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All ReLU-type activation modules, by name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ACTIVATIONS)}


def resolve_layers(
    model: nn.Module, names: Iterable[str], kind: type | tuple[type, ...] = nn.Module, what: str = "layer"
) -> dict[str, nn.Module]:
    """Map each name to its module; unknown names (or the wrong kind) raise one error listing valid names."""
    modules = dict(model.named_modules())
    valid = [n for n, m in modules.items() if n and isinstance(m, kind)]
    bad = [n for n in names if n not in modules or not isinstance(modules[n], kind)]
    if bad:
        raise unknown_names(bad, valid, type(model).__name__, what)
    return {n: modules[n] for n in names}


@dataclass(frozen=True)
class LayerCall:
    """One leaf module call seen while tracing a forward pass (``name`` is its node name, ``conv:1`` for a 2nd call)."""

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def trace(model: nn.Module, x: torch.Tensor) -> list[LayerCall]:
    """Leaf modules (built-in or user-defined, without children) in the order a forward pass calls them.

    Execution order (not registration order), with input and output shapes; from ``cnnfeat.graph.trace_graph``.
    """
    return [
        LayerCall(n.name, n.module, n.input_shapes[0], n.output_shape)
        for n in _graph.trace_graph(model, x)
        if n.kind == "module" and n.input_shapes and next(n.module.children(), None) is None
    ]


def activation_after(model: nn.Module, x: torch.Tensor) -> dict[str, str | None]:
    """For each conv call, the node name of the first activation applied to its output, or ``None``.

    Found on the graph of a forward pass on ``x`` (``cnnfeat.graph.activation_after``): through BatchNorm,
    bias, dropout and identity, for activation modules and functional activations alike.
    """
    g = _graph.trace_graph(model, x)
    return {conv: _graph.activation_after(g, conv)[0] for conv in _graph.conv_nodes(g)}


@contextmanager
def capture(model: nn.Module, names: Iterable[str], inputs: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output (or, with ``inputs=True``, the input) of each named node during forward passes.

    ``cnnfeat.graph.capture``: tensors are *cloned* when produced, so a conv followed by
    ``ReLU(inplace=True)`` (AlexNet) keeps its pre-ReLU map, in the standard (NCHW) layout even when the
    model runs channels_last. A later forward pass replaces the stored tensor; hooks are removed on exit.
    """
    with _graph.capture(model, names, inputs) as out:
        yield out
