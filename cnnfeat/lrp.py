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
meets, whatever order the modules were defined in). ``lrp_rules`` refuses (``LRPError``, naming the node) what these
rules would get wrong: a node that combines two tensors computed from the input (residual additions, concatenation,
products), any other function (``x - mean``, ``torch.sigmoid``: a gradient is not a relevance rule), a module it has no
rule for (LayerNorm, Upsample, ...), a BatchNorm it cannot merge, and a hooked module called twice in one pass (zennit
keeps one set of tensors per module). Where every bias is zero relevance is conserved: the input relevance sums to the
logit (``LRPResult.conserved`` = that sum / the logit; biases and epsilon absorb the rest).
"""

from __future__ import annotations

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

#: functions that route relevance by their gradient without changing it (selection, reshape, copies, ReLU, max pool)
ROUTING_FUNCTIONS = frozenset(
    [
        "relu",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "max_pool1d_with_indices",
        "max_pool2d_with_indices",
        "max_pool3d_with_indices",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "adaptive_max_pool3d",
        "flatten",
        "unflatten",
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "squeeze",
        "unsqueeze",
        "permute",
        "transpose",
        "swapaxes",
        "swapdims",
        "movedim",
        "moveaxis",
        "contiguous",
        "clone",
        "to",
        "type",
        "type_as",
        "float",
        "double",
        "half",
        "bfloat16",
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "repeat",
        "expand",
        "expand_as",
        "getitem",
    ]
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


#: ops that return their input's values unchanged: in front of the first layer they leave relevance on the input itself
IDENTITY_FUNCTIONS = frozenset(["contiguous", "clone", "to", "type", "type_as", "float"])
#: elementwise ops with one constant operand, allowed in front of the first conv/linear layer (input normalisation):
#: relevance is taken at that layer's input, so they only need to keep each value at its pixel
AFFINE_FUNCTIONS = frozenset(["sub", "rsub", "add", "mul", "div", "truediv"])


@dataclass(frozen=True)
class RulePlan:
    """Which zennit rule each module path gets, the (conv/linear, BatchNorm) pairs merged for the pass, and ``entry``:
    the node whose output the first conv/linear layer reads (``input`` when it reads the input), where relevance is
    taken and put back on the input's pixels."""

    rules: dict[str, str]  #: module path -> "flat", "zplus", "epsilon", "pass" or "norm"
    merges: tuple[tuple[str, str], ...]  #: (conv/linear path, BatchNorm path)
    entry: str


def _activation_types() -> tuple[type[nn.Module], ...]:
    from zennit.types import Activation

    return tuple(Activation.__subclass__)


def _refuse(graph: Graph, name: str, why: str) -> LRPError:
    return LRPError(
        f"LRP cannot explain {graph.owner}: node {name!r} {why}. Use Integrated Gradients there "
        "(AttributionCallback(pixel_method='integrated_gradients'))"
    )


def _from_input(graph: Graph, name: str) -> list[str]:
    """The parents of ``name`` that are the input or computed from it."""
    return [p for p in graph.nodes[name].parents if graph.nodes[p].kind == INPUT or graph.nodes[p].depends_on_input]


def lrp_rules(graph: Graph, composite: str = EPSILON_PLUS_FLAT) -> RulePlan:
    """The rule of every module the input's path goes through (see the module docstring), or ``LRPError``."""
    if composite not in COMPOSITES:
        raise ConfigError(f"composite must be one of {list(COMPOSITES)}, got {composite!r}")
    activations = _activation_types()
    rules: dict[str, str] = {}
    merges: list[tuple[str, str]] = []
    calls: dict[str, int] = {}
    entry: str | None = None  # set at the first conv/linear layer
    same = {n.name for n in graph if n.kind == INPUT}  # the input, and identity ops of it: relevance at the input
    for node in graph:
        if node.kind == INPUT or not node.depends_on_input or node.alias:
            continue
        if node.kind == "function" and node.op in IDENTITY_FUNCTIONS and set(_from_input(graph, node.name)) <= same:
            same.add(node.name)
        parents = _from_input(graph, node.name)
        if len(parents) > 1:
            raise _refuse(graph, node.name, f"({node.op}) combines {len(parents)} tensors computed from the input")
        if node.kind == "function":
            if node.op in ROUTING_FUNCTIONS or (entry is None and node.op in AFFINE_FUNCTIONS):
                continue
            where = "" if entry is None else " after the first conv/linear layer"
            raise _refuse(graph, node.name, f"is the function {node.op!r}{where}, for which LRP has no rule")
        module, path = node.module, split_call(node.name)[0]
        calls[path] = calls.get(path, 0) + 1
        layer = isinstance(module, _ConvNd | nn.Linear) and not isinstance(module, _ConvTransposeNd)
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
        if calls[path] > 1:
            raise _refuse(
                graph, node.name, "is a second call of a module with an LRP rule (zennit keeps one per module)"
            )
        if entry is not None:  # in front of the first layer nothing is hooked: relevance is taken at its input
            rules[path] = rule
    if entry is None:
        raise LRPError(f"LRP cannot explain {graph.owner}: the input meets no conv or linear layer")
    return RulePlan(rules, tuple(merges), entry)


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
    return LRPResult(_on_pixels(graph, plan.entry, relevance.detach(), x.shape).cpu(), picked.detach().float().cpu())


def _on_pixels(graph: Graph, entry: str, relevance: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Relevance at ``entry`` (per value of the first layer's input) -> per input value: the same shape as it is, or
    grey images repeated to C channels (summed back); anything else is refused, naming ``entry``."""
    if relevance.shape == shape:
        return relevance
    if (
        len(shape) == relevance.ndim
        and shape[1] == 1
        and shape[0] == relevance.shape[0]
        and shape[2:] == relevance.shape[2:]
    ):
        return relevance.sum(dim=1, keepdim=True)
    raise _refuse(
        graph,
        entry,
        f"feeds the first layer {tuple(relevance.shape[1:])} values per image where the input has "
        f"{tuple(shape[1:])}: its relevance cannot be put back on the input's pixels",
    )
