"""Feature maps of chosen images, before and after each conv layer's ReLU."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from cnnfeat import layers, viz
from cnnfeat.callbacks.base import (
    Pictures,
    VisualizationCallback,
    check_ids,
    class_names,
    probe_images,
    split_size,
)

#: The test images the lecture shows.
LECTURE_IMAGE_IDS = (22, 193, 36, 312, 1087, 74)


class FeatureMapCallback(VisualizationCallback):
    """Logs, for each chosen image and conv layer, its channels before and after the ReLU.

    Tags: ``feature_maps/input/img<ID>`` (the image with its class name),
    ``feature_maps/<layer>/conv/img<ID>``
    (pre-ReLU, diverging colours, 0 = white) and ``feature_maps/<layer>/relu/img<ID>`` (post-ReLU, viridis
    from 0). ``scale="channel"`` (default) scales each map on its own, so weak channels show their
    structure; ``"image"`` shares one scale between the channels of a picture, so strengths compare.
    ``channels`` picks some channels (in that order), e.g. the lecture's AlexNet conv1 filters 25, 22, 16, 11,
    45, 28, 10. The ReLU of a layer is found by tracing a forward pass; a conv without one gets only the
    ``conv`` tag.
    Outputs are captured by cloning hooks, so inplace ReLUs do not overwrite the pre-ReLU maps.
    """

    def __init__(
        self,
        image_ids: Sequence[int] = LECTURE_IMAGE_IDS,
        layers: Sequence[str] = ("conv1", "conv2"),
        channels: Sequence[int] | None = None,
        split: str = "test",
        scale: str = "channel",
        nrow: int = 8,
        min_cell: int = 56,
        every_n_epochs: int = 1,
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
        if not image_ids or not layers:
            raise ValueError("image_ids and layers must not be empty")
        self.image_ids, self.layers = [int(i) for i in image_ids], list(layers)
        self.channels = [int(c) for c in channels] if channels is not None else None
        if scale not in ("channel", "image"):
            raise ValueError(f"scale must be 'channel' or 'image', got {scale!r}")
        self.split, self.scale, self.nrow, self.min_cell = split, scale, nrow, min_cell

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        convs = layers.resolve_layers(pl_module, self.layers, nn.Conv2d, what="conv layer")
        for name, conv in convs.items():
            if self.channels is not None and (min(self.channels) < 0 or max(self.channels) >= conv.out_channels):
                raise ValueError(f"channels {self.channels} out of range for {name} ({conv.out_channels} channels)")
        datamodule = self.require_datamodule(trainer)
        check_ids(self.image_ids, split_size(datamodule, self.split), what=f"{self.split} image_ids")

    def _pick(self, maps: torch.Tensor) -> torch.Tensor:
        return maps if self.channels is None else maps[self.channels]

    def render(
        self, pl_module: pl.LightningModule, datamodule: pl.LightningDataModule | None, step: int = 0
    ) -> Pictures:
        x, y = probe_images(datamodule, self.split, self.image_ids)
        x = x.to(pl_module.device)
        relu_of = layers.activation_after(pl_module, x[:1])
        names = self.layers + [r for c in self.layers if (r := relu_of.get(c))]
        with layers.capture(pl_module, names) as out:
            pl_module(x)
        classes = class_names(datamodule, int(y.max()) + 1)
        pictures = Pictures()
        for k, (img_id, label) in enumerate(zip(self.image_ids, y.tolist(), strict=True)):
            pictures.images[f"feature_maps/input/img{img_id}"] = viz.caption(
                viz.upscale(viz.grey(x[k : k + 1]), 112)[0], f"{self.split} {img_id}: {classes[label]}"
            )
            for conv in self.layers:
                pictures.images[f"feature_maps/{conv}/conv/img{img_id}"] = viz.map_grid(
                    self._pick(out[conv][k]),
                    signed=True,
                    per_channel=self.scale == "channel",
                    nrow=self.nrow,
                    min_cell=self.min_cell,
                )
                if relu := relu_of.get(conv):
                    pictures.images[f"feature_maps/{conv}/relu/img{img_id}"] = viz.map_grid(
                        self._pick(out[relu][k]),
                        signed=False,
                        per_channel=self.scale == "channel",
                        nrow=self.nrow,
                        min_cell=self.min_cell,
                    )
        return pictures
