"""Maximally activating image patches per channel, cropped by the unit's receptive field."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from cnnfeat import tags, viz
from cnnfeat.callbacks.base import (
    CallbackOptions,
    Pictures,
    VisualizationCallback,
    check_indices,
    check_names,
)
from cnnfeat.callbacks.feature_maps import check_channels
from cnnfeat.errors import ConfigError, check_int
from cnnfeat.probe import MAX_IMAGES, ProbeSet
from cnnfeat.receptive_field import crop
from cnnfeat.topk import PatchSearch, TopK, centre_pad, crop_sources, search_patches
from cnnfeat.units import ALL, DEFAULT_UNITS, choose_units, dump_chosen, load_chosen, needs_spread

log = logging.getLogger("cnnfeat")

#: the lecture's convs; on a network without them, the first conv of each stage whose field is local
DEFAULT_LAYERS = ("conv1", "conv2", "conv3")


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
    are cut from that transform's output. Rows: channels; columns: rank 1..k. Channels: every channel of a node up
    to ``max_channels`` wide; of a wider one (ResNet-18's 64..512) the ``max_channels`` most *variable*: largest
    population standard deviation, across the probe images searched, of the channel's largest value in each image
    (the value that ranks its top patches; ``cnnfeat.units.SpreadAccumulator``), decided at the first render from
    that render's search and kept for every later render (and a resumed fit), so pictures compare across epochs.
    ``channels="all"`` shows every channel, a list shows those channels of every node; the log says which. A node
    whose maps hold NaN or infinity for any probe image is not drawn (a warning names it): its winners would be
    chosen by NaN.
    ``last_boxes`` keeps the boxes of the last render: ``{node: [(channel, rank, image_id, (row, col), box)]}``.
    """

    def __init__(
        self,
        layers: Sequence[str] = DEFAULT_LAYERS,
        top_k: int = 8,
        channels: Sequence[int] | str | None = None,
        max_channels: int = DEFAULT_UNITS,
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
        self._given_layers = None if self.layers is None else list(self.layers)  # for state_key: check rewrites layers
        if isinstance(channels, str) and channels != ALL:
            raise ConfigError(f"channels must be {ALL!r}, null or a list of channel indices, got {channels!r}")
        if channels == ALL:
            self.channels: list[int] | str | None = ALL
        else:  # range: in check
            self.channels = check_indices("channels", channels, allow_none=True, nonnegative=False)
        #: the channels chosen by variability per node (nodes wider than ``max_channels``), kept once decided
        self.chosen: dict[str, list[int]] = {}
        self._said = False
        self.max_channels, self.probe_size = max_channels, probe_size
        self.batch_size, self.min_cell, self.max_cell = batch_size, min_cell, max_cell
        self.last_boxes: dict[str, list[tuple[int, int, int, tuple[int, int], tuple[int, int, int, int]]]] = {}
        #: the last search (``cnnfeat.topk.search_patches``): top-k, each image's fields, non-finite counts
        self.search: PatchSearch | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(layers=self._given_layers, split=self.split, channels=self.channels)

    def _setting(self) -> int | str | list[int]:
        return self.max_channels if self.channels is None else self.channels

    def _channels(self, name: str, n: int, search: PatchSearch) -> list[int]:
        """The channels drawn for node ``name`` (``n`` wide): see the class docstring."""
        if not needs_spread(self._setting(), n):
            return choose_units(self._setting(), n, name)
        kept = self.chosen.get(name)  # chosen once; a resumed fit keeps its choice while it answers the setting
        if kept is None or any(u >= n for u in kept) or len(kept) != min(self.max_channels, n):
            self.chosen[name] = choose_units(self._setting(), n, name, search.spread[name])
        return self.chosen[name]

    def _say(self, widths: dict[str, int], searched: int) -> None:
        """One log line: which nodes, how many channels of each, how they were chosen."""
        if self._said:
            return
        self._said = True
        parts = []
        for name, n in widths.items():
            if needs_spread(self._setting(), n):
                got = self.chosen.get(name)  # none yet: the node was not drawn (NaN maps)
                parts.append(f"{name} {len(got)} of {n} {got}" if got is not None else f"{name} not chosen yet")
            else:
                parts.append(f"{name} {len(choose_units(self._setting(), n, name))} of {n}")
        how = (
            f"the listed channels {self.channels}"
            if isinstance(self.channels, list)
            else f"all channels of a node up to {self.max_channels} wide, else the {self.max_channels} most variable "
            f"(std over {searched} probe images of each channel's per-image max, chosen at the first render and kept)"
            if self.channels is None
            else "every channel"
        )
        log.info("%s: channels: %s; %s", type(self).__name__, ", ".join(parts), how)

    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        assert probe is not None
        probe.check_size(self.probe_size)
        self.layers = self.fit_default_layers(pl_module, self.layers, DEFAULT_LAYERS, local=True)
        plan = self.layer_plan(pl_module)
        plan.fields(self.layers)  # unknown names, or no geometry: an error naming the node
        widths = {name: plan[name].units for name in self.layers}
        for name in self.layers:
            if isinstance(self.channels, list):
                check_channels(self.channels, name, widths[name])
        if not any(needs_spread(self._setting(), n) or name in self.chosen for name, n in widths.items()):
            self._say(widths, probe.check_size(self.probe_size))  # nothing to decide at the first render

    def collect(self, pl_module: nn.Module, probe: ProbeSet, step: int | None = None) -> dict[str, TopK]:
        """Stream the probe through the model and return the top-k per node (image IDs are the probe's); the search,
        with each image's receptive fields, is kept as ``search`` (``cnnfeat.topk.search_patches``). At a ``step``
        the search is shared with the atlas when it searches the same images the same way (``patch_search``)."""
        n = probe.check_size(self.probe_size)
        if step is None:
            size = self.image_bytes(pl_module)
            self.search = search_patches(pl_module, probe, self.layers, self.top_k, n, self.batch_size, size)
        else:
            self.search = self.patch_search(pl_module, probe, step, self.layers, self.top_k, n, self.batch_size)
        return {name: self.search.tops[name] for name in self.layers}  # a shared search may hold more layers

    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        assert probe is not None
        tops = self.collect(pl_module, probe, step)
        pictures = Pictures()
        self.last_boxes = {}
        search = self.search
        assert search is not None
        for name, top in tops.items():
            if search.nonfinite[name]:  # patches chosen by NaN activations would look like data
                n = probe.check_size(self.probe_size)
                self.skip_nonfinite(
                    name, "activations", search.nonfinite[name], n, "probe images", f"top_patches/{name}", step
                )
                continue
            chans = self._channels(name, top.values.shape[1], search)
            ids = top.ids[:, chans].cpu()
            by_frame: dict[str | None, list[int]] = {}
            for i in ids[ids >= 0].unique().tolist():
                by_frame.setdefault(search.field(i, name).frame, []).append(i)
            sources: dict[int, torch.Tensor] = {}
            for frame, frame_ids in by_frame.items():
                sources.update(zip(frame_ids, crop_sources(pl_module, probe, frame_ids, frame), strict=True))
            channels_in = next(iter(sources.values())).shape[0] if sources else 1
            cells, boxes = [], []
            for c_idx, c in enumerate(chans):
                for r in range(len(top.values)):
                    img_id, pos = int(ids[r, c_idx]), int(top.positions[r, c])
                    if img_id < 0:  # fewer probe images than k
                        cells.append(torch.zeros(channels_in, *next(iter(search.fields.values()))[name].size))
                        continue
                    rf = search.field(img_id, name)
                    unit = (pos // rf.output_shape[1], pos % rf.output_shape[1])
                    box = rf.box(*unit)
                    boxes.append((c, r, img_id, unit, box))
                    cells.append(crop(sources[img_id], box))
            self.last_boxes[name] = boxes
            patches = centre_pad(cells).float()  # fields that differ between batches: padded, never stretched
            if patches.shape[-1] > self.max_cell:  # big receptive fields (AlexNet conv5: 163 px) are shrunk
                patches = torch.nn.functional.interpolate(patches, size=(self.max_cell, self.max_cell), mode="area")
            picture = viz.grid(viz.grey(patches), nrow=len(top.values), min_cell=self.min_cell)
            if chans != list(range(top.values.shape[1])):  # a subset: the rows say which channels they are
                how = "listed" if isinstance(self.channels, list) else f"the {len(chans)} most variable"
                picture = viz.caption(picture, f"rows, top to bottom: {how} of {top.values.shape[1]} channels")
                picture = viz.caption(picture, f"{chans}")
            pictures.images[tags.TOP_PATCHES.format(node=name)] = picture
        self._say({name: top.values.shape[1] for name, top in tops.items()}, probe.check_size(self.probe_size))
        return pictures

    # -- checkpoints: the channels chosen by variability stay chosen ----------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"chosen": dump_chosen(self.chosen)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.chosen = load_chosen(state_dict.get("chosen", "{}"))
