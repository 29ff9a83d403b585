"""The probe images that excite each unit most: a bounded running top-k, streamed over the probe (no Lightning).

``search_patches`` is the one search the top-patches picture and the atlas share: it streams probe images through
the model, keeps per node and channel the ``k`` strongest (activation, image, position), one position per image, and
records the receptive fields of the pass that saw each image. Each batch is traced while its maps are captured (one
pass): a network whose path depends on the data gets each batch's own geometry, so a patch is always cut by the field
of the pass that produced its activation. ``search_vectors`` does the same for (N, F) nodes (a unit's "patch" is the
whole image). ``crop_sources`` gives the images the boxes refer to. ``centre_pad`` puts crops of different sizes (fields
that differ between batches) on one canvas without resizing them, so that no patch is shown at a wrong scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from cnnfeat.graph import Graph, activation_after, capture, device_of, trace_graph
from cnnfeat.probe import ProbeSet, batches, fitting_batch
from cnnfeat.receptive_field import ReceptiveField, graph_receptive_fields
from cnnfeat.units import SpreadAccumulator, nonfinite_rows

__all__ = ["PatchSearch", "TopK", "centre_pad", "crop_sources", "ranked_at", "search_patches", "search_vectors"]


@dataclass
class TopK:
    """Running top-k per channel: activation ``values``, image ``ids`` and flat ``positions``, each (k, C)."""

    values: torch.Tensor
    ids: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def empty(cls, k: int, channels: int, device: torch.device) -> TopK:
        return cls(
            torch.full((k, channels), -torch.inf, device=device),
            torch.full((k, channels), -1, dtype=torch.long, device=device),
            torch.zeros((k, channels), dtype=torch.long, device=device),
        )

    def update(self, values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Merge candidates (N, C) into the running top-k (memory stays O(k * C))."""
        k = len(self.values)
        v = torch.cat([self.values, values])
        i = torch.cat([self.ids, ids])
        p = torch.cat([self.positions, positions])
        top_v, order = v.topk(min(k, len(v)), dim=0)
        self.values, self.ids, self.positions = top_v, i.gather(0, order), p.gather(0, order)

    def update_from_maps(self, maps: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        """Each image (row of ``maps``: (B, C, h, w) or (B, C)) contributes its strongest position per channel (so
        top-k are k different images); a NaN never wins. Returns those per-image maxima (B, C)."""
        flat = (maps.flatten(2) if maps.ndim > 2 else maps.unsqueeze(2)).float()
        best, pos = flat.max(dim=2)  # (B, C); NaN and +inf propagate into it, -inf can tie with the lowest finite
        if not torch.isfinite(best).all() or (best == torch.finfo(best.dtype).min).any():
            # NaN never wins; +inf and -inf count as the largest and the lowest finite value (ties go to the first)
            best, pos = flat.nan_to_num(nan=-torch.inf).max(dim=2)
        ids = image_ids.to(maps.device).unsqueeze(1).expand_as(best)
        self.update(best, ids, pos)
        return best


@dataclass
class PatchSearch:
    """The result of ``search_patches``: top-k per node, the fields each image's pass had, non-finite counts."""

    tops: dict[str, TopK]
    #: image ID -> node -> receptive field in the pass that saw the image
    fields: dict[int, dict[str, ReceptiveField]] = field(default_factory=dict)
    #: per node, probe images whose map held NaN or infinity (such a node's winners would be chosen by NaN)
    nonfinite: dict[str, int] = field(default_factory=dict)
    #: per node, each channel's variability over the searched images (``cnnfeat.units.SpreadAccumulator``)
    spread: dict[str, torch.Tensor] = field(default_factory=dict)
    #: per node, the node whose values ranked its units (``ranked_at``)
    ranked_at: dict[str, str] = field(default_factory=dict)

    def field(self, image_id: int, name: str) -> ReceptiveField:
        """The receptive field of ``name``'s units in the pass that saw image ``image_id``."""
        return self.fields[image_id][name]


def ranked_at(graph: Graph, name: str) -> str:
    """The node whose values rank ``name``'s units: for a Conv2d or Linear with ops between it and its activation (a
    BatchNorm with a negative scale would otherwise rank first the windows where the unit is off), the activation
    module, or, for a functional activation (``F.relu``), the module just before it (the BatchNorm: the same order);
    else ``name`` itself. All have the layer's receptive field, and a module can be optimised (featviz)."""
    node, nodes = graph[name], graph.nodes
    if node.kind != "module" or node.alias or not isinstance(node.module, (nn.Conv2d, nn.Linear)):
        return node.name
    act, _ = activation_after(graph, node.name)
    if act is None or nodes[act].parents == (node.name,):
        return node.name
    if nodes[act].kind == "module" and not nodes[act].alias:
        return act
    before = nodes[act].parents
    if len(before) == 1 and before[0] != node.name and nodes[before[0]].kind == "module" and not nodes[before[0]].alias:
        return before[0]
    return node.name


def search_patches(
    model: nn.Module, probe: ProbeSet, layers: Sequence[str], k: int, n: int, batch_size: int, image_bytes: int = 0
) -> PatchSearch:
    """Stream the first ``n`` probe images through ``model`` (under ``no_grad`` and the mode you want) and keep the
    top-``k`` per channel of each spatial node in ``layers`` (see the module docstring), and each channel's variability
    (``cnnfeat.units.SpreadAccumulator``, from the same per-image maxima). A conv followed by a BatchNorm (or any op)
    before its activation is ranked by the activation's values (``ranked_at``). Each batch is traced whole: with
    ``image_bytes`` (one image's values at every node, ``LayerPlan.image_bytes()``) batches are cut to the capture
    budget (``cnnfeat.probe.fitting_batch``)."""
    device, batch_size = device_of(model), fitting_batch(batch_size, image_bytes)
    result = PatchSearch({}, {}, dict.fromkeys(layers, 0))
    spread = {name: SpreadAccumulator() for name in layers}
    first = trace_graph(model, probe.inputs[:1].to(device))
    result.ranked_at = {name: ranked_at(first, name) for name in layers}
    with capture(model, list(dict.fromkeys(result.ranked_at.values()))) as out:
        for positions in batches(torch.arange(n), batch_size):
            graph = trace_graph(model, probe.inputs[positions].to(device))  # the maps land in `out` too
            fields = graph_receptive_fields(graph, layers)
            result.fields.update(dict.fromkeys(probe.ids[positions].tolist(), fields))
            for name in layers:
                maps = out[result.ranked_at[name]]
                if name not in result.tops:
                    result.tops[name] = TopK.empty(k, maps.shape[1], maps.device)
                spread[name].update_max(result.tops[name].update_from_maps(maps, probe.ids[positions]))
                result.nonfinite[name] += int(nonfinite_rows(maps).sum())
    result.spread = {name: acc.finish() for name, acc in spread.items()}
    return result


def search_vectors(
    model: nn.Module, probe: ProbeSet, layers: Sequence[str], k: int, n: int, batch_size: int
) -> dict[str, TopK]:
    """Top-``k`` probe images per unit of (N, F) nodes over the first ``n`` probe images (positions are 0); a Linear
    layer with a BatchNorm (or any op) before its activation is ranked at ``ranked_at``'s node, as convs are."""
    device, found = device_of(model), {}
    first = trace_graph(model, probe.inputs[:1].to(device))
    at = {name: ranked_at(first, name) for name in layers}
    with capture(model, list(dict.fromkeys(at.values()))) as acts:
        for ids in batches(torch.arange(n), batch_size):
            model(probe.inputs[ids].to(device))
            for name in layers:
                a = acts[at[name]].float()
                if name not in found:
                    found[name] = TopK.empty(k, a.shape[1], a.device)
                found[name].update(
                    a, probe.ids[ids].to(a.device).unsqueeze(1).expand_as(a), a.new_zeros(a.shape, dtype=torch.long)
                )
    return found


def crop_sources(model: nn.Module, probe: ProbeSet, ids: Sequence[int], frame: str | None) -> torch.Tensor:
    """The images boxes of probe ``ids`` refer to: the display images, or the output of the input transform node
    ``frame`` inside the model (a resize), in the order of ``ids``."""
    positions = probe.positions(list(ids))
    if frame is None:
        return probe.images[positions]
    with capture(model, [frame]) as out:
        model(probe.inputs[positions].to(device_of(model)))
    return out[frame].cpu()


def centre_pad(cells: Sequence[torch.Tensor]) -> torch.Tensor:
    """Crops (C, h, w) of possibly different sizes -> (N, C, s, s), s = the largest side of any crop: each crop is
    placed unchanged on a zero canvas, centred (top offset ``(s - h) // 2``, left ``(s - w) // 2``), never resized."""
    side = max(max(c.shape[-2:]) for c in cells)
    out = cells[0].new_zeros(len(cells), cells[0].shape[0], side, side)
    for i, c in enumerate(cells):
        h, w = c.shape[-2:]
        top, left = (side - h) // 2, (side - w) // 2
        out[i, :, top : top + h, left : left + w] = c
    return out
