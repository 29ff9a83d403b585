"""The layer plan: one typed description of a network's layers, traced once and read by every analysis.

``LayerPlan.trace(model, example)`` runs one traced forward pass (``cnnfeat.graph``) and records, per node, what the
analyses ask of it: its kind (``conv``, ``relu``, ``activation``, ``linear``, ``pool``, ``norm``, ``other``), the
module that computes it, its units (channels or features) and output shape, and for every convolution the
activation applied to its output (``cnnfeat.graph.activation_after``, with the reason when there is none).
Receptive fields (``cnnfeat.receptive_field``) are derived on first request and kept. The picture callbacks build
one plan per model in ``setup`` and read it instead of re-tracing; the atlas records its layer descriptions from it.

A plan describes the path of the example it was traced on. For a network whose path depends on the data (a branch
on the input's brightness), the analysis that cuts patches (``cnnfeat.topk``) still traces each batch it reads, so
each patch comes from the geometry of the pass that produced it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from cnnfeat.errors import ConfigError
from cnnfeat.graph import (
    Graph,
    Node,
    activation_after,
    conv_nodes,
    is_activation,
    is_relu_family,
    split_call,
    trace_graph,
    unknown_names,
)
from cnnfeat.receptive_field import ReceptiveField, graph_receptive_fields

__all__ = ["KINDS", "LayerPlan", "PlannedLayer"]

#: every kind a planned layer can have
KINDS = ("conv", "relu", "activation", "linear", "pool", "norm", "other")

_POOL_OPS = ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "lp_pool2d")
_NORM_OPS = ("batch_norm", "layer_norm", "group_norm", "instance_norm", "local_response_norm")


@dataclass(frozen=True)
class PlannedLayer:
    """One node of the plan: what the analyses need to know about it."""

    name: str  #: graph node name (a later call of a module: ``layer1.0.relu:1``)
    kind: str  #: one of ``KINDS``
    op: str  #: module class (``Conv2d``) or function name (``relu``)
    module: str | None  #: ``named_modules()`` path of the atomic module that computes it (None: a functional op)
    units: int | None  #: channels (N, C, H, W) or features (N, F) of its output; None for other shapes
    output_shape: tuple[int, ...]  #: without the batch dimension
    activation: str | None = None  #: a conv's or linear layer's activation node (the first applied to its output)
    activation_note: str = ""  #: a conv or linear layer without one: why (names the node that comes first)

    @property
    def spatial(self) -> bool:
        """Whether the output is a map of units over positions, (C, H, W)."""
        return len(self.output_shape) == 3


def _kind(node: Node) -> str:
    module = node.module if node.kind == "module" and not node.alias else None
    if is_relu_family(node):
        return "relu"
    if is_activation(node):
        return "activation"
    if isinstance(module, nn.Linear) or (node.kind == "function" and node.op == "linear"):
        return "linear"
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or (
        node.kind == "function" and node.op in _POOL_OPS
    ):
        return "pool"
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) or (
        node.kind == "function" and node.op in _NORM_OPS
    ):
        return "norm"
    return "other"


#: ops that pool a whole map (squeeze-excitation gates start with one)
_GLOBAL_POOLS = frozenset(
    {"AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "mean"}
)


class LayerPlan:
    """The typed layers of one network (see the module docstring); build it with ``trace``."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.owner = graph.owner
        convs = set(conv_nodes(graph))
        self.layers: dict[str, PlannedLayer] = {}
        for node in graph:
            if node.kind == "input":
                continue
            kind = "conv" if node.name in convs else _kind(node)
            act, note = activation_after(graph, node.name) if kind in ("conv", "linear") else (None, "")
            shape = tuple(node.output_shape[1:])
            self.layers[node.name] = PlannedLayer(
                name=node.name,
                kind=kind,
                op=node.op,
                module=split_call(node.name)[0] if node.kind == "module" and not node.alias else None,
                units=shape[0] if len(shape) in (1, 3) else None,
                output_shape=shape,
                activation=act,
                activation_note=note,
            )
        self._fields: dict[str, ReceptiveField] = {}

    def image_bytes(self, outputs: Iterable[str] | None = None, inputs: Iterable[str] = ()) -> int:
        """Bytes (float32) one image's values take at the ``outputs`` nodes (``None``: every node, what a traced pass
        holds) and at the inputs of the ``inputs`` nodes (their parents' outputs): what sizes a probe batch."""
        nodes = self.graph.nodes

        def size(name: str) -> int:
            node = nodes.get(name)
            return 0 if node is None else math.prod(node.output_shape[1:])

        names = list(nodes) if outputs is None else list(outputs)
        names += [p for n in inputs if n in nodes for p in nodes[n].parents]
        return 4 * sum(size(n) for n in names)

    @classmethod
    def trace(cls, model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...]) -> LayerPlan:
        """The plan of ``model`` from one traced forward pass on ``example`` (a batch on the model's device)."""
        return cls(trace_graph(model, example))

    # -- lookups -------------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __getitem__(self, name: str) -> PlannedLayer:
        return self.resolve([name])[0]

    def resolve(self, names: Iterable[str], what: str = "layer") -> list[PlannedLayer]:
        """The layers of ``names``; unknown names raise one ``LayerError`` listing the valid ones."""
        names = list(names)
        bad = [n for n in names if n not in self.layers]
        if bad:
            raise unknown_names(bad, list(self.layers), self.owner, what)
        return [self.layers[n] for n in names]

    def of_kind(self, *kinds: str) -> list[str]:
        """Node names of the given kinds, in execution order."""
        return [n for n, layer in self.layers.items() if layer.kind in kinds]

    @property
    def convs(self) -> list[str]:
        """Every 2-d convolution call, in execution order (``cnnfeat.graph.conv_nodes``)."""
        return self.of_kind("conv")

    @property
    def relus(self) -> list[str]:
        """Every ReLU-family application, in execution order (``cnnfeat.graph.relu_family_nodes``)."""
        return self.of_kind("relu")

    def resolve_convs(self, names: Iterable[str]) -> list[PlannedLayer]:
        """The conv layers of ``names``; a name that is not a conv node raises a ``LayerError`` listing the convs."""
        names = list(names)
        bad = [n for n in names if n not in self.layers or self.layers[n].kind != "conv"]
        if bad:
            raise unknown_names(bad, self.convs, self.owner, "conv layer")
        return [self.layers[n] for n in names]

    def stage_convs(self, limit: int = 6, local: bool = False) -> list[str]:
        """The first conv of each stage (each new output resolution), in execution order; at most ``limit``, spread
        evenly over the stages when there are more; ``local``: only convs whose receptive field can be derived.
        (6: a ResNet's stem and its four stages are five resolutions, and each gets its picture.)"""
        firsts, seen = [], set()
        for name in self.convs:
            size = self.layers[name].output_shape[1:]
            if size in seen or self._in_gate(name):
                continue
            if local:
                try:
                    self.field(name)
                except ConfigError:
                    continue
            seen.add(size)
            firsts.append(name)
        if len(firsts) <= limit:
            return firsts
        step = (len(firsts) - 1) / (limit - 1) if limit > 1 else 0
        return [firsts[round(i * step)] for i in range(limit)]

    def _in_gate(self, name: str) -> bool:
        """Whether conv ``name`` works on a globally pooled vector (a squeeze-excitation gate's 1x1 convs): walking
        back through ops on 1x1 maps reaches a pooling that took a larger map to 1x1. Not a stage of the network."""
        nodes, cur = self.graph.nodes, self.graph[name].name
        while True:
            parents = [p for p in nodes[cur].parents if nodes[p].depends_on_input]
            if len(parents) != 1:
                return False
            parent = nodes[parents[0]]
            if len(parent.output_shape) != 4 or tuple(parent.output_shape[-2:]) != (1, 1):
                return False
            shapes = [s for s in parent.input_shapes if len(s) == 4]
            if shapes and tuple(shapes[0][-2:]) != (1, 1):  # this op made the 1x1 map from a larger one
                return parent.op in _GLOBAL_POOLS  # a global pooling; a strided pool or conv to 1x1 is a stage
            cur = parent.name

    def calls(self, name: str) -> list[str]:
        """Every call of the module (or function) behind ``name`` in one pass (``conv``, ``conv:1``, ...)."""
        base = split_call(name)[0]
        return [n for n in self.layers if split_call(n)[0] == base]

    def fields(self, names: Iterable[str]) -> dict[str, ReceptiveField]:
        """Receptive fields of ``names`` (derived once each); a node without one raises the error naming why."""
        names = list(names)
        todo = [n for n in names if n not in self._fields]
        if todo:
            self.resolve(todo)
            found = graph_receptive_fields(self.graph, todo)
            self._fields.update(found)
            for name, f in found.items():
                if f.joined is not None:
                    warnings.warn(
                        f"{name!r}: its channels come from branches concatenated at {f.joined!r} with different "
                        "receptive fields, and cnnfeat keeps one field per layer: each box is the union of the "
                        "branches' fields, wider than a narrower branch's channels see (name a layer inside a "
                        "branch, or after the next conv, for exact boxes)",
                        stacklevel=2,
                    )
        return {n: self._fields[n] for n in names}

    def field(self, name: str) -> ReceptiveField:
        """The receptive field of ``name``'s units (see ``fields``)."""
        return self.fields([name])[name]

    def weights(self, name: str, model: nn.Module) -> nn.Module | None:
        """The Conv2d / Linear module whose weights make ``name``'s units (None for a functional op)."""
        layer = self[name]
        if layer.module is None:
            return None
        module = dict(model.named_modules()).get(layer.module)
        return module if isinstance(module, (nn.Conv2d, nn.Linear)) else None

    def summary(self) -> Mapping[str, int]:
        """How many layers of each kind the plan holds (for the log line that says what was found)."""
        counts = {k: 0 for k in KINDS}
        for layer in self.layers.values():
            counts[layer.kind] += 1
        return {k: v for k, v in counts.items() if v}
