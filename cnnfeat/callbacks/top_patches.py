"""Maximally activating image patches per channel, cropped by the unit's receptive field."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnnfeat import viz
from cnnfeat.callbacks.base import (
    CallbackOptions,
    Pictures,
    VisualizationCallback,
    check_indices,
    check_names,
    device_of,
    nonfinite_rows,
)
from cnnfeat.callbacks.feature_maps import check_channels
from cnnfeat.errors import ConfigError, check_int
from cnnfeat.graph import capture, trace_graph
from cnnfeat.probe import MAX_IMAGES, ProbeSet, batches
from cnnfeat.receptive_field import ReceptiveField, crop, graph_receptive_fields


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

    def update_from_maps(self, maps: torch.Tensor, image_ids: torch.Tensor) -> None:
        """Each image contributes its strongest position per channel (so top-k are k different images)."""
        best, pos = maps.flatten(2).max(dim=2)  # (B, C)
        ids = image_ids.to(maps.device).unsqueeze(1).expand_as(best)
        self.update(best.float(), ids, pos)


def check_top_k(name: str, k: Any) -> None:
    """A count of top activations per unit: an integer >= 1 that a probe can fill (at most ``MAX_IMAGES``)."""
    check_int(name, k)
    if k > MAX_IMAGES:
        raise ConfigError(f"{name}={k} is more than a probe holds ({MAX_IMAGES} images)")


class TopPatchesCallback(VisualizationCallback):
    """Logs, per node, a grid of the image patches that activate each channel most (``top_patches/<node>``).

    Streams the probe (default: all its images) in batches, keeping a running top-k per channel of
    (activation, image, position) — one position per image, so the k patches come from k images. Each winning
    unit's patch is its receptive field, derived from the graph (``cnnfeat.receptive_field``: convs, pooling
    (module or functional), padding, residual adds, concatenation, adaptive pooling), cut from the probe's
    display image and zero-padded where it reaches past the border. ``layers`` are any node names whose output
    is a spatial map (``conv3``, ``layer2.0.relu:1``, ``inception3a.cat``, ``max_pool2d``); a node whose
    geometry cannot be derived is refused in ``setup``, before training, by an error naming the node that
    prevents it. Each winner's box comes from the graph of the very forward pass that produced its activation
    (recorded in the same pass), so a network whose path depends on the data (a branch on the batch's
    brightness) gets each batch's geometry. Boxes in the frame of an input transform inside the model (a resize)
    are cut from that transform's output. Rows: channels (the first ``max_channels``, or ``channels``);
    columns: rank 1..k. A node whose maps hold NaN or infinity for any probe image is not drawn (a warning names it):
    its winners would be chosen by NaN.
    ``last_boxes`` keeps the boxes of the last render: ``{node: [(channel, rank, image_id, (row, col), box)]}``.
    """

    def __init__(
        self,
        layers: Sequence[str] = ("conv1", "conv2", "conv3"),
        top_k: int = 8,
        channels: Sequence[int] | None = None,
        max_channels: int = 16,
        split: str = "test",
        probe_size: int | None = None,
        batch_size: int = 256,
        min_cell: int = 40,
        max_cell: int = 96,
        every_n_epochs: int = 5,
        log_untrained: bool = True,
        save_png: bool = False,
        during_training: bool = True,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            CallbackOptions(
                every_n_epochs=every_n_epochs,
                log_untrained=log_untrained,
                save_png=save_png,
                during_training=during_training,
                split=split,
                mean=mean,
                std=std,
                class_names=class_names,
            )
        )
        check_top_k("top_k", top_k)
        for name, value in (("max_channels", max_channels), ("batch_size", batch_size), ("min_cell", min_cell)):
            check_int(name, value)
        check_int("probe_size", probe_size, allow_none=True)
        check_int("max_cell", max_cell)
        if max_cell < min_cell:
            raise ConfigError(f"max_cell ({max_cell}) must be >= min_cell ({min_cell})")
        self.layers, self.top_k = check_names("layers", layers), top_k
        self.channels = check_indices("channels", channels, allow_none=True, nonnegative=False)  # range: in check
        self.max_channels, self.probe_size = max_channels, probe_size
        self.batch_size, self.min_cell, self.max_cell = batch_size, min_cell, max_cell
        self.last_boxes: dict[str, list[tuple[int, int, int, tuple[int, int], tuple[int, int, int, int]]]] = {}
        self._fields: dict[int, dict[str, ReceptiveField]] = {}  # image ID -> fields of the pass that saw it
        #: per node, probe images whose map held NaN or infinity in the last ``collect`` (such a node is not drawn)
        self.nonfinite: dict[str, int] = {}

    def _channels(self, n: int) -> list[int]:
        return self.channels if self.channels is not None else list(range(min(n, self.max_channels)))

    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        assert probe is not None
        probe.check_size(self.probe_size)
        graph = trace_graph(pl_module, probe.inputs[:1].to(device_of(pl_module)))
        graph_receptive_fields(graph, self.layers)  # unknown names, or no geometry: an error naming the node
        for name in self.layers:
            check_channels(self.channels, name, graph[name].output_shape[1])

    def collect(self, pl_module: nn.Module, probe: ProbeSet) -> dict[str, TopK]:
        """Stream the probe through the model and return the top-k per node (image IDs are the probe's).

        Each batch's forward pass is traced while the maps are captured (one pass), and every image's receptive
        fields are those of its batch's graph (``field``).
        """
        n, device = probe.check_size(self.probe_size), device_of(pl_module)
        tops: dict[str, TopK] = {}
        self._fields = {}
        self.nonfinite = dict.fromkeys(self.layers, 0)
        with capture(pl_module, self.layers) as out:
            for positions in batches(torch.arange(n), self.batch_size):
                graph = trace_graph(pl_module, probe.inputs[positions].to(device))  # the maps land in `out` too
                fields = graph_receptive_fields(graph, self.layers)
                self._fields.update(dict.fromkeys(probe.ids[positions].tolist(), fields))
                for name in self.layers:
                    maps = out[name]
                    if name not in tops:
                        tops[name] = TopK.empty(self.top_k, maps.shape[1], maps.device)
                    tops[name].update_from_maps(maps, probe.ids[positions])
                    self.nonfinite[name] += int(nonfinite_rows(maps).sum())
        return tops

    def _crop_sources(self, pl_module: nn.Module, probe: ProbeSet, positions: torch.Tensor, frame: str | None):
        """The images the boxes refer to: the display images, or the output of an input transform (a resize)."""
        if frame is None:
            return probe.images[positions]
        with capture(pl_module, [frame]) as out:
            pl_module(probe.inputs[positions].to(device_of(pl_module)))
        return out[frame].cpu()

    def field(self, image_id: int, name: str) -> ReceptiveField:
        """The receptive field of ``name``'s units in the pass that saw image ``image_id`` (after ``collect``)."""
        return self._fields[image_id][name]

    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        assert probe is not None
        tops = self.collect(pl_module, probe)
        pictures = Pictures()
        self.last_boxes = {}
        for name, top in tops.items():
            if self.nonfinite[name]:  # patches chosen by NaN activations would look like data
                n = probe.check_size(self.probe_size)
                self.skip_nonfinite(
                    name, "activations", self.nonfinite[name], n, "probe images", f"top_patches/{name}", step
                )
                continue
            chans = self._channels(top.values.shape[1])
            ids = top.ids[:, chans].cpu()
            by_frame: dict[str | None, list[int]] = {}
            for i in ids[ids >= 0].unique().tolist():
                by_frame.setdefault(self.field(i, name).frame, []).append(i)
            sources: dict[int, torch.Tensor] = {}
            for frame, frame_ids in by_frame.items():
                crops_from = self._crop_sources(pl_module, probe, probe.positions(frame_ids), frame)
                sources.update(zip(frame_ids, crops_from, strict=True))
            channels_in = next(iter(sources.values())).shape[0] if sources else 1
            cells, boxes = [], []
            for c_idx, c in enumerate(chans):
                for r in range(len(top.values)):
                    img_id, pos = int(ids[r, c_idx]), int(top.positions[r, c])
                    if img_id < 0:  # fewer probe images than k
                        cells.append(torch.zeros(channels_in, *next(iter(self._fields.values()))[name].size))
                        continue
                    rf = self.field(img_id, name)
                    unit = (pos // rf.output_shape[1], pos % rf.output_shape[1])
                    box = rf.box(*unit)
                    boxes.append((c, r, img_id, unit, box))
                    cells.append(crop(sources[img_id], box))
            self.last_boxes[name] = boxes
            side = max(cell.shape[-1] for cell in cells)
            if any(cell.shape[-2:] != (side, side) for cell in cells):  # fields differ between batches
                cells = [torch.nn.functional.interpolate(cell[None], size=(side, side))[0] for cell in cells]
            patches = torch.stack(cells).float()
            if patches.shape[-1] > self.max_cell:  # big receptive fields (AlexNet conv5: 163 px) are shrunk
                patches = torch.nn.functional.interpolate(patches, size=(self.max_cell, self.max_cell), mode="area")
            pictures.images[f"top_patches/{name}"] = viz.grid(
                viz.grey(patches), nrow=len(top.values), min_cell=self.min_cell
            )
        return pictures
