"""Reference images per unit by relevance beside activation, and whether a unit's optimised input is trustworthy.

Core module (no Lightning; tensors in, tensors out).

**Relevance maximisation** (Achtibat et al. 2023): a unit's reference images are the probe images where it
contributes most to the decision, not where it fires most. ``references`` streams the probe once (a forward and a
backward pass per batch) and keeps, per unit of each node, the top-k images by relevance for the predicted class
(``cnnfeat.attribution.unit_relevance``: activation x gradient at each position; each image counts once, at its most
relevant position) beside the top-k by activation (each image at its strongest position: what the atlas shows),
each with the position to cut its receptive field at (``boxes``). ``overlap`` says how many images the two sets
share. ``reference_heatmaps`` gives each reference image's conditional heatmap for its unit.

**Trust in optimised inputs** (Geirhos et al., ICML 2024: feature visualisations can be processed along other paths
than natural images). ``path_check`` compares the *activation path* an optimised input causes below a unit with the
paths of the unit's top real images: for each lower node, the activations of every unit that feeds the unit (the
window of the lower map inside the unit's receptive field; the whole map or vector for a fully connected unit),
flattened; paths are compared by Spearman rank correlation per lower node, averaged over the nodes. A unit is flagged
when its optimised input's path is no closer to its top real images' paths than arbitrary probe images' paths are
(at the same positions): its picture does not show how real images excite it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cnnfeat.attribution import device_of, evaluating, intervene, unit_relevance
from cnnfeat.errors import ConfigError
from cnnfeat.graph import INPUT, Graph
from cnnfeat.receptive_field import ReceptiveField, graph_receptive_fields
from cnnfeat.topk import TopK

#: values of arbitrary-image paths ``path_check`` holds at once (128 MB float64)
MAX_PATH_VALUES = 2**24


# -- running top-k ---------------------------------------------------------------------------------------------------
def real_references(top: TopK) -> torch.Tensor:
    """(k, U) bool: which of the top-k entries are references, a probe image with a positive value; an image where the
    unit is zero (it does not fire, or contributes nothing) is no reference, however a tie ranked it."""
    return (top.ids >= 0).cpu() & (top.values.cpu() > 0)


def overlap(a: TopK, b: TopK) -> torch.Tensor:
    """(U,) share of ``a``'s references (:func:`real_references`) that are among ``b``'s for the same unit; NaN for a
    unit without references in ``a`` or in ``b`` (it never fires on the probe, or is never relevant): an overlap of
    tie-broken zeros would be a number about nothing."""
    ra, rb = real_references(a), real_references(b)
    ia, ib = a.ids.cpu(), b.ids.cpu().masked_fill(~rb, -2)  # -2: never an image ID
    shared = ((ia.unsqueeze(1) == ib.unsqueeze(0)) & ra.unsqueeze(1)).any(dim=1).sum(dim=0)
    n = ra.sum(dim=0)
    out = shared.double() / n.clamp(min=1)
    return out.masked_fill((n == 0) | (rb.sum(dim=0) == 0), float("nan"))


@dataclass
class References:
    """One node's reference images: top-k by relevance for the predicted class and by activation."""

    node: str
    by_relevance: TopK
    by_activation: TopK
    shape: tuple[int, ...]  #: the node's output for one image: (C, h, w) or (F,)

    def overlap(self) -> torch.Tensor:
        """(U,) share of the relevance references that are activation references too (NaN: see :func:`overlap`)."""
        return overlap(self.by_relevance, self.by_activation)

    def rows_cols(self, top: TopK) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, U) row and column of each reference in the node's map (0, 0 for a (N, F) node)."""
        width = self.shape[2] if len(self.shape) == 3 else 1
        return top.positions // width, top.positions % width


def references(
    model: nn.Module,
    inputs: torch.Tensor,
    nodes: Sequence[str],
    k: int = 8,
    ids: torch.Tensor | None = None,
    batch_size: int = 256,
) -> dict[str, References]:
    """Stream ``inputs`` (N, ...) through the model in batches and return, per node, the top-``k`` images of every
    unit by relevance for each image's predicted class and by activation (module docstring). ``ids`` name the rows
    (default 0..N-1). One forward and one backward pass per batch, for all nodes."""
    if k < 1 or batch_size < 1:
        raise ConfigError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
    ids = torch.arange(len(inputs)) if ids is None else torch.as_tensor(ids).long()
    if len(ids) != len(inputs):
        raise ConfigError(f"references: {len(ids)} ids for {len(inputs)} inputs")
    nodes = list(dict.fromkeys(nodes))
    out: dict[str, References] = {}
    for start in range(0, len(inputs), batch_size):
        rel, acts, _ = unit_relevance(model, inputs[start : start + batch_size], nodes)
        b_ids = ids[start : start + batch_size]
        for n in nodes:
            if n not in out:
                units, device = acts[n].shape[1], acts[n].device
                out[n] = References(
                    n, TopK.empty(k, units, device), TopK.empty(k, units, device), tuple(acts[n].shape[1:])
                )
            out[n].by_relevance.update_from_maps(rel[n], b_ids)
            out[n].by_activation.update_from_maps(acts[n], b_ids)
    for r in out.values():
        for top in (r.by_relevance, r.by_activation):
            top.values, top.ids, top.positions = top.values.cpu(), top.ids.cpu(), top.positions.cpu()
    return out


def boxes(refs: References, top: TopK, field: ReceptiveField) -> torch.Tensor:
    """(k, U, 4) input box (top, left, bottom, right; inclusive) of each reference, as ``cnnfeat.receptive_field``
    cuts the atlas's patches; a (N, F) node has no field: use whole images."""
    if len(refs.shape) != 3:
        raise ConfigError(f"{refs.node!r} has no spatial map, so its references have no receptive field: use images")
    rows, cols = refs.rows_cols(top)
    out = torch.tensor([field.box(int(r), int(c)) for r, c in zip(rows.flatten(), cols.flatten(), strict=True)])
    return out.view(*rows.shape, 4)


def reference_heatmaps(
    model: nn.Module,
    inputs: torch.Tensor,
    refs: References,
    top: TopK,
    ids: torch.Tensor | None = None,
    baselines: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """(k, U, ...) the conditional heatmap (``cnnfeat.attribution.conditional_heatmaps``, predicted class) of each
    reference image of ``top`` for its unit; zeros where a unit has fewer than k references. ``inputs``/``ids``: the
    rows the references were drawn from (as given to ``references``); ``baselines``: the input the heatmap is measured
    from (one input (1, ...) or a number; e.g. ``cnnfeat.atlas.black_input`` for normalised inputs)."""
    from cnnfeat.attribution import conditional_heatmaps

    ids = torch.arange(len(inputs)) if ids is None else torch.as_tensor(ids).long()
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    k, units = top.ids.shape
    valid = top.ids >= 0
    flat_ids = top.ids[valid]
    unit_idx = torch.arange(units).expand(k, units)[valid]
    out = torch.zeros(k, units, *inputs.shape[1:])
    if len(flat_ids):
        rows = torch.tensor([row_of[int(i)] for i in flat_ids])
        out[valid] = conditional_heatmaps(model, inputs[rows], refs.node, unit_idx, baselines=baselines)
    return out


# -- trust in optimised inputs -----------------------------------------------------------------------------------------
def _window(field: ReceptiveField, lower: ReceptiveField) -> tuple[tuple[int, int], tuple[float, float]]:
    """Size of the window of ``lower``'s map that feeds one unit of ``field``'s map, and the lower map index of the
    centre of unit (0, 0), per axis."""
    size, centre = [], []
    for a in (0, 1):
        size.append(max(1, round((field.size[a] - lower.size[a]) / lower.jump[a]) + 1))
        centre.append((field.start[a] - lower.start[a]) / lower.jump[a])
    return (size[0], size[1]), (centre[0], centre[1])


def _gather_windows(maps: torch.Tensor, rows: torch.Tensor, tops: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(len(rows), C*h*w): the window of ``size`` of ``maps[rows[i]]`` (N, C, H, W) with top-left corner ``tops[i]``,
    zero outside the map."""
    c = maps.shape[1]
    ph, pw = size
    pad = torch.nn.functional.pad(maps, (pw, pw, ph, ph))
    r = tops[:, 0:1] + ph + torch.arange(ph)  # (M, ph), inside the padded map
    q = tops[:, 1:2] + pw + torch.arange(pw)
    r = r.clamp(0, pad.shape[2] - 1)
    q = q.clamp(0, pad.shape[3] - 1)
    out = pad[rows[:, None, None, None], torch.arange(c)[None, :, None, None], r[:, None, :, None], q[:, None, None, :]]
    return out.flatten(1)


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks (0-based, float64) of ``x`` (N, D), ties given their average rank (``scipy.stats.rankdata``
    minus 1)."""
    s, order = x.sort(dim=1)
    n, d = s.shape
    idx = torch.arange(d, device=x.device).expand(n, d)
    starts = torch.ones_like(s, dtype=torch.bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    last = torch.where(ends, idx, torch.full_like(idx, d)).flip(1).cummin(dim=1).values.flip(1)
    out = torch.empty(n, d, dtype=torch.float64, device=x.device)
    out.scatter_(1, order, (first + last).double() / 2)
    return out


def unit_ranks(x: torch.Tensor) -> torch.Tensor:
    """Row-wise ranks, centred and scaled to unit length (a constant row stays 0): Spearman's rank correlation of two
    rows is the dot product of theirs."""
    r = ranks(x)
    r = r - r.mean(1, keepdim=True)
    n = r.norm(dim=1, keepdim=True)
    return torch.where(n > 0, r / n.clamp(min=1e-300), torch.zeros_like(r))


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of rows of ``a`` and ``b`` (N, D) -> (N,); 0 where a row is constant."""
    return (unit_ranks(a) * unit_ranks(b)).sum(1)


def lower_nodes(graph: Graph, node: str, include_input: bool = True) -> list[str]:
    """The activation path below ``node``: the input (with ``include_input``), then every ReLU-family or other
    activation node that runs before ``node`` (``cnnfeat.graph.is_activation``)."""
    from cnnfeat.graph import is_activation

    order = [n.name for n in graph]
    i = order.index(graph[node].name)
    out = [INPUT] if include_input else []
    return out + [n.name for n in list(graph)[:i] if is_activation(n) and n.depends_on_input]


@dataclass
class PathCheck:
    """How an optimised input travels to its unit compared with the unit's top real images (module docstring)."""

    node: str
    units: torch.Tensor  #: (U,)
    lower: list[str]  #: the nodes of the path (``"input"``: the pixels)
    optimised: torch.Tensor  #: (U,) mean Spearman similarity of the optimised input's path to the real top images'
    real: torch.Tensor  #: (U,) mean similarity among the real top images' paths (pairs), for scale
    arbitrary: torch.Tensor  #: (U,) mean similarity of arbitrary probe images' paths to the real top images'
    per_node: torch.Tensor  #: (U, len(lower)) the optimised input's similarity per lower node
    flagged: torch.Tensor  #: (U,) bool: optimised <= arbitrary


def _maps(model: nn.Module, x: torch.Tensor, lower: Sequence[str]) -> dict[str, torch.Tensor]:
    """The outputs of the ``lower`` nodes for inputs ``x`` (``"input"``: ``x`` itself), float on the CPU."""
    taps: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def edit(t: torch.Tensor, inplace: bool) -> torch.Tensor:
            taps[name] = t.detach().float().cpu()
            return t

        return edit

    wanted = [n for n in lower if n != INPUT]
    with evaluating(model), torch.no_grad(), intervene(model, {n: keep(n) for n in wanted}):
        model(x.to(device_of(model)))
    return {n: x.detach().float().cpu() if n == INPUT else taps[n] for n in lower}


def _vectors(
    maps: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    target: ReceptiveField | None,
    lower: ReceptiveField,
) -> torch.Tensor:
    """(len(rows), D): for image ``rows[i]``, the part of ``maps`` that feeds the target unit at ``positions[i]``."""
    if maps.ndim == 2 or target is None:  # fully connected on either side: everything below feeds it
        return maps[rows].flatten(1)
    size, centre = _window(target, lower)
    tops = []
    for a in (0, 1):
        c = centre[a] + positions[:, a].double() * (target.jump[a] / lower.jump[a])
        tops.append(torch.round(c - (size[a] - 1) / 2).long())
    return _gather_windows(maps, rows, torch.stack(tops, dim=1), size)


def path_check(
    model: nn.Module,
    graph: Graph,
    node: str,
    units: Sequence[int] | torch.Tensor,
    optimised: torch.Tensor,
    optimised_positions: torch.Tensor,
    real: torch.Tensor,
    real_positions: torch.Tensor,
    arbitrary: torch.Tensor,
    lower: Sequence[str] | None = None,
) -> PathCheck:
    """Compare, per unit ``units[i]`` of ``node``, the path of its optimised input ``optimised[i]`` (model input
    space, read at ``optimised_positions[i]`` = (row, col) of the node's map) with the paths of its top real images
    ``real[i]`` (k, ...) at ``real_positions[i]`` (k, 2), and with those of the ``arbitrary`` probe images (R, ...)
    read at the same positions as the real ones. ``lower``: the path's nodes (default ``lower_nodes``). For a
    (N, F) node positions are ignored."""
    units = torch.as_tensor(units, dtype=torch.long).flatten()
    n_units = len(units)
    k = real.shape[1] if real.ndim > 1 else 0
    if not (len(optimised) == len(optimised_positions) == len(real) == len(real_positions) == n_units) or k < 2:
        raise ConfigError(
            "path_check needs, per unit, one optimised input and position and k >= 2 real images with positions; "
            f"got {n_units} units, {len(optimised)} optimised, {len(optimised_positions)} positions, "
            f"real {tuple(real.shape)}"
        )
    if len(arbitrary) == 0:
        raise ConfigError("path_check needs arbitrary probe images to compare with")
    lower = lower_nodes(graph, node) if lower is None else list(lower)
    if not lower:
        raise ConfigError(f"no nodes below {node!r} to compare paths at")
    spatial = [n for n in dict.fromkeys([node, *lower]) if n != INPUT and len(graph[n].output_shape) == 4]
    fields = graph_receptive_fields(graph, spatial) if spatial else {}
    shape = graph.nodes[INPUT].output_shape
    fields[INPUT] = ReceptiveField((1, 1), (1, 1), (0.0, 0.0), tuple(shape[2:4]) if len(shape) == 4 else (1, 1))
    for name, f in fields.items():
        if f.frame is not None:
            raise ConfigError(f"path_check: {name!r} is measured in the frame of {f.frame!r}, not the model's input")
    target = fields.get(node)
    r = len(arbitrary)
    m_opt = _maps(model, optimised, lower)
    m_real = _maps(model, real.flatten(0, 1), lower)
    m_arb = _maps(model, arbitrary, lower)
    pos_opt, pos_real = optimised_positions.long().cpu(), real_positions.long().cpu().flatten(0, 1)  # (U, 2), (U*k, 2)
    per_node, real_sims, arb_sims = [], [], []
    ii, jj = torch.triu_indices(k, k, 1)
    for name in lower:
        f = fields.get(name, fields[INPUT])
        z_real = unit_ranks(_vectors(m_real[name], torch.arange(n_units * k), pos_real, target, f))
        z_real = z_real.view(n_units, k, -1)
        z_opt = unit_ranks(_vectors(m_opt[name], torch.arange(n_units), pos_opt, target, f))
        per_node.append((z_opt.unsqueeze(1) * z_real).sum(2))  # (U, k)
        real_sims.append((z_real[:, ii] * z_real[:, jj]).sum(2).mean(1))
        # arbitrary image a read where real image j of unit i excites it, compared with that real image's path
        if target is None or m_arb[name].ndim == 2:  # the whole map feeds the unit: one path per arbitrary image
            z_arb = unit_ranks(_vectors(m_arb[name], torch.arange(r), pos_opt[:1].expand(r, 2), target, f))
            arb_sims.append(torch.einsum("ukd,rd->ukr", z_real, z_arb).mean(dim=(1, 2)))
            continue
        step = max(1, MAX_PATH_VALUES // max(1, k * r * z_real.shape[2]))  # units per chunk: bounded memory
        sims = []
        for u0 in range(0, n_units, step):
            zr = z_real[u0 : u0 + step]
            pos = pos_real.view(n_units, k, 2)[u0 : u0 + step].flatten(0, 1)
            rows = torch.arange(r).repeat(len(pos))
            z_arb = unit_ranks(_vectors(m_arb[name], rows, pos.repeat_interleave(r, 0), target, f))
            sims.append((z_arb.view(len(zr), k, r, -1) * zr.unsqueeze(2)).sum(3).mean(dim=(1, 2)))
        arb_sims.append(torch.cat(sims))
    opt = torch.stack([p.mean(1) for p in per_node], 1)
    optimised_sim, arbitrary_sim = opt.mean(1), torch.stack(arb_sims, 1).mean(1)
    return PathCheck(
        node=node,
        units=units,
        lower=lower,
        optimised=optimised_sim,
        real=torch.stack(real_sims, 1).mean(1),
        arbitrary=arbitrary_sim,
        per_node=opt,
        flagged=optimised_sim <= arbitrary_sim,
    )
