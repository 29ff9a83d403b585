"""What cnnfeat's networks share: input modules (resize, standardise), pretrained weights from the torch hub cache or
a file (with the message that says where to put a missing file), and the fingerprint of frozen tensors.

Weights come from torchvision's own ``WeightsEnum`` entries (``AlexNet_Weights.IMAGENET1K_V1``,
``ResNet18_Weights.DEFAULT``, ...), read from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) or downloaded
there; a local file is loaded with ``weights_only=True`` (no pickled code runs).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import WeightsEnum

from cnnfeat.errors import ConfigError, WeightsError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def hub_file(weights: WeightsEnum) -> Path:
    """Where torchvision keeps ``weights`` (``$TORCH_HOME/hub/checkpoints/<file of its url>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def hub_state_dict(weights: WeightsEnum, label: str, path_hint: str) -> dict[str, torch.Tensor]:
    """``weights``' tensors from the torch hub cache (downloaded when missing and online); offline and absent, a
    :class:`WeightsError` naming the file, the folder to put it in and the alternatives (``model.weights=...``).

    ``label`` names the network in the message (``"AlexNet"``), ``path_hint`` the example file (``alexnet.pth``).
    """
    target = hub_file(weights)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # offline (URLError), interrupted or corrupt download
        raise WeightsError(
            f"{label} ImageNet weights ({type(weights).__name__}.{weights.name}) are not in the torch hub cache and "
            f"could not be downloaded ({type(e).__name__}: {e}).\nPut the file {target.name} into {target.parent} "
            f"(get it from {weights.url} on a machine with internet; TORCH_HOME moves the cache), or pass a local "
            f"file with model.weights=/path/to/{path_hint}, or model.weights=none for random weights (with "
            "experiment=transfer or transfer_torchvision the frozen backbone's setting is backbone.weights=..., which "
            "model.weights follows)."
        ) from e


def file_state_dict(path: str | os.PathLike, expected: str) -> dict[str, torch.Tensor]:
    """A state dict from a file (a bare one, or a checkpoint's ``state_dict``), loaded without running pickled code.

    ``expected`` says what the file should hold, for the message when it does not exist.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"model.weights={path}: no such file (expected {expected})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"model.weights={path} could not be loaded as a weights-only state dict ({e})") from e
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsError(f"model.weights={path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor], extra: str = "") -> str:
    """A short hash of named tensors (and ``extra``, e.g. the preprocessing), for cache keys."""
    h = hashlib.sha1(extra.encode())
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def backbone_fingerprint(backbone: nn.Module, extra: str = "") -> str:
    """A short hash of the backbone's tensors (and ``extra``, e.g. the preprocessing), for cache keys."""
    return tensors_fingerprint(backbone.state_dict(), extra)


class Resize(nn.Module):
    """Bilinear resize of (N,C,H,W) to ``size`` x ``size`` (a module, so receptive fields can start after it)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


class RepeatGrey(nn.Module):
    """Grey images (N, 1, H, W) -> ``channels`` identical channels (a view): grey pictures for an RGB network."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.channels, -1, -1)


class Standardize(nn.Module):
    """``(x - mean) / std`` per channel (one value each, or one per channel), on the device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not all(s > 0 for s in std):
            raise ConfigError(f"mean and std need one value per channel and std > 0, got {list(mean)}, {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def imagenet_stats(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean and std for RGB input; for grey input their means (the stem's RGB weights are summed)."""
    if in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_channels == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    raise ConfigError(
        f"normalize=imagenet needs 1 or 3 input channels, got {in_channels}: standardise the data yourself and set "
        "model.normalize=none"
    )
