"""What a forward pass computes, as a graph of named nodes; capture any node's tensor by its name.

A *node* is one tensor-producing step of one eager forward pass, recorded with module hooks (for the
scope) and a ``TorchFunctionMode`` (for functional ops), so models with data-dependent Python control
flow work (no ``torch.fx``). Three kinds of node:

- ``module``: a call of an *atomic* module (a ``torch.nn`` built-in without children: ``Conv2d``, ``ReLU``,
  ``BatchNorm2d``, ``MaxPool2d``, ``Linear``, ...), named by its ``named_modules()`` path; the torch
  functions it calls inside are not nodes. User-defined modules (even leaf ones) and containers are traced
  into; their output is also a ``module`` node (an *alias* of the node that produced that tensor).
- ``function``: a torch function or tensor method called by user code (``F.relu``, ``torch.cat``, ``x.view``,
  ``+``), named ``<enclosing module path>.<op>`` (``layer1.0.add``), or just ``<op>`` at the top level.
  ``op`` is the function's name with dunders and in-place underscores dropped (``__add__``, ``__iadd__``,
  ``add_`` -> ``add``; ``relu_`` -> ``relu``; ``__getitem__`` -> ``getitem``); if that name is a module's
  path, ``()`` is appended (``layer1.0.relu()`` is ``F.relu`` beside a module ``layer1.0.relu``).
- ``input``: the model's tensor arguments, ``input`` (not capturable; every path starts there).

**Calls.** The k-th time (k >= 1) one forward pass produces a node of the same name, the name gets ``:k``
(torchvision's ``BasicBlock`` applies one ``relu`` module twice: ``layer1.0.relu``, ``layer1.0.relu:1``).
A forward pass is one call of the model; outside ``model(...)`` (e.g. ``model.features(x)``), one outermost
call of any of its submodules. Tracing and capturing use this one rule.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.overrides import TorchFunctionMode

from cnnfeat.errors import ConfigError

INPUT = "input"

#: Activation modules and functions that ``activation_after`` accepts as "the activation of a conv".
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Mish,
    nn.Softplus,
)
ACTIVATION_FUNCTIONS = frozenset(
    [
        "relu",
        "relu6",
        "leaky_relu",
        "prelu",
        "rrelu",
        "gelu",
        "silu",
        "hardswish",
        "hardsigmoid",
        "hardtanh",
        "tanh",
        "sigmoid",
        "elu",
        "celu",
        "selu",
        "mish",
        "softplus",
    ]
)
#: The ReLU family, whose units can die: ReLU/ReLU6 modules, F.relu (torch.relu, x.relu_()) and F.relu6.
RELU_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
RELU_FUNCTIONS = frozenset({"relu", "relu6"})

#: Ops that ``activation_after`` walks through: they keep each unit's value apart from a fixed affine map.
PASS_MODULES: tuple[type[nn.Module], ...] = (_BatchNorm, _DropoutNd, nn.Identity)
PASS_FUNCTIONS = frozenset(
    [
        "batch_norm",
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "feature_alpha_dropout",
        "contiguous",
        "clone",
        "detach",
        "to",
        "type",
        "type_as",
        "float",
        "double",
        "half",
        "bfloat16",
    ]
)
_BINARY = frozenset(
    ["add", "sub", "mul", "div", "truediv", "floordiv", "matmul", "mod", "pow", "and", "or", "xor", "lshift", "rshift"]
)

#: Positional parameter names of the functions whose arguments the graph keeps (``Node.params``).
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    "adaptive_avg_pool2d": ("input", "output_size"),
    "adaptive_max_pool2d": ("input", "output_size", "return_indices"),
    "pad": ("input", "pad", "mode", "value"),
    "cat": ("tensors", "dim"),
    "concat": ("tensors", "dim"),
    "concatenate": ("tensors", "dim"),
    "getitem": ("self", "index"),
    "interpolate": ("input", "size", "scale_factor", "mode", "align_corners"),
    "softmax": ("input", "dim"),
    "log_softmax": ("input", "dim"),
    "flatten": ("input", "start_dim", "end_dim"),
    "conv_transpose2d": ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    "permute": ("input", "dims"),
    "transpose": ("input", "dim0", "dim1"),
    "swapaxes": ("input", "dim0", "dim1"),
    "swapdims": ("input", "dim0", "dim1"),
    "movedim": ("input", "source", "destination"),
    "moveaxis": ("input", "source", "destination"),
    "chunk": ("input", "chunks", "dim"),
    "split": ("input", "split_size_or_sections", "dim"),
    "tensor_split": ("input", "indices_or_sections", "dim"),
    "unbind": ("input", "dim"),
    "stack": ("tensors", "dim"),
    "layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
    "mean": ("input", "dim", "keepdim"),
    "sum": ("input", "dim", "keepdim"),
    "amax": ("input", "dim", "keepdim"),
    "amin": ("input", "dim", "keepdim"),
    "max": ("input", "dim", "keepdim"),
    "min": ("input", "dim", "keepdim"),
}
#: Tensor methods that take their list as varargs: ``x.permute(0, 2, 3, 1)`` is ``torch.permute(x, (0, 2, 3, 1))``.
_VARARGS = frozenset(["permute"])


class LayerError(ConfigError):
    """A layer or node name the model does not have; the message lists the valid ones (a ``ValueError`` too)."""


def unknown_names(bad: Iterable[str], valid: Iterable[str], owner: str, what: str = "layer") -> LayerError:
    """The one "unknown name" error: the bad names, then every valid one."""
    return LayerError(f"Unknown {what} name(s) {list(bad)} for {owner}; valid names: {list(valid)}")


@dataclass(frozen=True, eq=False)
class Node:
    """One tensor-producing step of a forward pass."""

    name: str
    kind: str  # "input", "module" or "function"
    op: str  # module class name (Conv2d, BasicBlock) or function name (relu, max_pool2d, add)
    scope: str  # path of the enclosing module ("" at the top level)
    module: nn.Module | None
    inputs: tuple[str | None, ...]  # per tensor argument, the node that produced it (None: parameter, constant)
    input_shapes: tuple[tuple[int, ...], ...]  # of the tensor arguments (of an alias: its module's arguments)
    output_shape: tuple[int, ...]
    depends_on_input: bool
    alias: bool = False  # a container's or user module's output: the same tensor as its one parent's
    params: Mapping[str, Any] = field(default_factory=dict)  # a function's non-tensor arguments, by name

    @property
    def parents(self) -> tuple[str, ...]:
        """Names of the nodes whose output tensors this node consumed, in argument order, once each."""
        return tuple(dict.fromkeys(p for p in self.inputs if p is not None))


class Graph:
    """The nodes of one traced forward pass, in the order they were produced."""

    def __init__(self, nodes: Iterable[Node], owner: str) -> None:
        self.nodes: dict[str, Node] = {n.name: n for n in nodes}
        self.owner = owner
        self._children: dict[str, list[str]] = {n: [] for n in self.nodes}
        for n in self.nodes.values():
            for p in n.parents:
                self._children[p].append(n.name)

    @property
    def names(self) -> list[str]:
        """Every capturable node name (all but the input), in execution order."""
        return [n for n, node in self.nodes.items() if node.kind != INPUT]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, name: object) -> bool:
        return name in self.nodes

    def __getitem__(self, name: str) -> Node:
        return self.resolve([name])[0]

    def resolve(self, names: Iterable[str], what: str = "layer") -> list[Node]:
        """The nodes of ``names``; unknown names raise one ``LayerError`` listing the valid ones."""
        names = list(names)
        bad = [n for n in names if n not in self.nodes or self.nodes[n].kind == INPUT]
        if bad:
            raise unknown_names(bad, self.names, self.owner, what)
        return [self.nodes[n] for n in names]

    def children(self, name: str) -> list[str]:
        """Nodes that consumed ``name``'s output, in execution order."""
        return list(self._children[self.resolve([name])[0].name])


# -- naming -----------------------------------------------------------------------------------------------
def op_name(func: Callable) -> str:
    """The op part of a function node's name (``__iadd__`` -> ``add``, ``relu_`` -> ``relu``)."""
    name = getattr(func, "__name__", None) or type(func).__name__
    owner = getattr(func, "__self__", None)
    if name == "__get__" and owner is not None:  # a tensor property such as x.T
        name = getattr(owner, "__name__", name)
    elif name == "apply" and isinstance(owner, type):  # a custom autograd Function
        name = owner.__name__
    if len(name) > 4 and name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name[:1] in ("i", "r") and name[1:] in _BINARY:
            name = name[1:]
    elif len(name) > 1 and name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name


def split_call(name: str) -> tuple[str, int]:
    """``"layer1.0.relu:1"`` -> ``("layer1.0.relu", 1)``; a name without ``:k`` is call 0."""
    base, sep, k = name.rpartition(":")
    return (base, int(k)) if sep and k.isdigit() else (name, 0)


def _call_name(base: str, k: int) -> str:
    return base if k == 0 else f"{base}:{k}"


def is_atomic(module: nn.Module) -> bool:
    """A ``torch.nn`` built-in without children: one node, not traced into."""
    return type(module).__module__.startswith("torch.nn.") and next(module.children(), None) is None


def _tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _params(op: str, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    names = _SIGNATURES.get(op)
    if names is None:
        return {}
    if op in _VARARGS and len(args) > 1 and isinstance(args[1], int):
        args = (args[0], tuple(args[1:]))
    bound = {**dict(zip(names, args, strict=False)), **kwargs}
    return {k: v for k, v in bound.items() if not _tensors(v)}


def _quiet() -> torch._C.DisableTorchFunction:
    """Our own bookkeeping (shapes, clones) is invisible to every function mode, ours and any outer one."""
    return torch._C.DisableTorchFunction()


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone(memory_format=torch.contiguous_format)


# -- recording --------------------------------------------------------------------------------------------
@dataclass
class _Frame:
    module: nn.Module
    path: str
    name: str
    atomic: bool
    inputs: list[torch.Tensor]
    state: Any = None


class _Recorder(TorchFunctionMode):
    """Module hooks on every submodule (scope, call numbering) and, with ``functions``, a function mode."""

    def __init__(self, model: nn.Module, functions: bool) -> None:
        super().__init__()
        self.model = model
        self.paths = {m: p for p, m in model.named_modules()}
        self.path_set = set(self.paths.values())
        self.atomic = {m: is_atomic(m) for m in self.paths}
        self.functions = functions
        self.stack: list[_Frame] = []
        self.counts: Counter[str] = Counter()
        self.root_pass = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        handles = []
        try:
            for m in self.paths:
                handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
                handles.append(m.register_forward_hook(self._post, with_kwargs=True, always_call=True))
            if self.functions:
                with self:
                    yield
            else:
                yield
        finally:
            for h in handles:
                h.remove()
            self.stack.clear()

    def _next(self, base: str) -> str:
        return _call_name(base, self.counts[base])

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        with _quiet():
            if not self.stack:
                self.counts.clear()
                self.root_pass = module is self.model
                self.begin_pass(args, kwargs)
            path = self.paths[module]
            name = ""
            if module is not self.model:
                name = self._next(path)
                self.counts[path] += 1
            frame = _Frame(module, path, name, self.atomic[module], _tensors((args, kwargs)))
            self.stack.append(frame)
            self.entered(frame)

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if not self.stack or self.stack[-1].module is not module:
            return
        with _quiet():
            aborted = output is None and sys.exc_info()[1] is not None
            frame = self.stack.pop()
            if not aborted and module is not self.model:
                if frame.atomic:
                    outs = _tensors(output)
                    if outs:
                        self.produced(frame, outs)
                elif isinstance(output, torch.Tensor):
                    self.produced(frame, [output])
            if not self.stack:
                self.end_pass(aborted)

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.stack or self.stack[-1].atomic:
            return func(*args, **kwargs)
        with _quiet():
            op = op_name(func)
            scope = self.stack[-1].path
            base = f"{scope}.{op}" if scope else op
            if base in self.path_set:
                base += "()"
            name = self._next(base)
            state = self.calling(name, args, kwargs)
        out = func(*args, **kwargs)
        outs = [args[0]] if op == "setitem" and args and isinstance(args[0], torch.Tensor) else _tensors(out)
        if outs:
            with _quiet():
                self.counts[base] += 1
                self.called(name, op, scope, args, kwargs, outs, state)
        return out

    # subclasses fill these in
    def begin_pass(self, args: tuple, kwargs: dict) -> None: ...

    def end_pass(self, aborted: bool) -> None: ...

    def entered(self, frame: _Frame) -> None: ...

    def produced(self, frame: _Frame, outputs: list[torch.Tensor]) -> None: ...

    def calling(self, name: str, args: tuple, kwargs: dict) -> Any: ...

    def called(
        self, name: str, op: str, scope: str, args: tuple, kwargs: dict, outputs: list[torch.Tensor], state: Any
    ) -> None: ...


class _Tracer(_Recorder):
    """Builds the graph: which node produced each tensor (by identity; in-place ops take it over)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, functions=True)
        self.nodes: dict[str, Node] = {}
        self.owner: dict[int, str] = {}
        self.keep: list[torch.Tensor] = []  # keeps recorded tensors alive, so ids stay unique

    def _owners(self, tensors: list[torch.Tensor]) -> tuple[str | None, ...]:
        return tuple(self.owner.get(id(t)) for t in tensors)

    def _add(self, node: Node, outputs: list[torch.Tensor]) -> None:
        self.nodes[node.name] = node
        for t in outputs:
            self.owner[id(t)] = node.name
            self.keep.append(t)

    def _depends(self, owners: Iterable[str | None]) -> bool:
        return any(o is not None and self.nodes[o].depends_on_input for o in owners)

    def begin_pass(self, args: tuple, kwargs: dict) -> None:
        if not self.root_pass:
            return
        for t in _tensors((args, kwargs)):
            name = self._next(INPUT)
            self.counts[INPUT] += 1
            self._add(Node(name, INPUT, INPUT, "", None, (), (), tuple(t.shape), True), [t])

    def entered(self, frame: _Frame) -> None:
        frame.state = (self._owners(frame.inputs), tuple(tuple(t.shape) for t in frame.inputs))

    def produced(self, frame: _Frame, outputs: list[torch.Tensor]) -> None:
        alias = not frame.atomic
        owners, shapes = frame.state
        if alias:  # the same tensor as the node that produced it inside the module
            owners = self._owners(outputs[:1])
        op, scope = type(frame.module).__name__, frame.path.rpartition(".")[0]
        out_shape = tuple(outputs[0].shape)
        node = Node(
            frame.name, "module", op, scope, frame.module, owners, shapes, out_shape, self._depends(owners), alias
        )
        self._add(node, outputs)

    def calling(self, name: str, args: tuple, kwargs: dict) -> Any:
        tensors = _tensors((args, kwargs))
        return self._owners(tensors), tuple(tuple(t.shape) for t in tensors)

    def called(
        self, name: str, op: str, scope: str, args: tuple, kwargs: dict, outputs: list[torch.Tensor], state: Any
    ) -> None:
        owners, shapes = state
        node = Node(
            name,
            "function",
            op,
            scope,
            None,
            owners,
            shapes,
            tuple(outputs[0].shape),
            self._depends(owners),
            params=_params(op, args, kwargs),
        )
        self._add(node, outputs)


def device_of(model: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module without tensors)."""
    return next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))


def _module_modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def trace_graph(model: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...]) -> Graph:
    """Run one forward pass on ``example_input`` (eval mode, no grad) and record every node.

    Each submodule's own train/eval mode is restored and all hooks are removed, even if the forward raises.
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    modes = _module_modes(model)
    tracer = _Tracer(model)
    try:
        model.eval()
        with torch.no_grad(), tracer.installed():
            model(*args)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return Graph(tracer.nodes.values(), type(model).__name__)


def graph_node_names(model: nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...]) -> list[str]:
    """Every capturable node name of ``model`` for this input, in execution order."""
    return trace_graph(model, example_input).names


# -- capture ----------------------------------------------------------------------------------------------
class _Capturer(_Recorder):
    def __init__(self, model: nn.Module, names: list[str], inputs: bool, functions: bool) -> None:
        super().__init__(model, functions)
        self.want, self.inputs = names, inputs
        self.wanted = set(names)
        self.out: dict[str, torch.Tensor] = {}
        self.done: set[str] = set()
        self.seen: list[str] = []

    def begin_pass(self, args: tuple, kwargs: dict) -> None:
        self.done.clear()
        self.seen.clear()

    def end_pass(self, aborted: bool) -> None:
        missing = [n for n in self.want if n not in self.done]
        if missing and self.root_pass and not aborted:
            raise LayerError(
                f"Unknown layer name(s) {missing} for {type(self.model).__name__}: this forward pass produced no "
                f"such node; valid names{'' if self.functions else ' (module calls)'}: {self.seen}"
            )

    def entered(self, frame: _Frame) -> None:
        if self.inputs and frame.name in self.wanted and frame.inputs:
            frame.state = _clone(frame.inputs[0])

    def produced(self, frame: _Frame, outputs: list[torch.Tensor]) -> None:
        self._store(frame.name, frame.state if self.inputs else outputs[0])

    def calling(self, name: str, args: tuple, kwargs: dict) -> Any:
        if self.inputs and name in self.wanted and (tensors := _tensors((args, kwargs))):
            return _clone(tensors[0])
        return None

    def called(
        self, name: str, op: str, scope: str, args: tuple, kwargs: dict, outputs: list[torch.Tensor], state: Any
    ) -> None:
        self._store(name, state if self.inputs else outputs[0])

    def _store(self, name: str, value: torch.Tensor | None) -> None:
        self.seen.append(name)
        if name in self.wanted and value is not None:
            self.out[name] = value if self.inputs else _clone(value)
            self.done.add(name)


@contextmanager
def capture(model: nn.Module, names: Iterable[str], inputs: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output (``inputs=True``: the first tensor input) of each named node during forward passes.

    Any node name works: module calls (``layer1.0.relu:1``), functional ops (``relu``, ``layer1.0.add``)
    and container outputs. Tensors are cloned when produced (so ``ReLU(inplace=True)``, ``x.relu_()`` and
    ``out += identity`` cannot overwrite them) into the standard NCHW layout, also under channels_last.
    Only module hooks are used unless a name is a functional op. A later forward pass replaces the stored
    tensors; a pass of the model that does not produce every name raises ``LayerError`` listing the names it
    did produce. Hooks and the function mode are removed on exit.
    """
    names = list(dict.fromkeys(names))
    paths = {p for p, _ in model.named_modules() if p}
    bad = [n for n in names if not n or split_call(n)[0] == INPUT]
    if bad:
        raise unknown_names(bad, sorted(paths), type(model).__name__)
    functions = any(split_call(n)[0] not in paths for n in names)
    capturer = _Capturer(model, names, inputs, functions)
    with capturer.installed():
        yield capturer.out


# -- activations ------------------------------------------------------------------------------------------
def is_activation(node: Node) -> bool:
    """An activation module call or functional activation (see ``ACTIVATION_MODULES``/``_FUNCTIONS``)."""
    if node.kind == "module":
        return not node.alias and isinstance(node.module, ACTIVATION_MODULES)
    return node.kind == "function" and node.op in ACTIVATION_FUNCTIONS


def is_relu_family(node: Node) -> bool:
    """A ReLU or ReLU6 application (module or functional)."""
    if node.kind == "module":
        return not node.alias and isinstance(node.module, RELU_MODULES)
    return node.kind == "function" and node.op in RELU_FUNCTIONS


def relu_family_nodes(graph: Graph) -> list[str]:
    """Every application of a ReLU-family activation, in execution order; each call is its own entry."""
    return [n.name for n in graph if is_relu_family(n)]


def conv_nodes(graph: Graph) -> list[str]:
    """Every 2-d convolution call (``nn.Conv2d`` module or ``F.conv2d``), in execution order."""
    return [
        n.name
        for n in graph
        if (n.kind == "module" and not n.alias and isinstance(n.module, nn.Conv2d))
        or (n.kind == "function" and n.op == "conv2d")
    ]


def _passes_through(graph: Graph, node: Node, source: str) -> bool:
    """Does ``node`` keep each unit of ``source`` apart from a fixed affine map (BN, bias, dropout, copy)?"""
    dependent = [i for i, p in enumerate(node.inputs) if p is not None and graph.nodes[p].depends_on_input]
    if [node.inputs[i] for i in dependent] != [source]:
        return False
    if node.kind == "module":
        return node.alias or isinstance(node.module, PASS_MODULES)
    if node.op in ("add", "mul"):
        return True
    if node.op in ("sub", "div", "truediv"):
        return dependent == [0]
    return node.op in PASS_FUNCTIONS and dependent == [0]


def activation_after(graph: Graph, conv: str) -> tuple[str | None, str]:
    """The first activation applied to ``conv``'s output, and ``""``; or ``None`` and why there is none.

    Walks through BatchNorm, adding or multiplying a tensor that does not depend on the input (bias,
    scale), dropout, identity and copies. Stops with ``None`` where the output branches, or reaches
    anything else first (a residual add, pooling, ...); the reason names ``conv`` and the blocking node.
    """
    cur = graph[conv].name
    while True:
        children = graph.children(cur)
        if not children:
            return None, f"no activation after {conv!r}: {cur!r} is not used by any later node"
        if len(children) > 1:
            return None, f"no activation after {conv!r}: the output of {cur!r} branches into {children}"
        child = graph.nodes[children[0]]
        if is_activation(child):
            return child.name, ""
        if not _passes_through(graph, child, cur):
            joins = sum(p is not None and graph.nodes[p].depends_on_input for p in child.inputs) > 1
            what = f"{child.op} of input-dependent tensors" if joins else child.op
            return None, f"no activation after {conv!r}: {child.name!r} ({what}) comes first"
        cur = child.name
