"""The layer-by-layer output-shape table of a network, as the lecture prints it for AlexNet."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from cnnfeat import tags
from cnnfeat.callbacks.base import CallbackOptions, Pictures, VisualizationCallback, device_of
from cnnfeat.errors import ConfigError
from cnnfeat.layers import resolve_layers, trace
from cnnfeat.probe import ProbeSet

log = logging.getLogger("cnnfeat")


def shape_table(module: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(layer name, layer type, output shape)`` for every leaf layer a forward pass on zeros calls."""
    x = torch.zeros(*input_shape, device=device_of(module))
    return [(c.name, type(c.module).__name__, c.output_shape) for c in trace(module, x)]


class ShapeTableCallback(VisualizationCallback):
    """Logs, once before training, the output shape of every layer for an input of ``input_shape``.

    ``module`` names a submodule to trace (e.g. ``backbone`` for the transfer model's AlexNet part);
    ``input_shape`` defaults to the module's ``example_input_array``. The table goes to TensorBoard's Text
    tab (``model/shapes``) and to the console in the lecture's format
    (``Conv2d output shape: torch.Size([1, 64, 55, 55])``).
    """

    needs_probe = False

    def __init__(self, module: str | None = None, input_shape: Sequence[int] | None = None) -> None:
        super().__init__(CallbackOptions(log_untrained=True, during_training=False))
        self.module, self.input_shape = module, list(input_shape) if input_shape is not None else None

    def _target(self, pl_module: nn.Module) -> tuple[nn.Module, list[int]]:
        target = resolve_layers(pl_module, [self.module])[self.module] if self.module else pl_module
        shape = self.input_shape
        if shape is None:
            example = getattr(pl_module, "example_input_array", None)
            if not isinstance(example, torch.Tensor):
                raise ConfigError("ShapeTableCallback needs input_shape (the module has no example_input_array)")
            shape = list(example.shape)
        return target, shape

    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        self._target(pl_module)

    def should_render(self, writer: object) -> bool:
        return True  # the console table needs no logger

    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        target, shape = self._target(pl_module)
        rows = shape_table(target, shape)
        lines = [f"Input shape: {torch.Size(shape)}"] + [f"{t} output shape: {torch.Size(s)}" for _, t, s in rows]
        log.info("Layer output shapes%s:\n%s", f" of {self.module}" if self.module else "", "\n".join(lines))
        md = ["| layer | type | output shape |", "|---|---|---|", f"| input | | {list(shape)} |"]
        md += [f"| {name} | {t} | {list(s)} |" for name, t, s in rows]
        return Pictures(texts={tags.MODEL_SHAPES.name: "\n".join(md)})
