"""Receptive fields of conv-net units, composed over the graph of a forward pass (``cnnfeat.graph``).

Per image axis (``AxisField``), in whole pixels: each unit's *window* (the kernels composed layer by layer,
padding included) and the pixels it *sees* (the bounding interval of its gradient support, composed over each
layer's real units, so less than the window where a stride or ``ceil_mode`` leaves a layer's last rows unread or
dilation skips the edge). ``ReceptiveField.box`` is what the unit sees, extended by its window past the image's
edge (the padding it reads), so a crop keeps the unit's view in place; clipped to the image it is exactly the
bounding box of the unit's gradient support.

A conv or pooling op (kernel k, stride s, padding p, dilation d) reads input units ``u*s - p + t*d`` (t < k); a
transposed conv (``ConvTranspose2d``) adds input unit ``i`` into outputs ``i*s - p + t*d``, so output ``o`` reads
the inputs ``i`` with ``i*s = o + p - t*d``, a set that depends on ``o mod s``: windows then repeat with a
*period* instead of moving by a whole number of pixels per unit. Where the period is 1 (no transposed conv
upsampled the grid) the familiar summary describes every window:

    size_out  = size_in + (k - 1) * d * jump_in
    jump_out  = jump_in * s
    start_out = start_in + ((k - 1) * d / 2 - p) * jump_in

where ``start`` is the input coordinate of the centre of output unit 0.

Spatial ops: ``Conv2d``/``F.conv2d`` (also ``padding="same"/"valid"``), ``ConvTranspose2d``/
``F.conv_transpose2d``, max/avg pooling (module or functional; stride ``None`` = kernel; ceil_mode), adaptive
pooling when the input size is a multiple of the output size, constant ``F.pad``/``ZeroPad2d`` and crops or
strided slices ``x[:, :, a:b:s]``. Elementwise and channel-wise ops (activations, BatchNorm, dropout,
bias/scale, copies, channel slices, channel reductions) keep the geometry. So do ops that only move or regroup
axes, followed through the shapes the graph recorded: ``view``/``reshape``/``flatten``/``unflatten``/
``(un)squeeze`` that keep the image's rows and columns as axes of their own (a channel shuffle), ``permute``/
``transpose``/``movedim`` (channels-last and back), ``chunk``/``split`` of other axes, and ``Linear``/
``LayerNorm`` on a last axis that is not an image axis (ConvNeXt). Where input-dependent paths join (a
residual add, ``torch.cat``/``stack`` along another axis) a unit sees the union of its paths' fields: the
bounding interval per axis (equal average jumps required).

An op that is not one of these, before any spatial op, is an input transform (e.g. a resize to 224x224):
coordinates restart in its output, named by ``ReceptiveField.frame``. Anywhere else it makes every node
downstream an error naming it. Flattening, a ``Linear`` on flattened units, a reduction over the image axes
and a gate broadcast over them (squeeze-excitation: its units depend on the whole image) end the geometry:
such nodes are refused, never given a box. Never a silently wrong box.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from math import gcd, lcm

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
            "expand",
            "expand_as",
        ]
    )
)
_POINTWISE_MODULES = (*ACTIVATION_MODULES, *PASS_MODULES)
#: Ops that mix one axis (by default the channel axis, dim 1) and keep every position apart.
_AXIS_FUNCTIONS = {"softmax": None, "log_softmax": None, "local_response_norm": 1, "channel_shuffle": 1}
_AXIS_MODULES: tuple[tuple[type[nn.Module], int], ...] = (
    (nn.LocalResponseNorm, 1),
    (nn.ChannelShuffle, 1),
    (nn.Softmax2d, -3),
)
_RESHAPES = frozenset(["flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as"])
_PERMUTES = frozenset(["permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"])
_SPLITS = frozenset(["chunk", "split", "tensor_split", "unbind"])
_CONCATS = frozenset(["cat", "concat", "concatenate", "stack"])
_REDUCTIONS = frozenset(["mean", "sum", "amax", "amin", "max", "min"])
_LAYOUT = _RESHAPES | _PERMUTES | _SPLITS
_SHAPE_FROM_SECOND = frozenset(["expand_as", "view_as", "reshape_as", "type_as"])  # its values do not matter


class ReceptiveFieldError(ConfigError):
    """A node whose units have no receptive field we can derive; the message names the node that prevents it."""


def _pair(v: object) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1])) if len(v) else (0, 0)
    return (int(v), int(v))  # type: ignore[call-overload]


_Span = tuple[int, int] | None  # first and last pixel; None: no pixel


def _hull(spans: Iterable[_Span]) -> _Span:
    """The bounding interval of the spans (None: of none)."""
    lo = hi = None
    for span in spans:
        if span is not None:
            lo = span[0] if lo is None or span[0] < lo else lo
            hi = span[1] if hi is None or span[1] > hi else hi
    return None if lo is None or hi is None else (lo, hi)


@dataclass(frozen=True)
class AxisField:
    """Along one image axis of ``pixels`` pixels: which pixels each unit of a layer sees, exactly.

    ``window(u) = (first[r] + q * advance, last[r] + q * advance)`` with ``q, r = divmod(u, period)`` is unit
    ``u``'s window, padding included: every ``period`` units it moves by ``advance`` pixels. The period is 1
    unless a transposed conv upsampled the grid (then windows may differ in size by phase). ``seen[u]`` is the
    first and last pixel unit ``u`` depends on (the bounding interval of its gradient support), composed over
    the real units of each layer: a window that reads past a layer's last unit (a stride or ``ceil_mode``
    leaving the bottom rows unread) or skips pixels (dilation) sees less than its window.
    """

    period: int
    advance: int
    first: tuple[int, ...]
    last: tuple[int, ...]
    pixels: int
    seen: tuple[_Span, ...]

    def window(self, u: int) -> tuple[int, int]:
        """Unit ``u``'s window, padding and units past a layer's end included."""
        q, r = divmod(u, self.period)
        return self.first[r] + q * self.advance, self.last[r] + q * self.advance

    def span(self, u: int) -> tuple[int, int]:
        """Unit ``u``'s box: the pixels it sees, extended by its window where the unit sees the image's edge
        and its window goes on past it (padding). Outside the layer, or where it sees nothing: the window."""
        lo_w, hi_w = self.window(u)
        seen = self.seen[u] if 0 <= u < len(self.seen) else None
        if seen is None:
            return lo_w, hi_w
        lo, hi = seen
        return (min(lo, lo_w) if lo <= 0 else lo), (max(hi, hi_w) if hi >= self.pixels - 1 else hi)

    @property
    def jump(self) -> int | float:
        """Average pixels between neighbouring units (a whole number unless a transposed conv upsampled)."""
        return self.advance // self.period if self.advance % self.period == 0 else self.advance / self.period

    @property
    def size(self) -> int:
        """Pixels in the largest window."""
        return max(b - a + 1 for a, b in zip(self.first, self.last, strict=True))


def _axis(
    period: int, advance: int, first: Sequence[int], last: Sequence[int], pixels: int, seen: Sequence[_Span]
) -> AxisField:
    """The shortest-period ``AxisField`` with these windows."""
    for p in range(1, period + 1):
        if period % p or (advance * p) % period:
            continue
        a = advance * p // period
        if all(
            first[r] == first[r % p] + (r // p) * a and last[r] == last[r % p] + (r // p) * a for r in range(period)
        ):
            return AxisField(p, a, tuple(first[:p]), tuple(last[:p]), pixels, tuple(seen))
    raise AssertionError("unreachable: the full period always describes itself")


def _ends(spans: list[_Span]) -> tuple[list[int], list[int]]:
    """First and last pixels of spans that are never empty (windows)."""
    return [s[0] for s in spans], [s[1] for s in spans]  # type: ignore[index]


def _pixels(n: int) -> AxisField:
    """The frame itself: unit u is pixel u."""
    return AxisField(1, 1, (0,), (0,), n, tuple((u, u) for u in range(n)))


def _seen(ax: AxisField, reads: Iterable[int]) -> _Span:
    """What a unit sees that reads the input units ``reads`` (those outside the layer are padding)."""
    return _hull(ax.seen[i] for i in reads if 0 <= i < len(ax.seen))


def _seen_window(ax: AxisField, a: int, k: int, d: int) -> _Span:
    """What a unit sees that reads the input units ``a, a + d, ..., a + (k - 1) * d``."""
    skip = -(a // d) if a < 0 else 0  # reads before unit 0 are padding
    return _hull(ax.seen[a + skip * d : a + (k - 1) * d + 1 : d]) if skip < k else None


def _windowed(ax: AxisField, units: int, k: int, s: int, p: int, d: int) -> AxisField:
    """A conv or pooling window with ``units`` outputs: output ``u`` reads inputs ``u*s - p + t*d``, ``t < k``."""
    g = gcd(ax.period, s)
    period = ax.period // g
    windows = [_hull(ax.window(r * s - p + t * d) for t in range(k)) for r in range(period)]
    seen = [_seen_window(ax, u * s - p, k, d) for u in range(units)]
    return _axis(period, ax.advance * s // g, *_ends(windows), ax.pixels, seen)


def _transposed(ax: AxisField, units: int, k: int, s: int, p: int, d: int) -> AxisField | str:
    """A transposed conv with ``units`` outputs: output ``o`` reads inputs ``i`` with ``i*s - p + t*d = o``."""

    def reads(o: int) -> list[int]:
        return [(o + p - t * d) // s for t in range(k) if (o + p - t * d) % s == 0]

    period = ax.period * s
    if (empty := next((o for o in range(s) if not reads(o)), None)) is not None:
        return (
            f"output positions {empty} mod {s} read no input (kernel {k}, dilation {d}, stride {s}): "
            "they are constant, so those units have no receptive field"
        )
    windows = [_hull(ax.window(i) for i in reads(o)) for o in range(period)]
    return _axis(period, ax.advance, *_ends(windows), ax.pixels, [_seen(ax, reads(o)) for o in range(units)])


def _rate(ax: AxisField) -> tuple[int, int]:
    """The average jump as a reduced fraction (pixels, units)."""
    g = gcd(ax.advance, ax.period)
    return ax.advance // g, ax.period // g


def _union(axes: Sequence[AxisField]) -> AxisField:
    """Per unit, the bounding interval of all (the caller checks that the frames and average jumps agree)."""
    axes = list({id(a): a for a in axes}.values())  # the same path twice (x * x) adds nothing
    if len(axes) == 1:
        return axes[0]
    period = lcm(*(a.period for a in axes))
    windows = [_hull(a.window(r) for a in axes) for r in range(period)]
    seen = [_hull(spans) for spans in zip(*(a.seen for a in axes), strict=True)]
    return _axis(period, axes[0].advance * period // axes[0].period, *_ends(windows), axes[0].pixels, seen)


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of every unit of one layer, per axis (height, width).

    ``size`` is the largest window (no box is larger), ``jump`` the (average) input pixels between neighbouring
    units and ``start`` the centre of unit (0, 0)'s window. When ``regular`` (no transposed conv upsampled the
    grid) every unit's window is ``start + pos * jump -/+ (size - 1) / 2`` and contains its box; ``box`` (from
    ``axes``) is exact either way.
    """

    size: tuple[int, int]
    jump: tuple[float, float]  # whole numbers (ints) unless a transposed conv upsampled the grid
    start: tuple[float, float]
    output_shape: tuple[int, int]
    frame: str | None = None  # the node whose output the boxes refer to (None: the model's input)
    axes: tuple[AxisField, AxisField] | None = None  # exact spans per axis (None: from size, jump and start)
    #: a channel concatenation of branches with different fields that no channel-mixing conv followed: each channel
    #: sees only its own branch's field, and these boxes are the union of the branches' (exact for the widest)
    joined: str | None = None

    @property
    def regular(self) -> bool:
        """Whether ``size``, ``jump`` and ``start`` give every unit's window (which contains its box)."""
        return self.axes is None or all(a.period == 1 for a in self.axes)

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Input-pixel box ``(top, left, bottom, right)`` (inclusive) of the unit at ``(row, col)``.

        The bounding box of the pixels the unit depends on; it reaches outside the image where the unit reads
        padding. A unit that sees no pixel at all (a transposed conv's border unit reading only past its input):
        its window.
        """
        if self.axes is not None:
            (top, bottom), (left, right) = self.axes[0].span(row), self.axes[1].span(col)
            return top, left, bottom, right
        return self.window(row, col)

    def window(self, row: int, col: int) -> tuple[int, int, int, int]:
        """The unit's window ``(top, left, bottom, right)``: its kernels composed, padding included. It contains
        ``box`` and, when ``regular``, has ``size`` pixels per axis (crops of one size)."""
        if self.axes is not None:
            (top, bottom), (left, right) = self.axes[0].window(row), self.axes[1].window(col)
            return top, left, bottom, right
        out = []
        for axis, pos in ((0, row), (1, col)):
            centre = self.start[axis] + pos * self.jump[axis]
            lo = round(centre - (self.size[axis] - 1) / 2)
            out.append((lo, lo + self.size[axis] - 1))
        (top, bottom), (left, right) = out
        return top, left, bottom, right


@dataclass(frozen=True)
class _Geo:
    rows: AxisField
    cols: AxisField
    hw: tuple[int, int]  # sizes of the tensor's row and column axes
    frame: str | None
    transformed: bool  # a spatial op lies between the frame and this node
    dims: tuple[int, int] = (2, 3)  # which tensor dims hold the image's rows and columns
    joined: str | None = None  # see ``ReceptiveField.joined``

    @property
    def jump(self) -> tuple[float, float]:
        return self.rows.jump, self.cols.jump

    def field(self) -> ReceptiveField:
        rows, cols = self.rows, self.cols
        start = (sum(rows.window(0)) / 2, sum(cols.window(0)) / 2)
        return ReceptiveField((rows.size, cols.size), self.jump, start, self.hw, self.frame, (rows, cols), self.joined)


@dataclass(frozen=True)
class _NoField:
    kind: str  # "flat" (spatial axes flattened or split), "ended" (no spatial geometry) or "unknown"
    origin: str  # the node that caused it
    reason: str = ""


_State = _Geo | _NoField | None  # None: does not depend on the input


def _message(name: str, state: _State) -> str:
    if state is None:
        return f"{name!r} does not depend on the input, so it has no receptive field"
    if isinstance(state, _Geo):
        return ""
    if state.kind == "flat":
        verb, _, detail = state.reason.partition(";")
        if name == state.origin:
            return f"{name!r} {verb}{detail}; its units have no spatial grid"
        past = {"flattens": "flattened", "splits": "split", "drops": "dropped"}
        first, _, rest = verb.partition(" ")
        return f"{name!r} has no spatial grid: {state.origin!r} {past.get(first, first)} {rest}"
    if state.kind == "ended":
        if name == state.origin:
            why = f" ({state.reason})" if state.reason else ""
            return f"{name!r} has no spatial geometry{why}; its units have no receptive field in the image"
        return (
            f"Node {name!r} comes after {state.origin!r}, which has no spatial geometry; "
            "its units have no receptive field in the image"
        )
    return f"{name!r} has no receptive field: {state.reason}"


def _unknown(node: Node, why: str) -> _NoField:
    return _NoField("unknown", node.name, f"{node.name!r} ({node.op}) {why}")


# -- spatial ops (conv, pooling, padding) ----------------------------------------------------------------
_Window = tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], bool]


def _spatial_params(node: Node) -> _Window | str:
    """``(kernel, stride, padding, dilation, transposed)`` of a conv, pooling or padding node, or why it has none."""
    m, p = node.module, node.params
    if node.kind == "module" and not node.alias:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if m.padding_mode != "zeros":
                return f"padding_mode={m.padding_mode!r}"
            k, d = _pair(m.kernel_size), _pair(m.dilation)
            transposed = isinstance(m, nn.ConvTranspose2d)
            return k, _pair(m.stride), _same_padding(m.padding, k, d), d, transposed
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k = _pair(m.kernel_size)
            s = _pair(m.stride) if m.stride is not None else k
            return k, s, _pair(m.padding), _pair(getattr(m, "dilation", 1)), False
        if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
            left, _, top, _ = m.padding
            return (1, 1), (1, 1), (top, left), (1, 1), False
        return "not a known spatial operation"
    if node.op in ("conv2d", "conv_transpose2d"):
        k, d = _pair(node.input_shapes[1][-2:]), _pair(p.get("dilation", 1))
        padding = _same_padding(p.get("padding", 0), k, d)
        return k, _pair(p.get("stride", 1)), padding, d, node.op == "conv_transpose2d"
    if node.op in ("max_pool2d", "avg_pool2d"):
        k = _pair(p["kernel_size"])
        stride = p.get("stride")
        s = _pair(stride) if stride is not None and stride != [] and stride != () else k
        return k, s, _pair(p.get("padding", 0)), _pair(p.get("dilation", 1)), False
    if node.op == "pad":
        pad = list(p.get("pad", ()))
        if p.get("mode", "constant") != "constant" or len(pad) < 2:
            return f"mode={p.get('mode')!r}"
        return (1, 1), (1, 1), (pad[2] if len(pad) >= 4 else 0, pad[0]), (1, 1), False
    return "not a known spatial operation"


def _same_padding(padding: object, k: tuple[int, int], d: tuple[int, int]) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":  # PyTorch puts the odd pixel of an even kernel's padding at the end
        return ((k[0] - 1) * d[0] // 2, (k[1] - 1) * d[1] // 2)
    return _pair(padding)


_SPATIAL_MODULES = (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.AvgPool2d, nn.ZeroPad2d, nn.ConstantPad2d)


def _is_spatial(node: Node) -> bool:
    if node.kind == "module" and not node.alias:
        return isinstance(node.module, _SPATIAL_MODULES) or _is_adaptive(node)
    return node.op in ("conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "pad") or _is_adaptive(node)


def _is_conv_or_pool(node: Node) -> bool:
    if node.kind == "module":
        return not node.alias and isinstance(node.module, (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.AvgPool2d))
    return node.op in ("conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d")


def _is_adaptive(node: Node) -> bool:
    if node.kind == "module":
        return not node.alias and isinstance(node.module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
    return node.op in ("adaptive_avg_pool2d", "adaptive_max_pool2d")


def _apply(node: Node, geo: _Geo, out_hw: tuple[int, int]) -> _State:
    """A conv, pooling or padding node applied to one input geometry (rows and columns its last two axes)."""
    nd = len(node.input_shapes[0])
    if geo.dims != (nd - 2, nd - 1):
        return _unknown(
            node,
            f"works on the last two axes of its input {node.input_shapes[0]}, but the image's rows and columns "
            f"are its dims {geo.dims}",
        )
    if _is_adaptive(node):
        (hi, wi), (ho, wo) = geo.hw, out_hw
        if hi % ho or wi % wo:
            return _NoField(
                "unknown",
                node.name,
                f"adaptive pooling {node.name!r} maps {hi}x{wi} to {ho}x{wo}, not a whole multiple, "
                "so its windows are irregular",
            )
        k = s = (hi // ho, wi // wo)
        p, d, transposed = (0, 0), (1, 1), False
    else:
        params = _spatial_params(node)
        if isinstance(params, str):
            return _NoField("unknown", node.name, f"{node.name!r} ({node.op}): {params}")
        k, s, p, d, transposed = params
    axes = []
    for a, ax in enumerate((geo.rows, geo.cols)):
        new = (_transposed if transposed else _windowed)(ax, out_hw[a], k[a], s[a], p[a], d[a])
        if isinstance(new, str):
            return _unknown(node, new)
        axes.append(new)
    return _Geo(axes[0], axes[1], out_hw, geo.frame, True, (2, 3), None if _mixes_channels(node) else geo.joined)


def _mixes_channels(node: Node) -> bool:
    """A conv whose every output channel reads every input channel (not a depthwise or grouped one)."""
    if node.kind == "module" and not node.alias and isinstance(node.module, (nn.Conv2d, nn.ConvTranspose2d)):
        return node.module.groups == 1
    return node.op in ("conv2d", "conv_transpose2d") and node.params.get("groups", 1) == 1


# -- ops that move, regroup or index axes -----------------------------------------------------------------
def _dim(d: object, nd: int) -> int | None:
    """A dim argument as an index in ``range(nd)``; None if it is not one."""
    if not isinstance(d, int) or isinstance(d, bool) or not -nd <= d < nd:
        return None
    return d % nd


def _dims(value: object, nd: int) -> list[int] | None:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    dims = [_dim(d, nd) for d in items]
    return None if any(d is None for d in dims) else dims  # type: ignore[return-value]


def _blocks(src: Sequence[int], out: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Group the axes of a reshape into blocks of equal size: ``(input axes, output axes)``, in order."""
    if 0 in src or 0 in out:
        return None
    blocks, i, j = [], 0, 0
    while i < len(src) or j < len(out):
        ins, outs, a, b = [], [], 1, 1
        if i < len(src):
            ins, a, i = [i], src[i], i + 1
        if j < len(out):
            outs, b, j = [j], out[j], j + 1
        while a != b:
            if a < b and i < len(src):
                ins, a, i = [*ins, i], a * src[i], i + 1
            elif b < a and j < len(out):
                outs, b, j = [*outs, j], b * out[j], j + 1
            else:
                return None
        blocks.append((ins, outs))
    return blocks


def _reshape(node: Node, geo: _Geo) -> _State:
    """A view/reshape/flatten/(un)squeeze: the image axes must stay axes of their own (sizes unchanged)."""
    src, out = node.input_shapes[0], node.output_shape
    blocks = _blocks(src, out)
    if blocks is None:
        return _unknown(node, f"reshapes {src} to {out} in a way we cannot follow")
    shapes = f"; ({tuple(src)} -> {tuple(out)})"
    moved = []
    for d in geo.dims:
        ins, outs = next(b for b in blocks if d in b[0])
        if src[d] != 1:  # size-1 axes may come and go around an axis without touching it
            ins, outs = [i for i in ins if src[i] != 1], [j for j in outs if out[j] != 1]
        if len(outs) > 1 and ins == [d]:
            return _NoField("flat", node.name, "splits a spatial axis" + shapes)
        if ins != [d] or len(outs) != 1:
            return _NoField("flat", node.name, "flattens the spatial axes" + shapes)
        moved.append(outs[0])
    batch = next(b for b in blocks if 0 in b[0])
    if 0 not in batch[1] or src[0] != out[0]:
        return _unknown(node, f"mixes the batch axis with others ({tuple(src)} -> {tuple(out)})")
    return replace(geo, dims=(moved[0], moved[1]))


def _permutation(node: Node) -> list[int] | None:
    """Output dim ``j`` is input dim ``perm[j]``; None where the arguments are not plain dims."""
    nd, p = len(node.input_shapes[0]), node.params
    if node.op == "permute":
        perm = _dims(p.get("dims"), nd)
    elif node.op in ("transpose", "swapaxes", "swapdims"):
        perm = list(range(nd))
        a, b = _dim(p.get("dim0", p.get("axis0")), nd), _dim(p.get("dim1", p.get("axis1")), nd)
        if a is None or b is None:
            return None
        perm[a], perm[b] = perm[b], perm[a]
    else:  # movedim, moveaxis
        src, dst = _dims(p.get("source"), nd), _dims(p.get("destination"), nd)
        if src is None or dst is None or len(src) != len(dst):
            return None
        slots: list[int | None] = [None] * nd
        for s, d in zip(src, dst, strict=True):
            slots[d] = s
        rest = iter(i for i in range(nd) if i not in src)
        perm = [next(rest) if s is None else s for s in slots]
    return perm if perm is not None and sorted(perm) == list(range(nd)) else None


def _permute(node: Node, geo: _Geo) -> _State:
    perm = _permutation(node)
    if perm is None:
        return _unknown(node, f"moves axes with arguments we cannot read {dict(node.params)}")
    if perm[0] != 0:
        return _unknown(node, f"moves the batch axis (permutation {perm})")
    rows, cols = perm.index(geo.dims[0]), perm.index(geo.dims[1])
    if rows > cols:
        return _unknown(node, "swaps the image's rows and columns")
    return replace(geo, dims=(rows, cols))


def _without(geo: _Geo, removed: list[int]) -> _Geo:
    """The geometry after the tensor dims ``removed`` (none of them an image axis) are dropped."""
    rows, cols = (d - sum(r < d for r in removed) for d in geo.dims)
    return replace(geo, dims=(rows, cols))


def _split(node: Node, geo: _Geo) -> _State:
    """``chunk``/``split``/``unbind`` along an axis other than the batch and image axes keeps the geometry."""
    nd = len(node.input_shapes[0])
    dim = _dim(node.params.get("dim", 0), nd)
    if dim is None or dim == 0 or dim in geo.dims:
        what = "the batch axis" if dim == 0 else "an image axis" if dim is not None else "an axis we cannot read"
        return _unknown(node, f"splits {what}: its parts would need boxes of their own")
    return _without(geo, [dim]) if node.op == "unbind" else geo


def _index(node: Node, geo: _Geo) -> _State:
    """``x[index]`` with slices, ints, ``None`` and ``...``: crops and strides on image axes are spatial ops."""
    index, src = node.params.get("index"), node.input_shapes[0]
    items = list(index) if isinstance(index, tuple) else [index]
    basic = all(
        i is None or i is Ellipsis or isinstance(i, slice) or (isinstance(i, int) and not isinstance(i, bool))
        for i in items
    )
    used = sum(i is not None and i is not Ellipsis for i in items)
    if "index" not in node.params or not basic or items.count(Ellipsis) > 1 or used > len(src):
        return _unknown(node, "indexes with tensors or masks, which we cannot follow")
    if Ellipsis in items:
        e = items.index(Ellipsis)
        items = items[:e] + [slice(None)] * (len(src) - used) + items[e + 1 :]
    items += [slice(None)] * (len(src) - used)
    where: dict[int, int | None] = {}  # input dim -> output dim (None: dropped by an int index)
    steps: dict[int, tuple[int, int]] = {}
    i = j = 0
    for item in items:
        if item is None:
            j += 1
            continue
        if isinstance(item, slice):
            start, _, step = item.indices(src[i])
            where[i], steps[i] = j, (start, step)
            j += 1
        else:
            where[i] = None
        i += 1
    if where[0] is None:
        return _unknown(node, "selects one sample of the batch")
    if where[geo.dims[0]] is None or where[geo.dims[1]] is None:
        return _NoField("flat", node.name, "drops a spatial axis; (an int index on the image's rows or columns)")
    dims = (where[geo.dims[0]], where[geo.dims[1]])
    out_hw = (node.output_shape[dims[0]], node.output_shape[dims[1]])  # type: ignore[index]
    (h0, hs), (w0, ws) = steps[geo.dims[0]], steps[geo.dims[1]]
    if (h0, hs, w0, ws) == (0, 1, 0, 1) and out_hw == geo.hw:  # batch or channel slices only
        return replace(geo, dims=dims)  # type: ignore[arg-type]
    rows, cols = _windowed(geo.rows, out_hw[0], 1, hs, -h0, 1), _windowed(geo.cols, out_hw[1], 1, ws, -w0, 1)
    return _Geo(rows, cols, out_hw, geo.frame, True, dims)  # type: ignore[arg-type]


def _reduce(node: Node, geo: _Geo) -> _State:
    """A mean/sum/max over axes other than the image axes keeps the geometry; over an image axis it ends it."""
    nd, p = len(node.input_shapes[0]), node.params
    dims = list(range(nd)) if p.get("dim") is None else _dims(p["dim"], nd)
    if dims is None:
        return _unknown(node, f"reduces over dims we cannot read ({p.get('dim')!r})")
    if geo.dims[0] in dims or geo.dims[1] in dims:
        return _NoField("ended", node.name)
    if p.get("keepdim"):
        return geo
    return _without(geo, dims)


def _last_axes(node: Node) -> int:
    """How many trailing axes a ``Linear``/``LayerNorm`` mixes (0: not such an op)."""
    m = node.module
    if node.kind == "module" and not node.alias:
        if isinstance(m, nn.Linear):
            return 1
        if isinstance(m, nn.LayerNorm):
            return len(m.normalized_shape)
        return 0
    if node.op == "linear":
        return 1
    if node.op == "layer_norm":
        shape = node.params.get("normalized_shape")
        return len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
    return 0


def _mixed_axis(node: Node) -> int | None:
    """The dim a channel-mixing op (LRN, channel shuffle, softmax) works along; None for other ops."""
    if node.kind == "module":
        if not node.alias and isinstance(node.module, (nn.Softmax, nn.LogSoftmax)):
            return 1 if node.module.dim is None else node.module.dim
        return next((dim for kind, dim in _AXIS_MODULES if not node.alias and isinstance(node.module, kind)), None)
    if node.op not in _AXIS_FUNCTIONS:
        return None
    dim = _AXIS_FUNCTIONS[node.op]
    return node.params.get("dim", 1) if dim is None else dim


def _is_pointwise(node: Node) -> bool:
    """Keeps each unit in place (per position), judged by the op; shapes are checked by the caller."""
    if node.kind == "module":
        return node.alias or isinstance(node.module, _POINTWISE_MODULES)
    return node.op in _POINTWISE_FUNCTIONS


def _carries(node: Node) -> bool:
    """Passes a tensor's lack of geometry on unchanged (an activation or reshape of flattened units)."""
    if node.kind == "module" and isinstance(node.module, (nn.Flatten, nn.Unflatten)):
        return True
    function = node.kind == "function" and node.op in _LAYOUT | _REDUCTIONS
    return _is_pointwise(node) or _mixed_axis(node) is not None or function


# -- joins -------------------------------------------------------------------------------------------------
def _join(node: Node, geos: list[_Geo], out_hw: tuple[int, int]) -> _State:
    """The union of the fields of several input-dependent operands of an elementwise op or concatenation."""
    frames = {g.frame for g in geos}
    if len(frames) > 1:
        return _NoField(
            "unknown", node.name, f"{node.name!r} joins paths in different frames {sorted(map(str, frames))}"
        )
    if len({g.dims for g in geos}) > 1:
        return _unknown(node, f"joins tensors whose image axes are different dims {sorted({g.dims for g in geos})}")
    for g in geos:
        if g.hw != out_hw:
            return _unknown(
                node,
                f"broadcasts an operand of spatial shape {g.hw} to {out_hw}: every unit depends on all of that "
                "operand (a global context, such as a squeeze-excitation gate), not on a local box",
            )
    if len({(_rate(g.rows), _rate(g.cols)) for g in geos}) > 1:
        return _unknown(node, f"joins paths with different jumps {sorted({g.jump for g in geos})}")
    rows, cols = _union([g.rows for g in geos]), _union([g.cols for g in geos])
    joined = next((g.joined for g in geos if g.joined is not None), None)
    return _Geo(rows, cols, out_hw, geos[0].frame, any(g.transformed for g in geos), geos[0].dims, joined)


def _broadcast(node: Node, geos: dict[int, _Geo]) -> _State:
    """An elementwise op: operands align from their last axis (broadcasting), then join."""
    nd = len(node.output_shape)
    moved = []
    for i, g in geos.items():
        shift = nd - len(node.input_shapes[i])
        moved.append(replace(g, dims=(g.dims[0] + shift, g.dims[1] + shift)))
    dims = moved[0].dims
    return _join(node, moved, (node.output_shape[dims[0]], node.output_shape[dims[1]]))


def _concat(node: Node, geos: dict[int, _Geo]) -> _State:
    """``cat`` along an axis that is not an image axis (union of the fields); ``stack`` adds an axis."""
    nd = len(node.output_shape)
    dim = _dim(node.params.get("dim", 0), nd)
    if dim is None:
        return _unknown(node, f"joins along a dim we cannot read ({node.params.get('dim')!r})")
    moved = list(geos.values())
    if node.op == "stack":
        moved = [replace(g, dims=(g.dims[0] + (dim <= g.dims[0]), g.dims[1] + (dim <= g.dims[1]))) for g in moved]
    elif any(dim in g.dims for g in moved):
        return _unknown(node, "concatenates along an image axis")
    dims = moved[0].dims
    state = _join(node, moved, (node.output_shape[dims[0]], node.output_shape[dims[1]]))
    if node.op != "stack" and isinstance(state, _Geo) and len({(g.rows, g.cols) for g in moved}) > 1:
        return replace(state, joined=node.name)  # each channel's field is its own branch's, not the union
    return state


# -- the walk ----------------------------------------------------------------------------------------------
def _follow(node: Node, geos: dict[int, _Geo]) -> _State | str:
    """The geometry of ``node``'s output from its input-dependent operands, or why the op is not one we know."""
    out = node.output_shape
    function = node.kind == "function"
    if function and node.op in _SHAPE_FROM_SECOND and 0 in geos:
        geos = {0: geos[0]}
    if _is_spatial(node):
        if list(geos) != [0]:
            return _unknown(node, "has input-dependent parameters")
        return _apply(node, geos[0], (out[-2], out[-1]))
    if function and node.op in _CONCATS:
        return _concat(node, geos)
    mixed = _mixed_axis(node)
    elementwise_max = function and node.op in ("max", "min") and len(node.input_shapes) > 1
    if _is_pointwise(node) or elementwise_max:
        return _broadcast(node, geos)
    layout = (function and node.op in _LAYOUT | _REDUCTIONS | {"getitem"}) or _last_axes(node) or mixed is not None
    if not layout and not (node.kind == "module" and isinstance(node.module, (nn.Flatten, nn.Unflatten))):
        return f"{node.name!r} ({node.op}) is not a known spatial operation"
    geo = geos.get(0)
    if geo is None or len(geos) > 1:
        return _unknown(node, "has input-dependent parameters")
    if function and node.op == "getitem":
        return _index(node, geo)
    if function and node.op in _PERMUTES:
        return _permute(node, geo)
    if function and node.op in _SPLITS:
        return _split(node, geo)
    if function and node.op in _REDUCTIONS:
        return _reduce(node, geo)
    nd = len(node.input_shapes[0])
    if n := _last_axes(node):
        if max(geo.dims) >= nd - n:
            return _unknown(node, f"mixes its last {n} axis(es), which include an image axis")
        return geo
    if mixed is not None:
        if _dim(mixed, nd) in geo.dims or _dim(mixed, nd) is None:
            return _unknown(node, f"mixes units along dim {mixed}, an image axis")
        return geo
    return _reshape(node, geo)


def _restart(name: str | None, out_hw: tuple[int, int]) -> _Geo:
    return _Geo(_pixels(out_hw[0]), _pixels(out_hw[1]), out_hw, name, False)


def _state(graph: Graph, node: Node, states: dict[str, _State]) -> _State:
    if node.kind == INPUT:
        shape = node.output_shape
        if len(shape) != 4:
            return _NoField("unknown", node.name, f"the input has shape {shape}, not (N, C, H, W)")
        return _restart(None, (shape[2], shape[3]))
    if not node.depends_on_input:
        return None
    positions = [i for i, p in enumerate(node.inputs) if p is not None and states.get(p) is not None]
    operands = {i: states[node.inputs[i]] for i in positions}  # type: ignore[index]
    broken = [s for s in operands.values() if isinstance(s, _NoField)]
    if broken:
        for kind in ("unknown", "ended"):
            if first := next((s for s in broken if s.kind == kind), None):
                return first
        if _carries(node):
            return broken[0]  # dropout, activation, reshape ... of a flattened tensor
        return _NoField("ended", node.name, _message(node.name, broken[0]).split(": ", 1)[1])
    geos: dict[int, _Geo] = operands  # type: ignore[assignment]
    out = node.output_shape
    if node.alias:
        g = next(iter(geos.values()))
        if g.frame == node.inputs[0] and not g.transformed:  # name an input transform by its module
            return replace(g, frame=node.name)
        return g
    state = _follow(node, geos)
    if isinstance(state, str):
        state = _NoField("unknown", node.name, state) if len(out) == 4 else _NoField("ended", node.name)
    fresh = not any(g.transformed for g in geos.values())
    refused_here = isinstance(state, _NoField) and state.kind == "unknown" and state.origin == node.name
    if refused_here and fresh and len(out) == 4 and not _is_spatial(node):
        return _restart(node.name, (out[2], out[3]))  # before any spatial op: an input transform (a resize)
    return state


def _result(name: str, state: _State, shape: tuple[int, ...]) -> ReceptiveField | str:
    if not isinstance(state, _Geo):
        return _message(name, state)
    if len(shape) != 4 or state.dims != (2, 3):
        return (
            f"{name!r} holds the image's rows and columns in dims {state.dims} of its shape {shape}; "
            "receptive fields are given for (N, C, H, W) tensors"
        )
    return state.field()


def graph_receptive_fields(graph: Graph, names: Iterable[str] | None = None) -> dict[str, ReceptiveField]:
    """Receptive field of each named node of a traced graph (default: every conv/pooling call that has one).

    Unknown names raise ``LayerError`` listing the valid ones; a node whose geometry cannot be derived
    raises ``ReceptiveFieldError`` naming the node that prevents it.
    """
    states: dict[str, _State] = {}
    for node in graph:
        states[node.name] = _state(graph, node, states)
    if names is None:
        found = {n.name: _result(n.name, states[n.name], n.output_shape) for n in graph if _is_conv_or_pool(n)}
        return {n: f for n, f in found.items() if isinstance(f, ReceptiveField)}
    fields = {}
    for node in graph.resolve(names):
        field = _result(node.name, states[node.name], node.output_shape)
        if isinstance(field, str):
            raise ReceptiveFieldError(field)
        fields[node.name] = field
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
