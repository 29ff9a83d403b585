"""Brute-force receptive fields: the support of the input gradient of a unit of a positive-weight copy."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_PASS_GRADIENT = {"relu", "relu_", "relu6", "leaky_relu", "gelu", "silu", "hardswish", "tanh", "sigmoid", "elu"}
_MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


class GradientEverywhere(TorchFunctionMode):
    """Activations become the identity and max-pools average pools, so every input a unit sees gets gradient."""

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _PASS_GRADIENT:
            return args[0]
        if name == "max_pool2d":
            a = {**dict(zip(_MAX_POOL_ARGS, args, strict=False)), **kwargs}
            assert a.get("dilation", 1) in (1, (1, 1)) and not a.get("return_indices")
            stride = a.get("stride") or a["kernel_size"]
            return F.avg_pool2d(a["input"], a["kernel_size"], stride, a.get("padding", 0), a.get("ceil_mode", False))
        if name == "adaptive_max_pool2d":
            return F.adaptive_avg_pool2d(args[0], args[1] if len(args) > 1 else kwargs["output_size"])
        return func(*args, **kwargs)


def positive_copy(model: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A copy in eval mode whose conv/linear/BatchNorm weights are all > 0 (no parameter needs grad)."""
    model = copy.deepcopy(model).eval().to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                m.weight.abs_().add_(1e-2)
    return model.requires_grad_(False)


def support_box(grad: torch.Tensor) -> tuple[int, int, int, int]:
    """Bounding box (top, left, bottom, right) of the nonzero entries of a (C,H,W) gradient."""
    nz = grad.abs().sum(0) > 0
    rows, cols = nz.any(1).nonzero().flatten(), nz.any(0).nonzero().flatten()
    return int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())


def clipped(box: tuple[int, int, int, int], h: int, w: int) -> tuple[int, int, int, int]:
    top, left, bottom, right = box
    return max(top, 0), max(left, 0), min(bottom, h - 1), min(right, w - 1)


def measured_boxes(
    model: nn.Module, module_path: str, call: int, units: list[tuple[int, int]], size: int = 28
) -> list[tuple[int, int, int, int]]:
    """For each unit (row, col) of the ``call``-th output of the submodule ``module_path``: the support box of the
    gradient of all its channels with respect to a (1, 1, size, size) input."""
    probe = positive_copy(model)
    outs: list[torch.Tensor] = []
    handle = dict(probe.named_modules())[module_path].register_forward_hook(lambda m, a, o: outs.append(o))
    source = torch.rand(len(units), 1, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    source.requires_grad_(True)
    try:
        with GradientEverywhere():
            probe(source)
    finally:
        handle.remove()
    out = outs[call]
    loss = sum(out[i, :, r, c].sum() for i, (r, c) in enumerate(units))
    (grad,) = torch.autograd.grad(loss, source)
    return [support_box(grad[i]) for i in range(len(units))]
