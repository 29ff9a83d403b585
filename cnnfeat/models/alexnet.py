"""Transfer learning: torchvision's AlexNet convolutional part, frozen, with an MLP head for Fashion-MNIST.

The lecture's original route (``model=alexnet``). ``experiment=transfer`` now expresses the same recipe through
``model=torchvision model.arch=alexnet model.freeze=backbone`` with a new MLP top (``model.head_hidden=[4096, 4096]``,
``model.grey_to_rgb=true``) and ``FrozenTorchvision`` feeding the cache: the same features bit for bit, the same
head at init and the same numbers (``tests/test_transfer_freeze.py``). These classes stay public and load their
checkpoints; their layer names are ``backbone.conv1..pool5`` (the new route's: ``net.features.0..12``).

``FrozenAlexNet`` is the frozen part as one object (resize, ImageNet normalisation, the conv layers, average
pooling: images -> (N, 9216)) with the hash that keys cached features (a ``cnnfeat.data.feature_cache.FrozenBackbone``).
``TransferClassifier`` builds its frozen layers as a ``FrozenAlexNet``, and the feature cache is *given* one to
extract with (``conf/data/alexnet_features.yaml``'s ``backbone`` node), both from the same three values (weights,
seed, input size): the backbone lives with the models, and the data code imports no model.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import AlexNet_Weights, alexnet

from cnnfeat.errors import ConfigError, WeightsError, check_int
from cnnfeat.models.classifier import ImageClassifier
from cnnfeat.models.parts import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Resize,
    backbone_fingerprint,
    file_state_dict,
    hub_file,
    hub_state_dict,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FrozenAlexNet",
    "GreyToImageNet",
    "Resize",
    "TransferClassifier",
    "WeightsError",
    "backbone_fingerprint",
    "build_backbone",
    "imagenet_weights_file",
]

#: torchvision ``features.<i>`` index -> our layer name (the lecture's "layer 1..5").
BACKBONE_NAMES = (
    "conv1",
    "relu1",
    "pool1",
    "conv2",
    "relu2",
    "pool2",
    "conv3",
    "relu3",
    "conv4",
    "relu4",
    "conv5",
    "relu5",
    "pool5",
)


def imagenet_weights_file() -> Path:
    """Where torchvision keeps the ImageNet AlexNet weights (``$TORCH_HOME/hub/checkpoints/...``)."""
    return hub_file(AlexNet_Weights.IMAGENET1K_V1)


def _imagenet_state_dict() -> dict[str, torch.Tensor]:
    return hub_state_dict(AlexNet_Weights.IMAGENET1K_V1, "AlexNet", "alexnet.pth")


def _file_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return file_state_dict(path, f"an AlexNet state dict, e.g. {imagenet_weights_file().name}")


def build_backbone(weights: str | os.PathLike | None = "imagenet", seed: int = 0) -> nn.Sequential:
    """AlexNet's convolutional part with named layers (conv1, relu1, pool1, ..., pool5).

    ``weights``: ``"imagenet"`` (torchvision's IMAGENET1K_V1), ``"none"``/``None`` (random, initialised from
    ``seed`` so that every caller gets the same network) or a path to an AlexNet state dict
    (``features.*`` keys, as torchvision saves it; a ``backbone.*`` state dict from cnnfeat works too).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = alexnet(weights=None)
    backbone = nn.Sequential(OrderedDict(zip(BACKBONE_NAMES, net.features, strict=True)))
    if weights is None or str(weights).lower() == "none":
        return backbone
    state = _imagenet_state_dict() if str(weights).lower() == "imagenet" else _file_state_dict(weights)
    renamed = {}
    for key, value in state.items():
        for prefix in ("features.", "backbone."):
            if key.startswith(prefix):
                idx, _, rest = key[len(prefix) :].partition(".")
                name = BACKBONE_NAMES[int(idx)] if idx.isdigit() and int(idx) < len(BACKBONE_NAMES) else idx
                renamed[f"{name}.{rest}"] = value
    if not renamed:
        raise WeightsError(
            f"model.weights={weights} is not an AlexNet state dict: no 'features.*' keys (found keys "
            f"like {sorted(state)[:5]})"
        )
    try:
        result = backbone.load_state_dict(renamed, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"model.weights={weights}: tensors do not fit AlexNet's convolutional layers: {e}") from e
    if result.missing_keys:
        raise WeightsError(f"model.weights={weights} lacks AlexNet layers: missing {result.missing_keys}")
    return backbone


class GreyToImageNet(nn.Module):
    """Grey images in [0, 1] -> 3 identical channels with ImageNet normalisation."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std


def preprocessing(input_size: int) -> str:
    """What happens to an image before the backbone, as it enters cache keys."""
    return f"alexnet|resize{input_size}|imagenet-norm"


def _frozen_features(m: FrozenAlexNet | TransferClassifier, x: torch.Tensor) -> torch.Tensor:
    """Images (N,1,H,W) in [0,1] -> resize -> ImageNet-like -> AlexNet conv layers -> avg-pool -> (N, 9216)."""
    x = m.to_imagenet(m.resize(x))
    if m.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return torch.flatten(m.avgpool(m.backbone(x)), 1)


class FrozenAlexNet(nn.Module):
    """AlexNet's frozen part: images (N,1,H,W) in [0,1] -> (N, 9216); no gradients, always in eval mode.

    The original route's (``model=alexnet``); ``experiment=transfer`` now uses ``FrozenTorchvision("alexnet", ...,
    head_hidden=[4096, 4096], grey_to_rgb=True)``, which gives the same vectors (another cache key).

    ``weights`` as in ``build_backbone``; ``seed`` initialises random weights; ``input_size`` is the side the
    images are resized to. ``fingerprint()`` hashes the weights and the preprocessing (the cache key); ``name``
    names the feature cache's folder (``alexnet-<fingerprint>``) and its log lines.
    """

    name = "AlexNet"

    def __init__(
        self,
        weights: str | os.PathLike | None = "imagenet",
        seed: int = 0,
        input_size: int = 224,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        check_int("input_size", input_size)
        if input_size < 63:
            raise ConfigError(f"input_size must be >= 63 for AlexNet's layers, got {input_size}")
        self.input_size, self.channels_last = input_size, channels_last
        self.resize = Resize(input_size)
        self.to_imagenet = GreyToImageNet()
        self.backbone = build_backbone(weights, seed)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.requires_grad_(False)
        if channels_last:  # ~1.7x faster AlexNet convolutions on CPU
            self.backbone.to(memory_format=torch.channels_last)
        self.eval()

    def train(self, mode: bool = True) -> FrozenAlexNet:
        """Stays in eval mode: the frozen part never trains."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _frozen_features(self, x)

    def fingerprint(self) -> str:
        """Hash of the backbone's tensors and the preprocessing: the cache key of its features."""
        return backbone_fingerprint(self.backbone, preprocessing(self.input_size))


class TransferClassifier(ImageClassifier):
    """Frozen AlexNet ``features`` + ``avgpool`` and a trainable MLP head (AlexNet's classifier shape by default).

    The lecture's original route (``model=alexnet``), kept for its checkpoints and code; ``experiment=transfer`` now
    expresses it as ``TorchvisionClassifier("alexnet", freeze="backbone", head_hidden=[4096, 4096], grey_to_rgb=True)``
    (the same head at init and the same numbers; parameters ``hidden.1``, ``hidden.4``, ``classifier`` there are
    ``net.classifier.1``, ``net.classifier.4``, ``net.classifier.6``).

    Input: Fashion-MNIST images (N,1,28,28) in [0, 1], resized to ``input_size`` and made ImageNet-like on
    the device (``resize`` then ``to_imagenet``), or, for training on the frozen-feature cache, backbone
    outputs (N, 9216) that skip straight to the head. The backbone has ``requires_grad=False`` and stays
    in eval mode even when Lightning calls ``train()``; only the head reaches the optimizer.
    ``features(x)`` is the head's last hidden layer (after its ReLU), what the UMAP callback maps.
    """

    def __init__(
        self,
        num_classes: int = 10,
        weights: str | None = "imagenet",
        backbone_seed: int = 0,
        hidden: Sequence[int] = (4096, 4096),
        dropout: float = 0.5,
        input_size: int = 224,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__(num_classes=num_classes, optimizer=optimizer, scheduler=scheduler)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        frozen = FrozenAlexNet(weights, backbone_seed, input_size, channels_last)
        self.save_hyperparameters()
        # the frozen part's layers under the names checkpoints and layer names use (backbone.conv1, resize, ...)
        self.resize, self.to_imagenet, self.backbone, self.avgpool = (
            frozen.resize,
            frozen.to_imagenet,
            frozen.backbone,
            frozen.avgpool,
        )
        self.channels_last = channels_last
        layers: list[nn.Module] = []
        width = 256 * 6 * 6
        for h in hidden:
            layers += [nn.Dropout(dropout), nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.hidden = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)
        self.feature_dim = width
        self.example_input_array = torch.zeros(1, 1, 28, 28)

    def train(self, mode: bool = True) -> TransferClassifier:
        """Lightning calls ``train()`` every epoch; the frozen backbone stays in eval mode regardless."""
        super().train(mode)
        self.backbone.eval()
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N,1,H,W) in [0,1] -> the backbone's input (N,3,input_size,input_size), ImageNet-normalised."""
        return self.to_imagenet(self.resize(x))

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen part: images -> (N, 9216), what the feature cache stores (``FrozenAlexNet.forward``)."""
        return _frozen_features(self, x)

    def fingerprint(self) -> str:
        """Hash of the frozen part (weights and preprocessing), equal to a ``FrozenAlexNet``'s with the same values."""
        return backbone_fingerprint(self.backbone, preprocessing(self.hparams.input_size))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's last hidden layer for images (N,1,H,W) or cached backbone features (N, 9216)."""
        if x.ndim == 4:
            x = self.backbone_features(x)
        return self.hidden(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
