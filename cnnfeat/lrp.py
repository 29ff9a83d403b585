"""Layer-wise Relevance Propagation (LRP) at the input, by zennit, on the graphs its rules are right for (issue 24).

Core module (no Lightning). ``lrp`` explains class ``targets[i]`` of ``inputs[i]``: the class's logit is the relevance
at the output, and zennit's rules hand it back layer by layer to the input (Bach et al. 2015). One forward and one
backward pass per batch: where Integrated Gradients integrate over tens to hundreds of points, LRP costs one gradient.

**Rules** (``EPSILON_PLUS_FLAT``, the composite zennit and Kohlbrenner et al. 2020 recommend for CNNs): the Flat rule
in the first conv/linear layer the input meets, z+ in every other convolution, epsilon in every fully connected layer;
activation modules pass relevance on (zennit's Pass), average-pooling modules share it in proportion to their inputs
(Norm); max pooling, ``F.relu``, reshapes, dropout and copies (``repeat``/``expand``: the copies' relevance is summed)
route it by their gradient. A BatchNorm right after a conv/linear layer (whose output only it reads) is merged into that
layer for the pass (zennit's ``NamedMergeBatchNorm``; the original parameter tensors are put back afterwards).
``EPSILON`` (the epsilon rule in every layer) equals gradient x input on a ReLU network without biases (Ancona et al.
2018): the tests' independent check.

The rules are assigned from cnnfeat's traced graph, in execution order (the "first layer" is the first one the input
meets, whatever order the modules were defined in). Relevance is taken at that layer's input, so in front of it only
ops that keep each value at its pixel are allowed (identity ops, elementwise ops with a constant such as input
standardisation, dropout, order-preserving reshapes, copies along dimension 1); it is then put back on the input's
pixels exactly. ``lrp_rules`` refuses (``LRPError``, naming the node) what these rules would get wrong: anything else
in front of the first layer (``transpose``, channel indexing), a node that combines two tensors computed from the
input (residual additions, concatenation, products), any other function after the first layer (``torch.sigmoid``: a
gradient is not a relevance rule), a module it has no rule for (LayerNorm, Upsample, ...), a BatchNorm it cannot merge,
and a second call of a module that gets a rule or a merge, on any tensor (zennit keeps one set of tensors per module).
Where every bias is zero relevance is conserved: the input relevance sums to the logit (``LRPResult.conserved`` =
that sum / the logit; biases and epsilon absorb the rest).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.dropout import _DropoutNd

from cnnfeat.attribution import LRPResult, check_targets, evaluating, forward_with_taps, pick
from cnnfeat.errors import ConfigError
from cnnfeat.graph import INPUT, Graph, Node, device_of, split_call, trace_graph

EPSILON_PLUS_FLAT = "epsilon_plus_flat"
EPSILON = "epsilon"
COMPOSITES = (EPSILON_PLUS_FLAT, EPSILON)

#: ops that return their input's values unchanged: in front of the first layer they leave relevance on the input itself
IDENTITY_FUNCTIONS = frozenset(["contiguous", "clone", "to", "type", "type_as", "float"])
#: reshapes that keep the values in their (row-major) order
ORDER_PRESERVING_RESHAPES = frozenset(
    ["flatten", "unflatten", "view", "view_as", "reshape", "reshape_as", "squeeze", "unsqueeze", "contiguous"]
)
DROPOUT_FUNCTIONS = frozenset(["dropout", "dropout1d", "dropout2d", "dropout3d"])
#: copies (grey repeated to RGB): allowed in front of the first layer along dimension 1 only
COPY_FUNCTIONS = frozenset(["repeat", "expand", "expand_as"])
#: elementwise ops with one constant operand, allowed in front of the first conv/linear layer (input normalisation):
#: relevance is taken at that layer's input, so they only need to keep each value at its pixel
AFFINE_FUNCTIONS = frozenset(["sub", "rsub", "add", "mul", "div", "truediv"])
#: functions that route relevance by their gradient without changing it (selection, reshape, copies, ReLU, max pool)
ROUTING_FUNCTIONS = (
    IDENTITY_FUNCTIONS
    | ORDER_PRESERVING_RESHAPES
    | DROPOUT_FUNCTIONS
    | COPY_FUNCTIONS
    | frozenset(
        ["relu", "getitem", "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"]
        + ["double", "half", "bfloat16"]
        + [f"{kind}max_pool{d}d" for kind in ("", "adaptive_") for d in (1, 2, 3)]
        + [f"max_pool{d}d_with_indices" for d in (1, 2, 3)]
    )
)
#: modules without a rule of their own that route relevance by their gradient
ROUTING_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    _DropoutNd,
)
AVG_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)


class LRPError(ConfigError):
    """A graph node that the LRP rules cannot explain correctly (the message names it)."""


@dataclass(frozen=True)
class RulePlan:
    """Which zennit rule each module path gets, the (conv/linear, BatchNorm) pairs merged for the pass, and ``entry``:
    the node whose output the first conv/linear layer reads (``input`` when it reads the input), where relevance is
    taken and put back on the input's pixels."""

    rules: dict[str, str]  #: module path -> "flat", "zplus", "epsilon", "pass" or "norm"
    merges: tuple[tuple[str, str], ...]  #: (conv/linear path, BatchNorm path)
    entry: str
    copies: int = 1  #: how many whole copies of each image's input values ``entry`` holds (grey repeated to RGB: 3)


def _activation_types() -> tuple[type[nn.Module], ...]:
    from zennit.types import Activation

    return tuple(Activation.__subclass__)


def _refuse(graph: Graph, name: str, why: str) -> LRPError:
    return LRPError(
        f"LRP cannot explain {graph.owner}: node {name!r} {why}. Use Integrated Gradients there "
        "(AttributionCallback(pixel_method='integrated_gradients'))"
    )


def _computed_from_input(graph: Graph, name: str) -> bool:
    return graph.nodes[name].kind == INPUT or graph.nodes[name].depends_on_input


def _from_input(graph: Graph, name: str) -> list[str]:
    """The parents of ``name`` that are the input or computed from it."""
    return [p for p in graph.nodes[name].parents if _computed_from_input(graph, p)]


def _arg_shapes(graph: Graph, node: Node) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the shape of the node's argument computed from the input, its output shape)."""
    for producer, shape in zip(node.inputs, node.input_shapes, strict=False):
        if producer is not None and _computed_from_input(graph, producer):
            return tuple(shape), tuple(node.output_shape)
    return tuple(node.output_shape), tuple(node.output_shape)


def _copies_along_dim1(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    """Whether ``after`` is ``before`` with only dimension 1 (channels, features) made a whole multiple larger."""
    return (
        len(before) == len(after) >= 2
        and before[0] == after[0]
        and before[2:] == after[2:]
        and after[1] % max(before[1], 1) == 0
    )


def _prefix_ok(graph: Graph, node: Node) -> str | None:
    """Why ``node`` in front of the first conv/linear layer would move relevance off its pixel (None: it does not).
    Allowed: identity ops, elementwise ops with a constant, dropout, order-preserving reshapes (``view``,
    ``flatten``, ...), and copies along dimension 1 (grey repeated to RGB): relevance then maps back exactly."""
    before, after = _arg_shapes(graph, node)
    if node.kind == "module":
        module = node.module
        if isinstance(module, nn.Flatten | nn.Unflatten | nn.Identity | _DropoutNd):
            return None
        return f"is a {type(module).__name__} in front of the first conv/linear layer"
    if node.op in ORDER_PRESERVING_RESHAPES:
        return None
    if node.op in IDENTITY_FUNCTIONS | AFFINE_FUNCTIONS | DROPOUT_FUNCTIONS | COPY_FUNCTIONS:
        if after == before or _copies_along_dim1(before, after):
            return None
        return f"({node.op}) changes the input's shape {before} -> {after} other than by copies along dimension 1"
    return f"({node.op}) rearranges or changes the input in front of the first conv/linear layer"


def lrp_rules(graph: Graph, composite: str = EPSILON_PLUS_FLAT) -> RulePlan:
    """The rule of every module the input's path goes through (see the module docstring), or ``LRPError``."""
    if composite not in COMPOSITES:
        raise ConfigError(f"composite must be one of {list(COMPOSITES)}, got {composite!r}")
    activations = _activation_types()
    rules: dict[str, str] = {}
    merges: list[tuple[str, str]] = []
    calls: dict[str, list[str]] = {}  # module path -> its node names (every call, from the input or not)
    for n in graph:
        if n.kind == "module" and not n.alias:
            calls.setdefault(split_call(n.name)[0], []).append(n.name)
    entry: str | None = None  # set at the first conv/linear layer
    same = {n.name for n in graph if n.kind == INPUT}  # the input, and identity ops of it: relevance at the input
    for node in graph:
        if node.kind == INPUT or not node.depends_on_input or node.alias:
            continue
        parents = _from_input(graph, node.name)
        if len(parents) > 1:
            raise _refuse(graph, node.name, f"({node.op}) combines {len(parents)} tensors computed from the input")
        module = node.module if node.kind == "module" else None
        layer = isinstance(module, _ConvNd | nn.Linear) and not isinstance(module, _ConvTransposeNd)
        if entry is None and not layer:  # in front of the first layer: nothing is hooked, values must keep their pixel
            if (why := _prefix_ok(graph, node)) is not None:
                raise _refuse(graph, node.name, why)
            if node.kind == "function" and node.op in IDENTITY_FUNCTIONS and set(parents) <= same:
                same.add(node.name)
            continue
        if node.kind == "function":
            if node.op in ROUTING_FUNCTIONS:
                continue
            why = f"is the function {node.op!r} after the first conv/linear layer, for which LRP has no rule"
            raise _refuse(graph, node.name, why)
        path = split_call(node.name)[0]
        if layer:
            if entry is None:
                entry = INPUT if parents[0] in same else parents[0]
                rule = "epsilon" if composite == EPSILON else "flat"
            else:
                rule = "zplus" if composite != EPSILON and isinstance(module, _ConvNd) else "epsilon"
        elif isinstance(module, ROUTING_MODULES):
            continue
        elif isinstance(module, _BatchNorm):
            merges.append((_mergeable(graph, node), path))
            continue
        elif isinstance(module, activations):
            rule = "pass"
        elif isinstance(module, AVG_POOL_MODULES):
            rule = "norm"
        else:
            raise _refuse(graph, node.name, f"is a {type(module).__name__}, for which LRP has no rule")
        rules[path] = rule
    if entry is None:
        raise LRPError(f"LRP cannot explain {graph.owner}: the input meets no conv or linear layer")
    hooked = [*rules, *(p for pair in merges for p in pair)]
    for path in dict.fromkeys(hooked):
        if len(calls.get(path, [])) > 1:  # zennit keeps one set of tensors per module; a merge would run twice
            raise _refuse(graph, calls[path][1], f"is another call of {path!r}, which LRP hooks or merges (once only)")
    # relevance at the entry maps back onto the input's pixels, or a refusal now
    return RulePlan(rules, tuple(merges), entry, _pixel_factor(graph, entry))


def _pixel_factor(graph: Graph, entry: str) -> int:
    """How many copies of each input value the first layer's input holds (1: none), or ``LRPError``."""
    inputs = [n for n in graph if n.kind == INPUT]
    if entry == INPUT or not inputs:
        return 1
    per_image_in = math.prod(inputs[0].output_shape[1:])
    per_image_entry = math.prod(graph.nodes[entry].output_shape[1:])
    if per_image_in and per_image_entry % per_image_in == 0:
        return per_image_entry // per_image_in
    raise _refuse(
        graph,
        entry,
        f"feeds the first layer {per_image_entry} values per image where the input has {per_image_in}: its "
        "relevance cannot be put back on the input's pixels",
    )


def _mergeable(graph: Graph, node: Node) -> str:
    """The conv/linear module path a BatchNorm node merges into, or ``LRPError``."""
    module = node.module
    assert isinstance(module, _BatchNorm)
    if not module.affine or module.running_mean is None:
        raise _refuse(graph, node.name, "is a BatchNorm without affine parameters or running statistics")
    parents = _from_input(graph, node.name)
    parent = graph.nodes[parents[0]] if parents else None
    ok = (
        parent is not None
        and parent.kind == "module"
        and not parent.alias
        and isinstance(parent.module, _ConvNd | nn.Linear)
        and not isinstance(parent.module, _ConvTransposeNd)
        and graph.children(parent.name) == [node.name]
    )
    if not ok:
        raise _refuse(
            graph, node.name, "is a BatchNorm that does not directly follow a conv/linear layer it can merge into"
        )
    return split_call(parent.name)[0]


def _composite(plan: RulePlan, epsilon: float) -> object:
    from zennit.canonizers import NamedMergeBatchNorm
    from zennit.composites import NameMapComposite
    from zennit.rules import Epsilon, Flat, Norm, Pass, ZPlus

    makers: dict[str, Callable[[], object]] = {
        "flat": Flat,
        "zplus": ZPlus,
        "epsilon": lambda: Epsilon(epsilon=epsilon),
        "pass": Pass,
        "norm": Norm,
    }
    name_map = [
        (tuple(p for p, r in plan.rules.items() if r == rule), make())
        for rule, make in makers.items()
        if rule in plan.rules.values()
    ]
    canonizers = [NamedMergeBatchNorm([((conv,), bn) for conv, bn in plan.merges])] if plan.merges else []
    return NameMapComposite(name_map=name_map, canonizers=canonizers)


def lrp(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    graph: Graph | None = None,
    composite: str = EPSILON_PLUS_FLAT,
    epsilon: float = 1e-6,
) -> LRPResult:
    """LRP of class ``targets[i]`` for ``inputs[i]`` (see the module docstring) in eval mode, every submodule's mode
    restored; ``graph``: the model's traced graph (traced here from one input when ``None``)."""
    if len(inputs) == 0:
        raise ConfigError("lrp needs at least one input")
    device = device_of(model)
    if graph is None:
        with evaluating(model), torch.no_grad():
            graph = trace_graph(model, inputs[:1].to(device))
    plan = lrp_rules(graph, composite)
    with evaluating(model):
        x = inputs.to(device).float().detach().clone()
        with _composite(plan, epsilon).context(model):  # type: ignore[attr-defined]
            if plan.entry == INPUT:
                wrt = x.requires_grad_(True)
                logits = model(x)
            else:  # relevance at the first layer's input: what the input normalisation in front of it made
                logits, taps = forward_with_taps(model, x, [plan.entry])
                wrt = taps[plan.entry]
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                raise ConfigError(f"{type(model).__name__} must return class scores (N, K) for LRP")
            targets = check_targets(targets, len(x), logits.shape[1])
            picked = pick(logits, targets)
            seed = torch.zeros_like(logits).scatter(1, targets.to(device).view(-1, 1), picked.detach().view(-1, 1))
            (relevance,) = torch.autograd.grad(logits, wrt, grad_outputs=seed)
    # per input value: the prefix only reshapes in order and copies along dimension 1 (``_prefix_ok``), so each image's
    # values at the entry are ``copies`` whole copies of its input's, one after the other: their relevance is summed
    pixels = relevance.detach().reshape(len(x), plan.copies, -1).sum(dim=1).reshape(x.shape)
    return LRPResult(pixels.cpu(), picked.detach().float().cpu())
