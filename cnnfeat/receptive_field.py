"""Receptive fields of conv-net units, from the layer geometry of any model.

The layers between the input and the target are taken in the order a forward pass calls them (traced with
hooks), and composed with the standard recurrences, per axis:

    size_out  = size_in + (k - 1) * d * jump_in
    jump_out  = jump_in * s
    start_out = start_in + ((k - 1) * d / 2 - p) * jump_in

for Conv2d, MaxPool2d and AvgPool2d (kernel k, stride s, padding p, dilation d). ``start`` is the input
coordinate of the centre of output unit 0. Elementwise layers (ReLU, BatchNorm, Dropout, ...) keep the
geometry; anything else that changes the spatial shape (Linear, Flatten, adaptive pooling) ends the chain,
except before the first conv/pool layer: there it is an input transform (e.g. a resize to 224x224) and
coordinates restart in its output, named by ``ReceptiveField.frame``.
This assumes a chain (no parallel branches), as in AlexNet, VGG and the lecture's network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cnnfeat.layers import resolve_layers, trace

_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of every unit of one layer, per axis (height, width)."""

    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[float, float]
    output_shape: tuple[int, int]
    frame: str | None = None  # the module whose output the boxes refer to (None: the model's input)

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Input-pixel box ``(top, left, bottom, right)`` (inclusive) of the unit at ``(row, col)``.

        It may reach outside the image where the layers pad.
        """
        out = []
        for axis, pos in ((0, row), (1, col)):
            centre = self.start[axis] + pos * self.jump[axis]
            lo = round(centre - (self.size[axis] - 1) / 2)
            out.append((lo, lo + self.size[axis] - 1))
        (top, bottom), (left, right) = out
        return top, left, bottom, right


def receptive_fields(
    model: nn.Module, example_input: torch.Tensor, names: list[str] | None = None
) -> dict[str, ReceptiveField]:
    """Receptive field of each named layer's output (default: every conv/pool layer on the chain).

    ``example_input`` (1,C,H,W) fixes the spatial size. Raises ``ValueError`` for a layer the forward pass
    does not reach or that lies after a layer without spatial geometry.
    """
    if names is not None:
        resolve_layers(model, names)
    size, jump, start = [1, 1], [1, 1], [0.0, 0.0]
    fields: dict[str, ReceptiveField] = {}
    broken_at: str | None = None
    frame: str | None = None
    seen_spatial = False
    for call in trace(model, example_input):
        if broken_at is None:
            m = call.module
            if isinstance(m, _SPATIAL):
                seen_spatial = True
                k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
                p = _pair(m.padding) if not isinstance(m.padding, str) else _same_padding(m)
                d = _pair(getattr(m, "dilation", 1))
                for a in (0, 1):
                    size[a] += (k[a] - 1) * d[a] * jump[a]
                    start[a] += ((k[a] - 1) * d[a] / 2 - p[a]) * jump[a]
                    jump[a] *= s[a]
            elif len(call.output_shape) != 4 or call.output_shape[-2:] != call.input_shape[-2:]:
                if not seen_spatial and len(call.output_shape) == 4:  # an input transform: restart after it
                    size, jump, start, frame = [1, 1], [1, 1], [0.0, 0.0], call.name
                    fields.clear()
                    continue
                broken_at = call.name
                continue
            if len(call.output_shape) == 4:
                fields[call.name] = ReceptiveField(
                    tuple(size), tuple(jump), tuple(start), tuple(call.output_shape[-2:]), frame
                )
        elif names and call.name in names:
            raise ValueError(
                f"Layer {call.name!r} comes after {broken_at!r}, which has no spatial geometry; "
                "its units have no receptive field in the image"
            )
    if names is None:
        return {n: f for n, f in fields.items() if isinstance(dict(model.named_modules())[n], _SPATIAL)}
    missing = [n for n in names if n not in fields]
    if missing:
        raise ValueError(
            f"Layer(s) {missing} are not called on the spatial path of a forward pass of "
            f"{type(model).__name__}; layers with receptive fields: {list(fields)}"
        )
    return {n: fields[n] for n in names}


def _same_padding(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding == "valid":
        return (0, 0)
    k, d = _pair(m.kernel_size), _pair(m.dilation)
    return ((k[0] - 1) * d[0] // 2, (k[1] - 1) * d[1] // 2)


def crop(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Cut ``box`` (top, left, bottom, right; inclusive) out of an image (C,H,W), zero-padding outside it."""
    top, left, bottom, right = box
    c, h, w = image.shape
    out = image.new_zeros(c, bottom - top + 1, right - left + 1)
    t, l_, b, r = max(top, 0), max(left, 0), min(bottom, h - 1), min(right, w - 1)
    if t <= b and l_ <= r:
        out[:, t - top : b - top + 1, l_ - left : r - left + 1] = image[:, t : b + 1, l_ : r + 1]
    return out
