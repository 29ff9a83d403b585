"""Receptive fields of conv-net units, composed over the graph of a forward pass (``cnnfeat.graph``).

Per axis, each spatial op (kernel k, stride s, padding p, dilation d) maps its input's geometry by

    size_out  = size_in + (k - 1) * d * jump_in
    jump_out  = jump_in * s
    start_out = start_in + ((k - 1) * d / 2 - p) * jump_in

where ``start`` is the input coordinate of the centre of output unit 0. Spatial ops: ``Conv2d``/``F.conv2d``
(also ``padding="same"/"valid"``), max/avg pooling (module or functional; stride ``None`` = kernel; ceil_mode),
adaptive pooling when the input size is a multiple of the output size, constant ``F.pad``/``ZeroPad2d`` and
crops or strided slices ``x[:, :, a:b:s]``.
Elementwise and channel-wise ops (activations, BatchNorm, dropout, bias/scale, copies, channel slices) keep
the geometry. Where input-dependent paths join (a residual add, ``torch.cat`` along channels) a unit sees the
union of its paths' fields: the bounding interval per axis (equal jumps required). An op that is not one of
these, before any spatial op, is an input transform (e.g. a resize to 224x224): coordinates restart in its
output, named by ``ReceptiveField.frame``. Anywhere else it makes every node downstream an error naming it;
flattening or a ``Linear`` ends the spatial grid. Never a silently wrong box.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from cnnfeat.errors import ConfigError
from cnnfeat.graph import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_MODULES,
    INPUT,
    PASS_FUNCTIONS,
    PASS_MODULES,
    Graph,
    Node,
    trace_graph,
)

#: Functions that keep each unit where it is (per position; channels may mix).
_POINTWISE_FUNCTIONS = (
    ACTIVATION_FUNCTIONS
    | PASS_FUNCTIONS
    | frozenset(
        [
            "add",
            "sub",
            "mul",
            "div",
            "truediv",
            "neg",
            "abs",
            "pow",
            "exp",
            "log",
            "sqrt",
            "rsqrt",
            "square",
            "clamp",
            "clip",
            "maximum",
            "minimum",
            "threshold",
            "logsigmoid",
            "data",
            "local_response_norm",
            "channel_shuffle",
            "expand",
            "expand_as",
        ]
    )
)
_POINTWISE_MODULES = (*ACTIVATION_MODULES, *PASS_MODULES, nn.LocalResponseNorm, nn.ChannelShuffle, nn.Softmax2d)
_RESHAPES = frozenset(["flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten", "permute", "transpose"])
_CONCATS = frozenset(["cat", "concat", "concatenate"])


class ReceptiveFieldError(ConfigError):
    """A node whose units have no receptive field we can derive; the message names the node that prevents it."""


def _pair(v: object) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1])) if len(v) else (0, 0)
    return (int(v), int(v))  # type: ignore[call-overload]


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of every unit of one layer, per axis (height, width)."""

    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[float, float]
    output_shape: tuple[int, int]
    frame: str | None = None  # the node whose output the boxes refer to (None: the model's input)

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Input-pixel box ``(top, left, bottom, right)`` (inclusive) of the unit at ``(row, col)``.

        It may reach outside the image where the layers pad.
        """
        out = []
        for axis, pos in ((0, row), (1, col)):
            centre = self.start[axis] + pos * self.jump[axis]
            lo = round(centre - (self.size[axis] - 1) / 2)
            out.append((lo, lo + self.size[axis] - 1))
        (top, bottom), (left, right) = out
        return top, left, bottom, right


@dataclass(frozen=True)
class _Geo:
    field: ReceptiveField
    transformed: bool  # a spatial op lies between the frame and this node


@dataclass(frozen=True)
class _NoField:
    kind: str  # "flat" (spatial axes flattened), "ended" (mixed after flattening) or "unknown"
    origin: str  # the node that caused it
    reason: str = ""


_State = _Geo | _NoField | None  # None: does not depend on the input


def _message(name: str, state: _State) -> str:
    if state is None:
        return f"{name!r} does not depend on the input, so it has no receptive field"
    if isinstance(state, _Geo):
        return ""
    if state.kind == "flat":
        if name == state.origin:
            return f"{name!r} flattens the spatial axes; its units have no spatial grid"
        return f"{name!r} has no spatial grid: {state.origin!r} flattened the spatial axes"
    if state.kind == "ended":
        if name == state.origin:
            return f"{name!r} has no spatial geometry; its units have no receptive field in the image"
        return (
            f"Node {name!r} comes after {state.origin!r}, which has no spatial geometry; "
            "its units have no receptive field in the image"
        )
    return f"{name!r} has no receptive field: {state.reason}"


def _spatial_params(node: Node) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]] | str:
    """``(kernel, stride, padding, dilation)`` of a conv or pooling node, or why it has none we know."""
    m, p = node.module, node.params
    if node.kind == "module" and not node.alias:
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                return f"padding_mode={m.padding_mode!r}"
            k, d = _pair(m.kernel_size), _pair(m.dilation)
            return k, _pair(m.stride), _same_padding(m.padding, k, d), d
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k = _pair(m.kernel_size)
            s = _pair(m.stride) if m.stride is not None else k
            return k, s, _pair(m.padding), _pair(getattr(m, "dilation", 1))
        if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
            left, _, top, _ = m.padding
            return (1, 1), (1, 1), (top, left), (1, 1)
        return "not a known spatial operation"
    if node.op == "conv2d":
        k, d = _pair(node.input_shapes[1][-2:]), _pair(p.get("dilation", 1))
        return k, _pair(p.get("stride", 1)), _same_padding(p.get("padding", 0), k, d), d
    if node.op in ("max_pool2d", "avg_pool2d"):
        k = _pair(p["kernel_size"])
        stride = p.get("stride")
        s = _pair(stride) if stride is not None and stride != [] and stride != () else k
        return k, s, _pair(p.get("padding", 0)), _pair(p.get("dilation", 1))
    if node.op == "getitem" and (sl := _slices(node)) is not None:  # x[..., a::s] is a 1x1 window, stride s
        (h0, hs), (w0, ws) = sl
        return (1, 1), (hs, ws), (-h0, -w0), (1, 1)
    if node.op == "pad":
        pad = list(p.get("pad", ()))
        if p.get("mode", "constant") != "constant" or len(pad) < 2:
            return f"mode={p.get('mode')!r}"
        return (1, 1), (1, 1), (pad[2] if len(pad) >= 4 else 0, pad[0]), (1, 1)
    return "not a known spatial operation"


def _same_padding(padding: object, k: tuple[int, int], d: tuple[int, int]) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":  # PyTorch puts the odd pixel of an even kernel's padding at the end
        return ((k[0] - 1) * d[0] // 2, (k[1] - 1) * d[1] // 2)
    return _pair(padding)


def _is_spatial(node: Node) -> bool:
    if node.kind == "module" and not node.alias:
        return isinstance(
            node.module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.ZeroPad2d, nn.ConstantPad2d)
        ) or _is_adaptive(node)
    if node.op == "getitem":  # a crop or strided slice of H, W
        return _slices(node) is not None and not _is_pointwise(node)
    return node.op in ("conv2d", "max_pool2d", "avg_pool2d", "pad") or _is_adaptive(node)


def _is_conv_or_pool(node: Node) -> bool:
    if node.kind == "module":
        return not node.alias and isinstance(node.module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))
    return node.op in ("conv2d", "max_pool2d", "avg_pool2d")


def _is_adaptive(node: Node) -> bool:
    if node.kind == "module":
        return not node.alias and isinstance(node.module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
    return node.op in ("adaptive_avg_pool2d", "adaptive_max_pool2d")


def _is_pointwise(node: Node) -> bool:
    """Keeps each unit in place (per position), judged by the op; shapes are checked by the caller."""
    if node.kind == "module":
        return node.alias or isinstance(node.module, _POINTWISE_MODULES)
    if node.op in _POINTWISE_FUNCTIONS:
        return True
    if node.op in ("softmax", "log_softmax"):
        return node.params.get("dim") in (1, -3)
    if node.op == "getitem":  # batch or channel slices
        return _slices(node) == ((0, 1), (0, 1)) and node.input_shapes[0][-2:] == node.output_shape[-2:]
    return False


def _slices(node: Node) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """For ``x[index]`` of a 4-d tensor made only of slices: ``(start, step)`` on H and W; else ``None``."""
    index, shape = node.params.get("index"), node.input_shapes[0] if node.input_shapes else ()
    items = list(index) if isinstance(index, tuple) else [index]
    if len(shape) != 4 or items.count(Ellipsis) > 1 or not all(isinstance(i, slice) or i is Ellipsis for i in items):
        return None
    if Ellipsis in items:
        e = items.index(Ellipsis)
        items = items[:e] + [slice(None)] * (5 - len(items)) + items[e + 1 :]
    items += [slice(None)] * (4 - len(items))
    if len(items) != 4:
        return None
    (h0, _, hs), (w0, _, ws) = items[2].indices(shape[2]), items[3].indices(shape[3])
    return (h0, hs), (w0, ws)


def _join(node: Node, geos: list[_Geo], out_hw: tuple[int, int]) -> _State:
    """The union of the fields of several input-dependent operands of an elementwise op or concatenation."""
    frames = {g.field.frame for g in geos}
    if len(frames) > 1:
        return _NoField(
            "unknown", node.name, f"{node.name!r} joins paths in different frames {sorted(map(str, frames))}"
        )
    for g in geos:
        if g.field.output_shape != out_hw:
            return _NoField(
                "unknown",
                node.name,
                f"{node.name!r} ({node.op}) broadcasts an operand of spatial shape {g.field.output_shape} to {out_hw}",
            )
    jumps = {g.field.jump for g in geos}
    if len(jumps) > 1:
        return _NoField(
            "unknown", node.name, f"{node.name!r} ({node.op}) joins paths with different jumps {sorted(jumps)}"
        )
    if len(geos) == 1:
        f = geos[0].field
        return _Geo(ReceptiveField(f.size, f.jump, f.start, out_hw, f.frame), geos[0].transformed)
    size, start = [], []
    for a in (0, 1):
        lo = min(g.field.start[a] - (g.field.size[a] - 1) / 2 for g in geos)
        hi = max(g.field.start[a] + (g.field.size[a] - 1) / 2 for g in geos)
        size.append(round(hi - lo) + 1)
        start.append((lo + hi) / 2)
    field = ReceptiveField((size[0], size[1]), geos[0].field.jump, (start[0], start[1]), out_hw, geos[0].field.frame)
    return _Geo(field, any(g.transformed for g in geos))


def _apply(node: Node, geo: _Geo, out_hw: tuple[int, int]) -> _State:
    """A conv, pooling or padding node applied to one input geometry."""
    if _is_adaptive(node):
        (hi, wi), (ho, wo) = geo.field.output_shape, out_hw
        if hi % ho or wi % wo:
            return _NoField(
                "unknown",
                node.name,
                f"adaptive pooling {node.name!r} maps {hi}x{wi} to {ho}x{wo}, not a whole multiple, "
                "so its windows are irregular",
            )
        k = s = (hi // ho, wi // wo)
        p, d = (0, 0), (1, 1)
    else:
        params = _spatial_params(node)
        if isinstance(params, str):
            return _NoField("unknown", node.name, f"{node.name!r} ({node.op}): {params}")
        k, s, p, d = params
    f = geo.field
    size, jump, start = list(f.size), list(f.jump), list(f.start)
    for a in (0, 1):
        size[a] += (k[a] - 1) * d[a] * jump[a]
        start[a] += ((k[a] - 1) * d[a] / 2 - p[a]) * jump[a]
        jump[a] *= s[a]
    return _Geo(ReceptiveField((size[0], size[1]), (jump[0], jump[1]), (start[0], start[1]), out_hw, f.frame), True)


def _restart(name: str, out_hw: tuple[int, int]) -> _Geo:
    return _Geo(ReceptiveField((1, 1), (1, 1), (0.0, 0.0), out_hw, name), False)


def _state(graph: Graph, node: Node, states: dict[str, _State]) -> _State:
    if node.kind == INPUT:
        shape = node.output_shape
        if len(shape) != 4:
            return _NoField("unknown", node.name, f"the input has shape {shape}, not (N, C, H, W)")
        return _Geo(ReceptiveField((1, 1), (1, 1), (0.0, 0.0), (shape[2], shape[3]), None), False)
    if not node.depends_on_input:
        return None
    positions = [i for i, p in enumerate(node.inputs) if p is not None and states.get(p) is not None]
    operands = [states[node.inputs[i]] for i in positions]
    broken = [s for s in operands if isinstance(s, _NoField)]
    if broken:
        for kind in ("unknown", "ended"):
            if first := next((s for s in broken if s.kind == kind), None):
                return first
        if _is_pointwise(node) or (node.kind == "function" and node.op in _RESHAPES):
            return broken[0]  # dropout, activation, reshape ... of a flattened tensor
        return _NoField("ended", node.name)
    geos = [s for s in operands if isinstance(s, _Geo)]
    out = node.output_shape
    if node.alias:
        g = geos[0]
        f = g.field
        if f.frame == node.inputs[0] and not g.transformed:  # name an input transform by its module
            return _Geo(ReceptiveField(f.size, f.jump, f.start, f.output_shape, node.name), False)
        return g
    if len(out) != 4:
        kind = "flat" if node.kind == "function" and node.op in _RESHAPES else "ended"
        return _NoField(kind, node.name)
    out_hw = (out[2], out[3])
    if _is_spatial(node):
        if positions != [0]:
            return _NoField("unknown", node.name, f"{node.name!r} ({node.op}) has input-dependent parameters")
        return _apply(node, geos[0], out_hw)
    fresh = not any(g.transformed for g in geos)
    function = node.kind == "function"
    keeps_units = (
        (_is_pointwise(node) and all(len(node.input_shapes[i]) == 4 for i in positions))
        or (function and node.op in _CONCATS and node.params.get("dim", 0) in (0, 1, -4, -3))  # along channels
        or (function and node.op in _RESHAPES and all(node.input_shapes[i] == out for i in positions))  # a no-op
    )
    joined: _State = _NoField("unknown", node.name, f"{node.name!r} ({node.op}) is not a known spatial operation")
    if keeps_units:
        joined = _join(node, geos, out_hw)
    if isinstance(joined, _NoField) and fresh:  # before any spatial op: an input transform
        return _restart(node.name, out_hw)
    return joined


def graph_receptive_fields(graph: Graph, names: Iterable[str] | None = None) -> dict[str, ReceptiveField]:
    """Receptive field of each named node of a traced graph (default: every conv/pooling call that has one).

    Unknown names raise ``LayerError`` listing the valid ones; a node whose geometry cannot be derived
    raises ``ReceptiveFieldError`` naming the node that prevents it.
    """
    states: dict[str, _State] = {}
    for node in graph:
        states[node.name] = _state(graph, node, states)
    if names is None:
        return {n.name: s.field for n in graph if _is_conv_or_pool(n) and isinstance(s := states[n.name], _Geo)}
    fields = {}
    for node in graph.resolve(names):
        state = states[node.name]
        if not isinstance(state, _Geo):
            raise ReceptiveFieldError(_message(node.name, state))
        fields[node.name] = state.field
    return fields


def receptive_fields(
    model: nn.Module, example_input: torch.Tensor, names: list[str] | None = None
) -> dict[str, ReceptiveField]:
    """Receptive field of each named node's output (default: every conv/pooling call that has one).

    ``example_input`` (1,C,H,W) fixes the spatial size. Names are node names (``cnnfeat.graph``: module
    paths, ``name:k`` calls, functional ops); see ``graph_receptive_fields`` for the errors.
    """
    return graph_receptive_fields(trace_graph(model, example_input), names)


def crop(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Cut ``box`` (top, left, bottom, right; inclusive) out of an image (C,H,W), zero-padding outside it."""
    top, left, bottom, right = box
    c, h, w = image.shape
    out = image.new_zeros(c, bottom - top + 1, right - left + 1)
    t, l_, b, r = max(top, 0), max(left, 0), min(bottom, h - 1), min(right, w - 1)
    if t <= b and l_ <= r:
        out[:, t - top : b - top + 1, l_ - left : r - left + 1] = image[:, t : b + 1, l_ : r + 1]
    return out
