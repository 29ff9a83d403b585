"""Which units matter, causally: remove one unit (zero its output) and measure what the network loses.

Core module (no Lightning; tensors in, tensors out). A unit is a channel of a node with spatial maps (N, C, h, w) or a
feature of a node (N, F) (``cnnfeat.atlas``'s units). *Removing* unit ``u`` of node ``L`` sets ``L``'s output to 0
for that unit at every position, during the forward pass of each probe image; ``ablation_node`` picks the node to
zero for an atlas layer: the activation after it (what the unit sends on), else the layer itself.

``ablation_importance`` streams the probe in batches and reports per unit, overall and per true class: the drop in
accuracy and the drop in the true-class logit (``base - ablated``: positive when the unit supported the right
answer). Speed: one forward pass per batch serves every node. The unablated batch of B images runs through; at each
node (in execution order) m x B copies of the unablated rows are appended to the batch, copy j with unit ``u_j``
removed, so the network before a node runs once and only the rest runs on its copies. Two exact shortcuts move where
the copies start (``route``): past ops that keep a zeroed channel zero (max-pooling a ReLU's output, average pooling,
dropout modules), and past a following ``Conv2d`` or (flattened) ``Linear`` module, whose output without the unit is
its full output minus the unit's own contribution. Where the graph goes around a node (a residual connection joins
after it, or it is computed in place by a function, found by a trial pass on one image) the inputs are copied
instead and each copy's unit is zeroed at the node. A unit whose output is already 0 for an image changes nothing:
that image's ablated logits are its base logits, exactly (a dead unit has importance 0).

Cost, in forward passes of one image (``ablation_cost``, stated before running): ``images x (1 + bypassed + sum over
nodes of units x share)``, where ``share`` (``forward_share``) is the fraction of the network's multiply-adds a copy
reruns (1 where the inputs are copied): 6.3 per image for all 128 SmallCNN units. For big networks,
``bounded_units`` keeps the cost within a budget (default ``DEFAULT_BUDGET`` = 16) by sampling the same share of every
node's units (at least one each; ``budget=None`` lifts it), and the caller chooses a smaller probe.

``firing_rate`` (one definition, ``cnnfeat.units.fires``): the fraction of a unit's activations that fire (> 0)
over images and positions. ``classify`` names the units that fire a lot but do not matter, and those that rarely
fire but matter (for the whole probe or for one class).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnfeat.attribution import Edit, InplaceNodeError, device_of, evaluating, intervene
from cnnfeat.errors import ConfigError
from cnnfeat.graph import INPUT, Graph, Node, activation_after, is_relu_family, split_call
from cnnfeat.probe_pass import PassBatch
from cnnfeat.units import fires

#: values (copies x one image's output) the ablated node's expanded output may hold in one forward pass (64 MB float32)
MAX_ELEMENTS = 2**24
#: default bound on an ablation's cost, in forward passes per probe image (all 128 SmallCNN units need 6.3)
DEFAULT_BUDGET = 16.0


# -- units and firing -------------------------------------------------------------------------------------------
def ablation_node(graph: Graph, layer: str) -> str:
    """The node whose output is zeroed to remove a unit of ``layer``: the activation after it, else ``layer``."""
    node = graph[layer]
    act, _ = activation_after(graph, node.name)
    return act if act is not None else node.name


def units_of(graph: Graph, node: str) -> int:
    """Units of a node: channels of (N, C, h, w), features of (N, F); anything else is refused."""
    shape = graph[node].output_shape
    if len(shape) not in (2, 4):
        raise ConfigError(f"node {node!r} outputs shape {tuple(shape)}: units need (N, C, h, w) or (N, F)")
    return int(shape[1])


def choose_units(units: int, max_units: int | None = None, seed: int = 0) -> torch.Tensor:
    """All ``units`` (0..units-1), or a seeded sample of ``max_units`` of them, sorted."""
    if max_units is not None and max_units < 1:
        raise ConfigError(f"max_units must be >= 1 or None, got {max_units}")
    if max_units is None or units <= max_units:
        return torch.arange(units)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(units, generator=gen)[:max_units].sort().values


def firing_sums(acts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per unit (dim 1): how many activations fire, and how many activations each unit had (images x positions)."""
    f = fires(acts.detach())
    dims = (0, *range(2, f.ndim))
    per_unit = f.sum(dim=dims).double().cpu()
    return per_unit, f.numel() // max(1, f.shape[1])


def firing_rate(acts: torch.Tensor) -> torch.Tensor:
    """Fraction of each unit's activations (over images and positions) that fire, (units,) float64."""
    hits, count = firing_sums(acts)
    return hits / max(1, count)


class FiringRate:
    """``firing_rate`` over a whole probe pass, fed batch by batch (the shared pass's ``update(PassBatch)``)."""

    def __init__(self, nodes: Sequence[str]) -> None:
        self.nodes = list(nodes)
        self._hits: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}

    def add(self, node: str, acts: torch.Tensor) -> None:
        hits, count = firing_sums(acts)
        self._hits[node] = self._hits.get(node, 0) + hits
        self._count[node] = self._count.get(node, 0) + count

    def update(self, batch: PassBatch) -> None:
        for n in self.nodes:
            self.add(n, batch.outputs[n])

    def finish(self) -> dict[str, torch.Tensor]:
        """``{node: (units,) float64}`` since the last ``finish``."""
        out = {n: self._hits[n] / max(1, self._count[n]) for n in self._hits}
        self._hits, self._count = {}, {}
        return out


# -- cost ---------------------------------------------------------------------------------------------------------
def node_macs(node: Node) -> int:
    """Multiply-adds of one image through a conv or linear node (module or function); 0 for anything else."""
    shape = node.output_shape
    per_out = 0
    if node.kind == "module" and not node.alias:
        m = node.module
        if isinstance(m, nn.Conv2d):
            per_out = m.in_channels // m.groups * math.prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            per_out = m.in_features
    elif node.kind == "function" and len(node.input_shapes) > 1:
        w = node.input_shapes[1]
        if node.op == "conv2d" and len(w) == 4:
            per_out = math.prod(w[1:])
        elif node.op == "linear" and len(w) == 2:
            per_out = w[1]
    if not per_out or not shape:
        return 0
    return per_out * math.prod(shape[1:])


def expands_at_node(graph: Graph, name: str) -> bool:
    """Whether everything after ``name`` depends on the input only through ``name`` (no path goes around it), so a
    batch can be expanded at that node."""
    order = list(graph.nodes)
    i = order.index(graph[name].name)
    for later in order[i + 1 :]:
        for p in graph.nodes[later].parents:
            if p != name and graph.nodes[p].depends_on_input and order.index(p) < i:
                return False
    return True


def forward_share(graph: Graph, name: str) -> float:
    """Per removed unit of ``name``, the fraction of a forward pass's multiply-adds its copy costs (``route``): the
    network after the route's target, plus the unit's own contribution to a linear target; 1 (a whole forward pass)
    where the inputs are copied."""
    r = route(graph, name)
    nodes = [n for n in graph if n.kind != INPUT]
    total = sum(node_macs(n) for n in nodes)
    if not total or not r.expands:
        return 1.0
    order = [n.name for n in nodes]
    i = order.index(r.target)
    own = 0.0
    if r.linear is not None:
        linear = graph[r.linear]
        own = node_macs(linear) / max(1, units_of(graph, r.point))
    return (sum(node_macs(n) for n in nodes[i + 1 :]) + own) / total


def ablation_cost(graph: Graph, units: Mapping[str, int], images: int) -> float:
    """Estimated cost of ``ablation_importance`` in forward passes of one image: ``images x (1 + bypassed + sum_L
    units_L x forward_share(L))``: one joint unablated pass, one more per node whose inputs are copied (a path goes
    around it), and each unit's copy."""
    bypassed = sum(1 for n in units if not route(graph, n).expands)
    return images * (1.0 + bypassed + sum(u * forward_share(graph, n) for n, u in units.items()))


def bounded_units(
    graph: Graph, nodes: Sequence[str], budget: float | None = DEFAULT_BUDGET, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Units to remove per node: all of them when that costs at most ``budget`` forward passes per probe image
    (``ablation_cost`` / images); else the same largest fraction of every node's units that fits (at least one unit
    each; a seeded sample, ``choose_units``). ``budget=None`` lifts the bound."""
    sizes = {graph[n].name: units_of(graph, n) for n in nodes}
    if budget is not None and budget <= 1:
        raise ConfigError(f"budget must be > 1 forward pass per image (the unablated pass is one), got {budget}")

    def counts(f: float) -> dict[str, int]:
        return {n: max(1, math.floor(f * u)) for n, u in sizes.items()}

    chosen = counts(1.0)
    if budget is not None and ablation_cost(graph, chosen, 1) > budget:
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ablation_cost(graph, counts(mid), 1) <= budget else (lo, mid)
        chosen = counts(lo)
    return {n: choose_units(sizes[n], chosen[n], seed) for n in sizes}


# -- ablation -------------------------------------------------------------------------------------------------------
@dataclass
class UnitImportance:
    """What removing each unit of one node costs on the probe; rows follow ``units``."""

    node: str
    units: torch.Tensor  #: (U,) unit indices
    images: int
    class_counts: torch.Tensor  #: (K,) probe images per true class
    base_accuracy: float
    base_class_accuracy: torch.Tensor  #: (K,)
    acc_drop: torch.Tensor  #: (U,) base accuracy - accuracy without the unit
    logit_drop: torch.Tensor  #: (U,) mean true-class logit, base - without the unit
    class_acc_drop: torch.Tensor  #: (U, K) the same within each true class (NaN for a class with no image)
    class_logit_drop: torch.Tensor  #: (U, K)
    firing: torch.Tensor  #: (U,) firing rate on the same images

    def ranking(self) -> torch.Tensor:
        """Positions in ``units``, most important first: by logit drop, then accuracy drop."""
        by_acc = torch.sort(-self.acc_drop, stable=True).indices
        return by_acc[torch.sort(-self.logit_drop[by_acc], stable=True).indices]

    def peak_drop(self) -> torch.Tensor:
        """(U,) the larger of the overall and the largest per-class logit drop (a unit a single class needs counts)."""
        per_class = torch.nan_to_num(self.class_logit_drop, nan=-math.inf).amax(dim=1)
        return torch.maximum(self.logit_drop, per_class)


class _Sums:
    def __init__(self, units: int, classes: int) -> None:
        self.correct = torch.zeros(units, classes, dtype=torch.float64)
        self.logit = torch.zeros(units, classes, dtype=torch.float64)
        self.base_correct = torch.zeros(classes, dtype=torch.float64)
        self.base_logit = torch.zeros(classes, dtype=torch.float64)
        self.counts = torch.zeros(classes, dtype=torch.float64)
        self.fire_hits = torch.zeros(units, dtype=torch.float64)
        self.fire_count = 0


@dataclass(frozen=True)
class Route:
    """Where removing a unit of ``node`` is done: zeroing it at ``point`` is the same (only ops that keep a zero
    channel zero lie between: pooling of a ReLU's output, average pooling, dropout modules, container outputs), and
    with ``linear`` (a Conv2d or Linear module fed by ``point`` alone, through a ``flatten`` for a Linear) the copies
    start at that module's output, each the full output minus the unit's own contribution (linearity). ``expands``:
    the batch can be expanded there (no path goes around); else the inputs are copied and ``node`` zeroed."""

    node: str
    point: str
    linear: str | None
    expands: bool

    @property
    def target(self) -> str:
        return self.linear or self.point


def _keeps_zero(node: Node, nonnegative: bool) -> bool:
    """Channel-wise ops that map a channel of zeros to zeros and leave the other channels alone."""
    if node.kind == "module":
        m = node.module
        if node.alias or isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.AvgPool2d)):
            return True
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return True
        return nonnegative and isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) and not m.return_indices
    if node.op in ("avg_pool2d", "adaptive_avg_pool2d"):
        return True
    return nonnegative and node.op in ("max_pool2d", "adaptive_max_pool2d") and not node.params.get("return_indices")


def _only_child(graph: Graph, name: str) -> Node | None:
    """The one node consuming ``name``'s output, if it is the only consumer and ``name`` its only input-dependent
    input."""
    children = graph.children(name)
    if len(children) != 1:
        return None
    child = graph.nodes[children[0]]
    dependent = [p for p in child.inputs if p is not None and graph.nodes[p].depends_on_input]
    return child if dependent == [name] else None


def route(graph: Graph, node: str) -> Route:
    """How ``ablation_importance`` removes the units of ``node`` (see ``Route``)."""
    name = graph[node].name
    nonnegative = is_relu_family(graph[name])
    point = name
    while (child := _only_child(graph, point)) is not None and _keeps_zero(child, nonnegative):
        if len(child.output_shape) != len(graph[point].output_shape):
            break
        point = child.name
    linear = None
    child = _only_child(graph, point)
    shape = graph[point].output_shape
    if child is not None and child.kind == "module" and not child.alias:
        m = child.module
        conv = isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and len(shape) == 4
        if conv or (isinstance(m, nn.Linear) and len(shape) == 2):
            linear = child.name
    elif child is not None and _flattens_channels(child) and len(shape) == 4:
        after = _only_child(graph, child.name)
        if after is not None and after.kind == "module" and not after.alias and isinstance(after.module, nn.Linear):
            linear = after.name
    target = linear or point
    return Route(name, point, linear, expands_at_node(graph, target))


def _flattens_channels(node: Node) -> bool:
    """``torch.flatten(x, 1)`` or ``nn.Flatten()`` of (N, C, h, w): channel c becomes features c*h*w .. (c+1)*h*w-1."""
    if node.kind == "module":
        m = node.module
        return not node.alias and isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim in (-1, 3)
    return node.op == "flatten" and node.params.get("start_dim") == 1 and node.params.get("end_dim", -1) in (-1, 3)


def ablation_importance(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    graph: Graph,
    nodes: Mapping[str, Sequence[int] | torch.Tensor | None],
    batch_size: int = 100,
    max_elements: int = MAX_ELEMENTS,
) -> dict[str, UnitImportance]:
    """Remove each listed unit of each node in turn (module docstring) over ``inputs`` (N, ...) with true ``labels``;
    ``nodes``: ``{node: units or None for all}``. ``graph`` is the model's traced graph (it says where a batch can be
    expanded). Runs under ``no_grad`` in eval mode (each submodule's mode restored), streaming ``batch_size`` images
    at a time; memory: each node's copies hold at most ``max_elements`` values per forward pass (at least one copy).

    One forward pass serves every node: the unablated batch runs through, and at each node (in execution order) the
    copies of that node's units are appended to the batch, so the network before a node runs once per batch."""
    if len(inputs) != len(labels) or len(inputs) == 0:
        raise ConfigError(f"ablation needs images and as many labels, got {len(inputs)} inputs, {len(labels)} labels")
    if batch_size < 1 or max_elements < 1:
        raise ConfigError(f"batch_size and max_elements must be >= 1, got {batch_size}, {max_elements}")
    plan: dict[str, torch.Tensor] = {}
    for name, units in nodes.items():
        n_units = units_of(graph, name)
        u = torch.arange(n_units) if units is None else torch.as_tensor(units, dtype=torch.long).flatten()
        if len(u) and (u.min() < 0 or u.max() >= n_units):
            raise ConfigError(f"units {u.tolist()} out of range for {name!r} ({n_units} units)")
        plan[graph[name].name] = u
    order = [n for n in graph.nodes if n in plan]
    routes = {n: route(graph, n) for n in order}
    labels = labels.long().cpu()
    device = device_of(model)
    sums: dict[str, _Sums] = {}
    with evaluating(model), torch.no_grad():
        _find_in_place(model, inputs[:1].to(device), plan, routes)
        for start in range(0, len(inputs), batch_size):
            xb = inputs[start : start + batch_size].to(device)
            yb = labels[start : start + batch_size]
            size = {n: max(1, math.prod(graph[routes[n].target].output_shape[1:]) * len(xb)) for n in order}
            chunks = {n: list(plan[n].split(max(1, max_elements // size[n]))) or [plan[n]] for n in order}
            _ablate_batch(model, xb, yb, [n for n in order if routes[n].expands], chunks, routes, sums)
            for n in order:
                if not routes[n].expands:
                    _ablate_bypassed(model, xb, yb, n, plan[n], max(1, max_elements // size[n]), sums)
    return {name: _finish(name, plan[name], sums[name], len(inputs)) for name in order}


def _find_in_place(model: nn.Module, x: torch.Tensor, plan: dict[str, torch.Tensor], routes: dict[str, Route]) -> None:
    """A trial pass on one image: a node whose copies would start at an op computed in place (``x.relu_()``) gets its
    inputs copied instead (its route stops expanding)."""
    while joint := [n for n in plan if routes[n].expands]:
        try:
            _joint_pass(model, x, [(n, plan[n][:1]) for n in joint], routes, {"blocks": []})
            return
        except InplaceNodeError as e:
            bad = getattr(e, "node", None)
            if bad not in routes or not routes[bad].expands:
                raise
            routes[bad] = Route(bad, bad, None, False)


def _check_labels(y: torch.Tensor, k: int) -> None:
    if int(y.max()) >= k:
        raise ConfigError(f"labels go up to {int(y.max())} but the model has {k} classes")


def _ablate_batch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    joint: list[str],
    chunks: dict[str, list[torch.Tensor]],
    routes: dict[str, Route],
    sums: dict[str, _Sums],
) -> None:
    """One batch of every expandable node, in as few joint passes as the chunks allow (pass p: the p-th chunk of
    every node). Block 0 of the first pass keeps every unit: the base logits, each node's output and firing."""
    if not joint:
        return
    b = len(x)
    active: dict[str, torch.Tensor] = {}
    base: torch.Tensor | None = None
    for p in range(max(len(chunks[n]) for n in joint)):
        group = [(n, chunks[n][p]) for n in joint if p < len(chunks[n])]
        seen: dict = {"blocks": []}
        logits = _joint_pass(model, x, group, routes, seen).float()
        k = logits.shape[1]
        _check_labels(y, k)
        logits = logits.view(-1, b, k)
        if base is None:
            base = logits[0]
            for n, _ in group:
                act = seen[("act", n)]
                units = torch.cat(chunks[n])
                s = sums.setdefault(n, _Sums(len(units), k))
                _add_base(s, base, y, act[:, units.to(act.device)])
                active[n] = act.flatten(2).ne(0).any(2) if act.ndim > 2 else act.ne(0)  # (B, C): output != 0
        row = 1
        for n, m in seen["blocks"]:
            chunk = dict(group)[n]
            first = sum(len(c) for c in chunks[n][:p])
            _add_copies(sums[n], logits[row : row + m], base, y, chunk, active[n], first)
            row += m


def _add_copies(
    s: _Sums,
    logits: torch.Tensor,
    base: torch.Tensor,
    y: torch.Tensor,
    chunk: torch.Tensor,
    active: torch.Tensor,
    first: int,
) -> None:
    """Add the ablated logits (m, B, K) of ``chunk``'s units (rows ``first``.. of the node's units) to ``s``."""
    yd = y.to(logits.device)
    m = len(chunk)
    changed = active[:, chunk.to(active.device)].T.unsqueeze(2)  # (m, B, 1)
    logits = torch.where(changed, logits, base.unsqueeze(0))  # an unchanged input gives the base, exactly
    true = logits.gather(2, yd.view(1, -1, 1).expand(m, -1, 1)).squeeze(2)
    ok = (logits.argmax(2) == yd.view(1, -1)).double().cpu()
    rows = slice(first, first + m)
    idx = y.view(1, -1).expand(m, -1)
    s.correct[rows] += torch.zeros_like(s.correct[rows]).scatter_add_(1, idx, ok)
    s.logit[rows] += torch.zeros_like(s.logit[rows]).scatter_add_(1, idx, true.double().cpu())


def _joint_pass(
    model: nn.Module, x: torch.Tensor, group: list[tuple[str, torch.Tensor]], routes: dict[str, Route], seen: dict
) -> torch.Tensor:
    """Logits of the batch, then of each node's copies in the order they were appended (``seen["blocks"]``: (node,
    copies)). ``seen[("act", node)]``: the node's output for the unablated batch."""
    b = len(x)
    steps: dict[str, list[Edit]] = {}

    def record(key: tuple[str, str], clone: bool) -> Edit:
        def edit(t: torch.Tensor, inplace: bool) -> torch.Tensor:
            seen[key] = t[:b].detach().clone() if clone else t[:b].detach()
            return t

        return edit

    for n, chunk in group:
        r = routes[n]
        steps.setdefault(r.node, []).append(record(("act", n), True))
        if r.linear is not None:
            steps.setdefault(r.point, []).append(record(("point", n), False))
        steps.setdefault(r.target, []).append(_expander(model, r, chunk, b, seen))

    def chain(fns: list[Edit]) -> Edit:
        def edit(t: torch.Tensor, inplace: bool) -> torch.Tensor:
            for fn in fns:
                t = fn(t, inplace)
            return t

        return edit

    with intervene(model, {name: chain(fns) for name, fns in steps.items()}):
        return model(x)


def _expander(model: nn.Module, r: Route, units: torch.Tensor, b: int, seen: dict) -> Edit:
    """The edit at ``r.target`` that appends one copy of the unablated rows per unit, with that unit removed."""
    m = len(units)
    module = None
    if r.linear is not None:  # a graph node: "conv2:1" is the second call of the module "conv2"
        module = dict(model.named_modules()).get(split_call(r.linear)[0])
        if not isinstance(module, (nn.Conv2d, nn.Linear)):  # never fall back to zeroing a unit of r.linear's output
            raise RuntimeError(f"{r.linear!r} (after {r.node!r}) is not a Conv2d or Linear module of the model")

    def edit(t: torch.Tensor, inplace: bool) -> torch.Tensor:
        if inplace:
            err = InplaceNodeError(f"{r.target!r} is computed in place")
            err.node = r.node  # type: ignore[attr-defined]
            raise err
        clean = t[:b]
        u = units.to(t.device)
        if module is None:  # copies of the output with the unit zeroed
            copies = clean.unsqueeze(0).repeat(m, *([1] * clean.ndim))
            copies[torch.arange(m, device=t.device), :, u] = 0
        else:  # the output minus each unit's own contribution
            copies = clean.unsqueeze(0) - _contributions(module, seen[("point", r.node)], u)
        new = torch.empty((len(t) + m * b, *t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=_layout(t))
        new[: len(t)] = t
        new[len(t) :] = copies.flatten(0, 1)
        seen["blocks"].append((r.node, m))
        return new

    return edit


def _contributions(module: nn.Module, a: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """(m, B, ...) what each unit's channel (feature) of ``a`` adds to ``module``'s output, bias excluded."""
    m = len(units)
    if isinstance(module, nn.Conv2d):
        w = module.weight[:, units]  # (O, m, kh, kw)
        o = w.shape[0]
        wg = w.transpose(0, 1).reshape(m * o, 1, *w.shape[2:])
        out = F.conv2d(a[:, units], wg, None, module.stride, module.padding, module.dilation, groups=m)
        return out.view(len(a), m, o, *out.shape[2:]).transpose(0, 1)
    w = module.weight  # Linear (O, C * hw): a is (B, C) or (B, C, h, w) flattened channel by channel
    feats = a.flatten(2) if a.ndim > 2 else a.unsqueeze(2)  # (B, C, hw)
    wv = w.view(w.shape[0], feats.shape[1], feats.shape[2])  # (O, C, hw)
    return torch.einsum("bmk,omk->mbo", feats[:, units], wv[:, units])


def _ablate_bypassed(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    name: str,
    units: torch.Tensor,
    per_chunk: int,
    sums: dict[str, _Sums],
) -> None:
    """One batch of a node that a path goes around: the inputs are copied (copy 0 unablated) and the node zeroed."""
    b = len(x)
    base = active = None
    for c0 in range(0, max(1, len(units)), per_chunk):
        chunk = units[c0 : c0 + per_chunk]
        seen: dict[str, torch.Tensor] = {}
        logits = _ablate_inputs(model, x, name, chunk, base=base is None, seen=seen).float()
        k = logits.shape[1]
        _check_labels(y, k)
        logits = logits.view(-1, b, k)
        if base is None:
            base, logits, act = logits[0], logits[1:], seen["act"]
            s = sums.setdefault(name, _Sums(len(units), k))
            _add_base(s, base, y, act[:, units.to(act.device)])
            active = act.flatten(2).ne(0).any(2) if act.ndim > 2 else act.ne(0)
        if len(chunk):
            _add_copies(sums[name], logits, base, y, chunk, active, c0)


def _add_base(s: _Sums, base: torch.Tensor, y: torch.Tensor, acts: torch.Tensor) -> None:
    k = base.shape[1]
    yd = y.to(base.device)
    s.base_correct += torch.bincount(y, weights=(base.argmax(1) == yd).double().cpu(), minlength=k)
    s.base_logit += torch.bincount(y, weights=base.gather(1, yd.view(-1, 1)).squeeze(1).double().cpu(), minlength=k)
    s.counts += torch.bincount(y, minlength=k).double()
    hits, count = firing_sums(acts)
    s.fire_hits += hits
    s.fire_count += count


def _layout(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor stored that way (SmallCNN's maps), else the standard layout."""
    if t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _ablate_inputs(
    model: nn.Module, x: torch.Tensor, name: str, units: torch.Tensor, base: bool, seen: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Logits ((base + m) * B, K) of ``x`` copied base + m times, with, in copy ``base + j``, unit ``units[j]`` of
    ``name`` zeroed (copy 0, with ``base``, keeps every unit; its node output lands in ``seen["act"]``)."""
    m, first = len(units), int(base)
    copies = m + first
    rows = torch.arange(first, copies)

    def zero(t: torch.Tensor, inplace: bool) -> torch.Tensor:
        out = t if inplace else t.clone(memory_format=_layout(t))
        view = out.view(copies, -1, *t.shape[1:])
        if base:
            seen["act"] = view[0].detach().clone()
        view[rows.to(t.device), :, units.to(t.device)] = 0
        return out

    with intervene(model, {name: zero}):
        return model(x.repeat(copies, *([1] * (x.ndim - 1))))


def _finish(name: str, units: torch.Tensor, s: _Sums, images: int) -> UnitImportance:
    counts = s.counts
    has = counts > 0
    per = counts.clamp(min=1)
    base_class_acc = torch.where(has, s.base_correct / per, torch.nan)
    class_acc = torch.where(has, s.correct / per, torch.nan)
    class_logit_drop = torch.where(has, (s.base_logit - s.logit) / per, torch.nan)
    base_acc = float(s.base_correct.sum() / images)
    return UnitImportance(
        node=name,
        units=units.clone(),
        images=images,
        class_counts=counts.long(),
        base_accuracy=base_acc,
        base_class_accuracy=base_class_acc,
        acc_drop=base_acc - s.correct.sum(1) / images,
        logit_drop=(s.base_logit.sum() - s.logit.sum(1)) / images,
        class_acc_drop=base_class_acc - class_acc,
        class_logit_drop=class_logit_drop,
        firing=s.fire_hits / max(1, s.fire_count),
    )


# -- who matters --------------------------------------------------------------------------------------------------
@dataclass
class UnitRoles:
    """Units called out in one layer (positions in ``UnitImportance.units``)."""

    busy_idle: torch.Tensor  #: (U,) bool: fires a lot but does not matter
    rare_vital: torch.Tensor  #: (U,) bool: rarely fires but matters (for the probe or for one class)


def classify(
    imp: UnitImportance,
    idle_share: float = 0.05,
    vital_share: float = 0.25,
    rare_share: float = 0.5,
) -> UnitRoles:
    """Within one layer, with ``peak = UnitImportance.peak_drop()`` and the layer's median firing rate ``f50``:

    - *fires a lot but does not matter*: firing >= f50 and peak <= ``idle_share`` x the layer's largest peak;
    - *rarely fires but matters*: 0 < firing <= ``rare_share`` x f50 and peak >= ``vital_share`` x the largest peak.

    A layer whose largest peak is <= 0 (no unit matters) calls every firing unit at or above f50 idle.
    """
    peak = imp.peak_drop()
    top = float(peak.max()) if len(peak) else 0.0
    f50 = float(imp.firing.median()) if len(imp.firing) else 0.0
    scale = max(top, 0.0)
    busy = imp.firing >= f50
    idle = peak <= idle_share * scale
    rare = (imp.firing > 0) & (imp.firing <= rare_share * f50)
    vital = (peak >= vital_share * scale) & (peak > 0)
    return UnitRoles(busy_idle=busy & idle & (imp.firing > 0), rare_vital=rare & vital)
