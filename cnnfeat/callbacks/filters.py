"""Conv filter weights as pictures: ``filters/<layer>``, step = epochs trained (0 = untrained)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from cnnfeat import viz
from cnnfeat.callbacks.base import (
    CallbackOptions,
    Pictures,
    VisualizationCallback,
    check_bool,
    check_names,
    nonfinite_rows,
)
from cnnfeat.errors import ConfigError, check_int
from cnnfeat.layers import resolve_layers
from cnnfeat.probe import ProbeSet

#: The layers this callback draws.
CONV_LAYERS = (nn.Conv2d, nn.ConvTranspose2d)


def conv_filters(conv: nn.Conv2d | nn.ConvTranspose2d) -> torch.Tensor:
    """A layer's filters as ``(out, in / groups, kh, kw)``: the kernel each output channel correlates with each input.

    A ``Conv2d`` stores exactly that. A ``ConvTranspose2d`` stores ``(in, out / groups, kh, kw)`` and adds each
    input unit's kernel into the output; it equals a convolution of its input (spread out by the stride, padded
    by ``dilation * (k - 1) - padding``) with the kernels transposed per group and flipped in both axes.
    """
    w = conv.weight
    if isinstance(conv, nn.ConvTranspose2d):
        g = conv.groups
        cin, cout_g, kh, kw = w.shape
        w = w.reshape(g, cin // g, cout_g, kh, kw).transpose(1, 2).reshape(g * cout_g, cin // g, kh, kw)
        w = w.flip(-2, -1)
    return w


log = logging.getLogger("cnnfeat")
#: the lecture's first and second conv layers; on a network without them, its first two conv layers
DEFAULT_LAYERS = ("conv1", "conv2")


class FilterCallback(VisualizationCallback):
    """Logs the weights of chosen conv layers as an out x in grid of kernels.

    Colour: diverging (blue < 0 < red, white = 0), symmetric around 0. ``scale="layer"`` (default) divides
    by the largest |w| of the layer, so the filters of a layer can be compared with each other;
    ``"filter"`` scales each output filter on its own. Layers with 3 input channels can be drawn as RGB
    pictures (``rgb=true``, AlexNet's conv1). Kernels are upscaled with nearest neighbours to at least
    ``min_cell`` pixels so that 3x3 kernels are visible. For big layers, ``max_filters`` shows only the first
    output filters in the out x in grid (RGB pictures show all), and ``per_filter_grids=k`` adds
    ``filters/<layer>/out<i>``: the in-channel kernels of each of the first k filters as a square grid
    (the lecture's "64x5x5 filters" of AlexNet's conv2). Layers are ``Conv2d``/``ConvTranspose2d`` modules by their
    ``named_modules()`` path (a conv applied twice has one set of weights). A layer whose weights hold NaN or
    infinity is not drawn (a warning names it). A ``ConvTranspose2d`` is drawn as the convolution it equals
    (``conv_filters``): row = output channel, column = input channel, kernel flipped, so its picture reads like a
    ``Conv2d``'s (the pattern in its stride-spread input that drives each output channel).
    """

    needs_probe = False

    def __init__(
        self,
        layers: Sequence[str] = DEFAULT_LAYERS,
        scale: str = "layer",
        rgb: bool = False,
        max_filters: int | None = None,
        per_filter_grids: int = 0,
        min_cell: int = 24,
        every_n_epochs: int = 1,
        log_untrained: bool = True,
        save_png: bool = False,
        during_training: bool = True,
    ) -> None:
        super().__init__(
            CallbackOptions(
                every_n_epochs=every_n_epochs,
                log_untrained=log_untrained,
                save_png=save_png,
                during_training=during_training,
            )
        )
        if scale not in ("layer", "filter"):
            raise ConfigError(f"scale must be 'layer' or 'filter', got {scale!r}")
        names = check_names("layers", layers)
        check_bool("rgb", rgb)
        check_int("max_filters", max_filters, allow_none=True)
        check_int("per_filter_grids", per_filter_grids, 0)
        check_int("min_cell", min_cell)
        self.layers, self.scale, self.rgb, self.min_cell = names, scale, rgb, min_cell
        self.max_filters, self.per_filter_grids = max_filters, per_filter_grids

    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        convs = [n for n, m in pl_module.named_modules() if isinstance(m, CONV_LAYERS)]
        if tuple(self.layers) == DEFAULT_LAYERS and not set(self.layers) <= set(convs) and convs:
            # the lecture's names, on a network without them: its first two conv layers (first and second layer)
            self.layers = convs[:2]
            log.info(
                "%s: layers=%s (the first two conv layers of %s)",
                type(self).__name__,
                self.layers,
                type(pl_module).__name__,
            )
        resolve_layers(pl_module, self.layers, CONV_LAYERS, what="conv layer")

    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        pictures = Pictures()
        for name, conv in resolve_layers(pl_module, self.layers, CONV_LAYERS, what="conv layer").items():
            w = conv_filters(conv)
            bad = int(nonfinite_rows(w).sum())
            if bad:  # a NaN filter is not data: no picture of this layer
                self.skip_nonfinite(name, "weights", bad, len(w), "filters", f"filters/{name}", step)
                continue
            if self.rgb and w.shape[1] == 3:  # every filter, as an RGB picture
                img = viz.rgb_filter_grid(w, per=self.scale, min_cell=self.min_cell)
            else:
                shown = w[: self.max_filters] if self.max_filters else w
                img = viz.filter_grid(shown, per=self.scale, min_cell=self.min_cell, scale=w.abs().amax())
            pictures.images[f"filters/{name}"] = img
            for k in range(min(self.per_filter_grids, w.shape[0]) if w.shape[1] > 3 else 0):
                pictures.images[f"filters/{name}/out{k}"] = viz.kernel_grid(
                    w[k], scale=w.abs().amax(), min_cell=self.min_cell
                )
        return pictures
