"""Where the network looks, epoch by epoch: Grad-CAM and Integrated Gradients of chosen images (issue 24)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from typing_extensions import override

from cnnfeat import attribution, lecture, tags, viz
from cnnfeat.callbacks.base import CallbackOptions, Pictures, VisualizationCallback, check_indices, nonfinite_rows
from cnnfeat.errors import ConfigError
from cnnfeat.lrp import lrp_rules
from cnnfeat.probe import ProbeSet

log = logging.getLogger("cnnfeat")
#: pixels of each panel of a row (Fashion-MNIST's 28 px upscaled x4)
CELL = 112
#: white pixels between the panels of a row
GAP = 8


def cam_cells(cam_predicted: torch.Tensor, cam_true: torch.Tensor, size: tuple[int, int]) -> list[torch.Tensor]:
    """Two Grad-CAM maps (h, w) of one image -> two viridis panels (3, H, W) at the input's size ``size``, sharing
    one scale (the larger maximum), so the predicted and the true class compare."""
    maps = attribution.upsample(torch.stack([cam_predicted, cam_true]), size)
    return list(viz.sequential(maps, maps.max()))


def pixel_cells(predicted: torch.Tensor, true: torch.Tensor) -> list[torch.Tensor]:
    """Two pixel-level maps (C, H, W) of one image (Integrated Gradients or LRP) -> two diverging panels (summed over
    channels, 0 = white, red = evidence for the class) sharing one scale."""
    maps = torch.stack([predicted, true]).float().sum(dim=1)
    return list(viz.diverging(maps, maps.abs().max()))


def attribution_row(image: torch.Tensor, cells: Sequence[torch.Tensor], text: str) -> torch.Tensor:
    """``[image | cells...]`` (each (3, H, W), upscaled to ``CELL`` px), ``GAP`` px apart, with ``text`` below."""
    panels = [viz.upscale(c.unsqueeze(0), CELL)[0] for c in [image, *cells]]
    return viz.caption(viz.hstack(panels, gap=GAP), text)


class AttributionCallback(VisualizationCallback):
    """Grad-CAM and a pixel-level map of chosen images for their predicted and their true class, every epoch.

    One picture per image, ``attribution/img<ID>``: ``[input | Grad-CAM predicted | Grad-CAM true | pixel map
    predicted | pixel map true]`` with a caption naming both classes, the predicted probability and the method.
    Grad-CAM is taken at ``layer`` (``None``: ``cnnfeat.attribution.last_conv_stage``, the activation after the last
    conv) and drawn in viridis, the two classes on one scale. The pixel-level map (``pixel_method``) is summed over the
    input's channels and drawn in diverging colours (red for, blue against the class):

    - ``"integrated_gradients"`` (default; any network): black baseline (the model input of a black picture, e.g.
      ``-mean / std`` after a ``Normalize``; a warning where that is unknown), Captum's Gauss-Legendre, starting at
      the most steps an image needed the epoch before and doubling to 1% completeness; ``attribution/ig_gap/img<ID>``
      is the larger completeness gap (relative, ``IGResult.relative_gap``) of the image's two classes.
    - ``"lrp"``: ``cnnfeat.lrp`` (zennit, epsilon-plus-flat), one gradient per map instead of tens to hundreds; networks
      its rules do not fit (residual additions, ...) are refused before training, naming the node.
      ``attribution/lrp_conserved/img<ID>``: the input relevance's sum over the logit, of the class farther from 1.

    ``image_ids`` ``None``: the lecture's six test images on Fashion-MNIST, else the first probe image of each of the
    first six classes (as ``FeatureMapCallback``).
    """

    def __init__(
        self,
        image_ids: Sequence[int] | None = None,
        layer: str | None = None,
        pixel_method: str = attribution.IG,
        ig_steps: int = 32,
        ig_max_steps: int = 512,
        split: str = "test",
        every_n_epochs: int = 1,
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
        if pixel_method not in attribution.PIXEL_METHODS:
            raise ConfigError(f"pixel_method must be one of {list(attribution.PIXEL_METHODS)}, got {pixel_method!r}")
        self.pixel_method = pixel_method
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ConfigError(f"layer must be a graph node name or null (the last conv stage), got {layer!r}")
        for name, value in (("ig_steps", ig_steps), ("ig_max_steps", ig_max_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise ConfigError(f"{name} must be an integer >= 2, got {value!r}")
        if ig_steps > ig_max_steps:
            raise ConfigError(f"ig_steps ({ig_steps}) must be <= ig_max_steps ({ig_max_steps})")
        #: the images shown; ``None``: chosen in ``check`` (``cnnfeat.lecture.default_image_ids``)
        self.image_ids = check_indices("image_ids", image_ids, allow_none=True)
        #: the Grad-CAM node; ``None``: chosen in ``check``
        self.layer = layer
        self.ig_steps, self.ig_max_steps = ig_steps, ig_max_steps
        self._steps: torch.Tensor | None = None  # per image: the steps it needed at the last render
        #: Integrated Gradients' baseline: the model input of a black picture (set in ``check``; 0 when unknown)
        self.baseline: torch.Tensor | float = 0.0

    @override
    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        assert probe is not None
        if self.image_ids is None:
            held = set(probe.ids.tolist())
            self.image_ids = lecture.default_image_ids(probe.class_names, held, probe.example_ids(6), probe.split)
            log.info("%s: image_ids=%s (%s)", type(self).__name__, self.image_ids, probe.describe())
        probe.positions(self.image_ids)  # IDs the probe does not hold: an error naming them
        if self.pixel_method == attribution.IG:
            self.baseline = self.black_baseline(probe, "Integrated Gradients")
        graph = self.layer_plan(pl_module).graph
        if self.layer is None:
            self.layer = attribution.last_conv_stage(graph)
            log.info("%s: layer=%s (the last conv stage)", type(self).__name__, self.layer)
        if self.pixel_method == attribution.LRP:
            lrp_rules(graph)  # a network LRP's rules do not fit: refused now, naming the node
        node = graph[self.layer]  # an unknown name: an error listing the valid ones
        self.layer = node.name
        if len(node.output_shape) != 4:
            raise ConfigError(
                f"{type(self).__name__}: Grad-CAM needs a layer with spatial maps (N, C, h, w); "
                f"{self.layer!r} outputs {tuple(node.output_shape)}"
            )

    @override
    def should_render(self, writer: object) -> bool:
        return True  # the completeness gaps are scalars: logged to every logger

    @override
    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        assert probe is not None and self.image_ids is not None and self.layer is not None
        positions = probe.positions(self.image_ids)
        x, labels = probe.inputs[positions], probe.labels[positions]
        graph = self.layer_plan(pl_module).graph
        # each image starts at the steps it needed at the previous render (its true-class row too)
        steps = self.ig_steps if self._steps is None else self._steps
        ex = attribution.explain(
            pl_module,
            x,
            labels,
            self.layer,
            steps,
            self.ig_max_steps,
            baselines=self.baseline,
            pixel_method=self.pixel_method,
            graph=graph,
        )
        pixel_predicted, pixel_true = ex.pixel_maps()
        if ex.lrp_predicted is not None and ex.lrp_true is not None:
            kept = torch.stack([ex.lrp_predicted.conserved, ex.lrp_true.conserved])
            score = kept.gather(0, (kept - 1).abs().argmax(dim=0, keepdim=True)).squeeze(0)  # farther from 1
            score_tag, method = tags.ATTRIBUTION_LRP_CONSERVED, "LRP"
        else:
            self._steps = ex.ig_steps()
            assert ex.ig_predicted is not None and ex.ig_true is not None
            score = torch.maximum(ex.ig_predicted.relative_gap, ex.ig_true.relative_gap)
            score_tag, method = tags.ATTRIBUTION_IG_GAP, "IG"
        size = (probe.images.shape[-2], probe.images.shape[-1])
        maps = (ex.cam_predicted, ex.cam_true, pixel_predicted, pixel_true, score)
        bad = torch.stack([nonfinite_rows(m) for m in maps]).any(dim=0)  # NaN logits leave the gradients finite
        if bad.any():
            what = "attribution/img*"
            self.skip_nonfinite(self.layer, "attributions", int(bad.sum()), len(bad), "chosen images", what, step)
        pictures = Pictures()
        for k, img_id in enumerate(self.image_ids):
            if bad[k]:
                continue
            pred, true = int(ex.predicted[k]), int(ex.labels[k])
            cams = [ex.cam_predicted[k], ex.cam_true[k]]
            text = (
                f"{probe.split} {img_id}: predicted {probe.class_name(pred)} ({float(ex.probabilities[k, pred]):.2f}),"
                f" true {probe.class_name(true)}; Grad-CAM, {method}"
            )
            cells = cam_cells(*cams, size) + pixel_cells(pixel_predicted[k], pixel_true[k])
            pictures.images[tags.ATTRIBUTION.format(image=img_id)] = attribution_row(
                viz.grey(probe.images[positions[k]]), cells, text
            )
            pictures.scalars[score_tag.format(image=img_id)] = float(score[k])
        return pictures
