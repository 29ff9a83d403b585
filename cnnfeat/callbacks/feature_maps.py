"""Feature maps of chosen images, before and after each chosen conv's activation, found on the graph."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from cnnfeat import lecture, tags, viz
from cnnfeat.callbacks.base import (
    CallbackOptions,
    Pictures,
    VisualizationCallback,
    check_indices,
    check_names,
    device_of,
    nonfinite_rows,
)
from cnnfeat.errors import ConfigError, check_int
from cnnfeat.graph import (
    Node,
    capture,
    is_relu_family,
)
from cnnfeat.probe import ProbeSet

#: The test images the lecture shows.
log = logging.getLogger("cnnfeat")
LECTURE_IMAGE_IDS = lecture.LECTURE_IMAGE_IDS
#: the lecture's convs; on a network without them, the first conv of each stage
DEFAULT_LAYERS = ("conv1", "conv2")


def activation_kind(node: Node) -> str:
    """The activation's name as tags spell it: the functional name (``relu``, ``gelu``, ``leaky_relu``, ``silu``)."""
    if node.kind == "module":
        return {"LeakyReLU": "leaky_relu"}.get(node.op, node.op.lower())
    return node.op


def check_channels(channels: Sequence[int] | None, name: str, available: int) -> None:
    """Refuse channel indices outside ``[0, available)``, negative ones included."""
    if channels is not None and any(not 0 <= c < available for c in channels):
        raise ConfigError(
            f"channels {list(channels)} out of range for {name} ({available} channels: valid 0..{available - 1})"
        )


class FeatureMapCallback(VisualizationCallback):
    """Logs, for each chosen image and conv, its channels before and after the conv's activation.

    Tags: ``feature_maps/input/img<ID>`` (the image as the probe shows it, with its class name),
    ``feature_maps/<conv>/conv/img<ID>`` (the conv's output, diverging colours, 0 = white) and
    ``feature_maps/<conv>/<act>/img<ID>`` (the output of the first activation applied to it, through BatchNorm,
    bias, dropout and identity: ``relu`` for ReLU/ReLU6 (module or functional), drawn in viridis from 0;
    ``gelu``, ``silu``, ``leaky_relu``, ``tanh``, ... in diverging colours, since they can be negative).
    ``image_ids`` ``None`` (the default) shows the lecture's six test images on Fashion-MNIST, else the first probe
    image of each of the first six classes. ``layers`` are conv node names of ``cnnfeat.graph`` (a conv applied
    twice: ``conv`` and ``conv:1``); the default, the lecture's ``conv1, conv2``, becomes the first conv of each stage
    on a network without them (the log says which). A conv
    without an activation of its own (pooling or a residual add comes first, or its output branches) gets a
    one-time warning naming it and the reason, and only the ``conv`` tag.
    ``scale="channel"`` (default) scales each map on its own, so weak channels show their structure; ``"image"``
    shares one scale between the channels of a picture, so strengths compare. ``channels`` picks some channels
    (in that order), e.g. the lecture's AlexNet conv1 filters 25, 22, 16, 11, 45, 28, 10. Outputs are cloned
    when produced, so inplace activations do not overwrite the conv's maps. An image whose maps of a conv hold NaN
    or infinity gets no picture of that conv (a warning names the layer).
    """

    def __init__(
        self,
        image_ids: Sequence[int] | None = None,
        layers: Sequence[str] = DEFAULT_LAYERS,
        channels: Sequence[int] | None = None,
        split: str = "test",
        scale: str = "channel",
        nrow: int = 8,
        min_cell: int = 56,
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
        if scale not in ("channel", "image"):
            raise ConfigError(f"scale must be 'channel' or 'image', got {scale!r}")
        #: the images shown; ``None``: chosen in ``check`` (``cnnfeat.lecture.default_image_ids``)
        self.image_ids = check_indices("image_ids", image_ids, allow_none=True)
        self.layers = check_names("layers", layers)
        self.channels = check_indices("channels", channels, allow_none=True, nonnegative=False)  # range: in check
        check_int("nrow", nrow)
        check_int("min_cell", min_cell)
        self.scale, self.nrow, self.min_cell = scale, nrow, min_cell

    def _after(self, pl_module: nn.Module) -> dict[str, str | None]:
        """Per chosen conv, its activation node (or ``None``), from the layer plan (unknown convs: an error)."""
        plan = self.layer_plan(pl_module)
        return {layer.name: layer.activation for layer in plan.resolve_convs(self.layers)}

    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        assert probe is not None
        self.layers = self.fit_default_layers(pl_module, self.layers, DEFAULT_LAYERS, local=False)
        if self.image_ids is None:
            held = set(probe.ids.tolist())
            self.image_ids = lecture.default_image_ids(probe.class_names, held, probe.example_ids(6), probe.split)
            log.info("%s: image_ids=%s (%s)", type(self).__name__, self.image_ids, probe.describe())
        probe.positions(self.image_ids)  # IDs the probe does not hold: an error naming them
        self._after(pl_module)
        plan = self.layer_plan(pl_module)
        for conv in self.layers:
            check_channels(self.channels, conv, plan[conv].units)
            calls = [c for c in plan.calls(conv) if plan[c].kind == "conv"]
            if len(calls) > 1 and ":" not in conv:
                self.warn_once(
                    f"calls:{conv}",
                    f"{conv!r} runs {len(calls)} times in one forward pass of {type(pl_module).__name__} "
                    f"({', '.join(calls)}); the pictures show its first call {conv!r} (name another call to see it)",
                )
            if plan[conv].activation is None:
                self.warn_once(f"after:{conv}", f"no 'after' picture for {conv!r}: {plan[conv].activation_note}")

    def _pick(self, maps: torch.Tensor) -> torch.Tensor:
        return maps if self.channels is None else maps[self.channels]

    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        assert probe is not None
        positions = probe.positions(self.image_ids)
        x = probe.inputs[positions].to(device_of(pl_module))
        after = self._after(pl_module)
        graph = self.layer_plan(pl_module).graph
        names = self.layers + [a for a in after.values() if a]
        with capture(pl_module, names) as out:
            pl_module(x)
        pictures = Pictures()
        per_channel = self.scale == "channel"
        bad = {}  # conv -> (K,) images whose conv or activation maps hold NaN/inf: not drawn
        for conv in self.layers:
            bad[conv] = nonfinite_rows(out[conv]) | (nonfinite_rows(out[after[conv]]) if after[conv] else False)
            if bad[conv].any():
                n = int(bad[conv].sum())
                self.skip_nonfinite(
                    conv, "activations", n, len(bad[conv]), "chosen images", f"feature_maps/{conv}/*", step
                )
        for k, (img_id, label) in enumerate(zip(self.image_ids, probe.labels[positions].tolist(), strict=True)):
            pictures.images[tags.FEATURE_MAP_INPUT.format(image=img_id)] = viz.caption(
                viz.upscale(viz.grey(probe.images[positions[k] : positions[k] + 1]), 112)[0],
                f"{probe.split} {img_id}: {probe.class_name(label)}",
            )
            for conv in self.layers:
                if bad[conv][k]:
                    continue
                pictures.images[tags.FEATURE_MAP_CONV.format(conv=conv, image=img_id)] = viz.map_grid(
                    self._pick(out[conv][k]),
                    signed=True,
                    per_channel=per_channel,
                    nrow=self.nrow,
                    min_cell=self.min_cell,
                )
                if (act := after[conv]) is not None:
                    node = graph[act]
                    tag = tags.FEATURE_MAP_ACTIVATION.format(conv=conv, activation=activation_kind(node), image=img_id)
                    pictures.images[tag] = viz.map_grid(
                        self._pick(out[act][k]),
                        signed=not is_relu_family(node),
                        per_channel=per_channel,
                        nrow=self.nrow,
                        min_cell=self.min_cell,
                    )
        return pictures
