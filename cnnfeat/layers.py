"""Find layers of any ``nn.Module`` by name and read their outputs with forward hooks.

Names are those of ``named_modules()`` (``conv1``, ``features.0``); errors list the valid ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

#: Modules treated as the ReLU-type activation of a conv layer.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)


def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """All ``Conv2d`` layers, by name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def relu_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All ReLU-type activation modules, by name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ACTIVATIONS)}


def resolve_layers(
    model: nn.Module, names: Iterable[str], kind: type | tuple[type, ...] = nn.Module, what: str = "layer"
) -> dict[str, nn.Module]:
    """Map each name to its module; unknown names (or the wrong kind) raise one error listing valid names."""
    modules = dict(model.named_modules())
    valid = [n for n, m in modules.items() if n and isinstance(m, kind)]
    bad = [n for n in names if n not in modules or not isinstance(modules[n], kind)]
    if bad:
        raise ValueError(f"Unknown {what} name(s) {bad} for {type(model).__name__}; valid names: {valid}")
    return {n: modules[n] for n in names}


@dataclass(frozen=True)
class LayerCall:
    """One leaf module call seen while tracing a forward pass."""

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def trace(model: nn.Module, x: torch.Tensor) -> list[LayerCall]:
    """Leaf modules in the order a forward pass calls them, with input and output shapes.

    Execution order (not registration order) is what receptive fields and ReLU pairing need.
    """
    calls: list[LayerCall] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod: nn.Module, args: tuple, out: object) -> None:
        if isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            calls.append(LayerCall(names[mod], mod, tuple(args[0].shape), tuple(out.shape)))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


def activation_after(model: nn.Module, x: torch.Tensor) -> dict[str, str | None]:
    """For each conv layer, the name of the ReLU-type module applied directly to its output, or ``None``.

    "Directly" means the next leaf call with the same output shape is an activation; found by tracing
    the forward pass on ``x``, so it works for any model that uses activation *modules*.
    """
    calls = trace(model, x)
    pairs: dict[str, str | None] = {}
    for i, c in enumerate(calls):
        if isinstance(c.module, nn.Conv2d):
            nxt = calls[i + 1] if i + 1 < len(calls) else None
            ok = nxt is not None and isinstance(nxt.module, ACTIVATIONS) and nxt.input_shape == c.output_shape
            pairs[c.name] = nxt.name if ok else None
    return pairs


@contextmanager
def capture(model: nn.Module, names: Iterable[str], inputs: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output (or, with ``inputs=True``, the input) of each named layer during forward passes.

    Tensors are *cloned* when the hook runs: a conv followed by ``ReLU(inplace=True)`` (AlexNet) would
    otherwise be overwritten by the ReLU, and the "pre-ReLU" map would silently equal the post-ReLU one.
    Clones are in the standard (NCHW) layout, where per-channel reductions are fast even when the model
    runs channels_last. A later forward pass replaces the stored tensor; hooks are removed on exit.
    """
    names = list(names)
    modules = resolve_layers(model, names)
    out: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        if inputs:

            def pre_hook(_mod: nn.Module, args: tuple) -> None:
                out[name] = args[0].detach().clone(memory_format=torch.contiguous_format)

            return pre_hook

        def hook(_mod: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            out[name] = output.detach().clone(memory_format=torch.contiguous_format)

        return hook

    register = "register_forward_pre_hook" if inputs else "register_forward_hook"
    handles = [getattr(m, register)(make_hook(n)) for n, m in modules.items()]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
