"""Conv filter weights as pictures: ``filters/<layer>``, step = epochs trained (0 = untrained)."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
from torch import nn

from cnnfeat import viz
from cnnfeat.callbacks.base import Pictures, VisualizationCallback
from cnnfeat.layers import resolve_layers


class FilterCallback(VisualizationCallback):
    """Logs the weights of chosen conv layers as an out x in grid of kernels.

    Colour: diverging (blue < 0 < red, white = 0), symmetric around 0. ``scale="layer"`` (default) divides
    by the largest |w| of the layer, so the filters of a layer can be compared with each other;
    ``"filter"`` scales each output filter on its own. Layers with 3 input channels can be drawn as RGB
    pictures (``rgb=true``, AlexNet's conv1). Kernels are upscaled with nearest neighbours to at least
    ``min_cell`` pixels so that 3x3 kernels are visible.
    """

    def __init__(
        self,
        layers: Sequence[str] = ("conv1", "conv2"),
        scale: str = "layer",
        rgb: bool = False,
        min_cell: int = 24,
        every_n_epochs: int = 1,
        log_untrained: bool = True,
        save_png: bool = False,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, log_untrained=log_untrained, save_png=save_png)
        if scale not in ("layer", "filter"):
            raise ValueError(f"scale must be 'layer' or 'filter', got {scale!r}")
        if not layers:
            raise ValueError("layers must name at least one conv layer")
        self.layers, self.scale, self.rgb, self.min_cell = list(layers), scale, rgb, min_cell

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        resolve_layers(pl_module, self.layers, nn.Conv2d, what="conv layer")

    def render(
        self, pl_module: pl.LightningModule, datamodule: pl.LightningDataModule | None, step: int = 0
    ) -> Pictures:
        pictures = Pictures()
        for name, conv in resolve_layers(pl_module, self.layers, nn.Conv2d, what="conv layer").items():
            w = conv.weight
            if self.rgb and w.shape[1] == 3:
                img = viz.rgb_filter_grid(w, per=self.scale, min_cell=self.min_cell)
            else:
                img = viz.filter_grid(w, per=self.scale, min_cell=self.min_cell)
            pictures.images[f"filters/{name}"] = img
        return pictures
