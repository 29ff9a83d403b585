"""Maximally activating image patches per channel, cropped by the unit's receptive field."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from cnnfeat import layers, viz
from cnnfeat.callbacks.base import Pictures, VisualizationCallback, probe_images, split_size
from cnnfeat.receptive_field import crop, receptive_fields


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

    def gathered(self) -> TopK:
        """The global top-k across processes (torch.distributed), or itself in a single process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        parts = []
        for t in (self.values, self.ids, self.positions):
            bufs = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(bufs, t.contiguous())
            parts.append(torch.cat(bufs))
        merged = TopK.empty(len(self.values), self.values.shape[1], self.values.device)
        merged.update(*parts)
        return merged


class TopPatchesCallback(VisualizationCallback):
    """Logs, per layer, a grid of the image patches that activate each channel most (``top_patches/<layer>``).

    Streams the probe set (default: the whole test split) in batches, keeping a running top-k per channel
    of (activation, image, position) — one position per image, so the k patches come from k images. Under
    DDP each process takes a shard and the top-k are gathered. Each winning unit's patch is its receptive
    field, computed from the layer geometry (``cnnfeat.receptive_field``), cut from the image and
    zero-padded where it reaches past the border. Rows: channels (the first ``max_channels``, or
    ``channels``); columns: rank 1..k.
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
    ) -> None:
        super().__init__(
            every_n_epochs=every_n_epochs,
            log_untrained=log_untrained,
            save_png=save_png,
            during_training=during_training,
        )
        if top_k < 1 or max_channels < 1 or batch_size < 1 or (probe_size is not None and probe_size < 1):
            raise ValueError("top_k, max_channels, batch_size and probe_size must be >= 1")
        if not layers:
            raise ValueError("layers must name at least one layer")
        self.layers, self.top_k = list(layers), top_k
        self.channels = list(channels) if channels is not None else None
        self.max_channels, self.split, self.probe_size = max_channels, split, probe_size
        if max_cell < min_cell:
            raise ValueError(f"max_cell ({max_cell}) must be >= min_cell ({min_cell})")
        self.batch_size, self.min_cell, self.max_cell = batch_size, min_cell, max_cell

    def _probe_count(self, datamodule: pl.LightningDataModule) -> int:
        return self.probe_size or split_size(datamodule, self.split)

    def _channels(self, n: int) -> list[int]:
        return self.channels if self.channels is not None else list(range(min(n, self.max_channels)))

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        found = layers.resolve_layers(pl_module, self.layers)
        self.check_probe_size(trainer, self.split, self.probe_size)
        x, _ = probe_images(trainer.datamodule, self.split, [0])
        receptive_fields(pl_module, x.to(pl_module.device), self.layers)  # raises for layers without one
        for name, m in found.items():
            c = getattr(m, "out_channels", None)
            if self.channels is not None and c is not None and (min(self.channels) < 0 or max(self.channels) >= c):
                raise ValueError(f"channels {self.channels} out of range for {name} ({c} channels)")

    def collect(self, pl_module: pl.LightningModule, datamodule: pl.LightningDataModule) -> dict[str, TopK]:
        """Stream this process's shard of the probe set and return the gathered top-k per layer."""
        n = self._probe_count(datamodule)
        rank, world = (
            (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        )
        shard = torch.arange(rank, n, world)
        tops: dict[str, TopK] = {}
        with layers.capture(pl_module, self.layers) as out:
            for start in range(0, len(shard), self.batch_size):
                ids = shard[start : start + self.batch_size]
                x, _ = probe_images(datamodule, self.split, ids)
                pl_module(x.to(pl_module.device))
                for name in self.layers:
                    maps = out[name]
                    if name not in tops:
                        tops[name] = TopK.empty(self.top_k, maps.shape[1], maps.device)
                    tops[name].update_from_maps(maps, ids)
        return {name: t.gathered() for name, t in tops.items()}

    def _crop_sources(self, pl_module: pl.LightningModule, x: torch.Tensor, frame: str | None) -> torch.Tensor:
        """The images the boxes refer to: the inputs, or the output of an input transform (e.g. a resize)."""
        if frame is None:
            return x
        with layers.capture(pl_module, [frame]) as out:
            pl_module(x.to(pl_module.device))
        return out[frame].cpu()

    def render(
        self, pl_module: pl.LightningModule, datamodule: pl.LightningDataModule | None, step: int = 0
    ) -> Pictures:
        tops = self.collect(pl_module, datamodule)
        x0, _ = probe_images(datamodule, self.split, [0])
        fields = receptive_fields(pl_module, x0.to(pl_module.device), self.layers)
        pictures = Pictures()
        for name, top in tops.items():
            rf = fields[name]
            chans = self._channels(top.values.shape[1])
            ids = top.ids[:, chans].cpu()
            uniq = ids[ids >= 0].unique()
            sources = {}
            if len(uniq):
                x, _ = probe_images(datamodule, self.split, uniq)
                sources = dict(zip(uniq.tolist(), self._crop_sources(pl_module, x, rf.frame), strict=True))
            channels_in = next(iter(sources.values())).shape[0] if sources else 1
            width = rf.output_shape[1]
            cells = []
            for c_idx, c in enumerate(chans):
                for r in range(len(top.values)):
                    img_id, pos = int(ids[r, c_idx]), int(top.positions[r, c])
                    if img_id < 0:  # fewer probe images than k
                        cells.append(torch.zeros(channels_in, *rf.size))
                        continue
                    cells.append(crop(sources[img_id], rf.box(pos // width, pos % width)))
            patches = torch.stack(cells).float()
            if patches.shape[-1] > self.max_cell:  # big receptive fields (AlexNet conv5: 163 px) are shrunk
                patches = torch.nn.functional.interpolate(patches, size=(self.max_cell, self.max_cell), mode="area")
            pictures.images[f"top_patches/{name}"] = viz.grid(
                viz.grey(patches), nrow=len(top.values), min_cell=self.min_cell
            )
        return pictures
