"""The lecture's small CNN for 28x28 grey images (and, with ``in_channels``/``image_size``, any square images)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cnnfeat.errors import ConfigError, check_int
from cnnfeat.models.classifier import DEFAULT_SCHEDULER, ImageClassifier

#: Fashion-MNIST training-set pixel mean and std (of images scaled to [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


class SmallCNN(ImageClassifier):
    """Conv 1->6 3x3, ReLU, Conv 6->6 3x3, ReLU, MaxPool, Conv 6->16 3x3, ReLU, MaxPool,
    FC 784->120, ReLU, FC 120->100, ReLU, FC 100->10 (convs padded to keep 28x28, as in the lecture).

    ``in_channels`` and ``image_size`` adapt it to other images the way the lecture's layout allows: the first conv
    takes ``in_channels`` and FC1 takes 16 x (image_size // 4)^2 (the defaults, 1 and 28, are the lecture's network;
    the data configs give ``${data.in_channels}`` and ``${data.image_size}``).

    Takes images in [0, 1] and standardises them with ``input_mean``/``input_std`` (``None`` keeps
    [0, 1]). Every ReLU is its own module (``relu1`` .. ``relu5``) so each can be watched.
    ``conv_bias_init`` sets all conv biases to a constant (a large negative value kills the ReLUs, one
    of the lecture's two causes of dying ReLU). ``channels_last`` makes CPU convolutions 2x faster here.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = DEFAULT_SCHEDULER,
        input_mean: float | None = FASHION_MNIST_MEAN,
        input_std: float | None = FASHION_MNIST_STD,
        conv_bias_init: float | None = None,
        inplace_relu: bool = False,
        channels_last: bool = True,
    ) -> None:
        super().__init__(num_classes=num_classes, optimizer=optimizer, scheduler=scheduler)
        if (input_mean is None) != (input_std is None) or (
            input_std is not None and not (math.isfinite(input_std) and math.isfinite(input_mean) and input_std > 0)
        ):
            raise ConfigError(
                "input_mean and input_std must both be finite numbers (std > 0) or both None, got "
                f"{input_mean}, {input_std}"
            )
        check_int("in_channels", in_channels)
        check_int("image_size", image_size)
        if image_size < 4:
            raise ConfigError(f"image_size must be >= 4 (two 2x2 max-pools), got {image_size}")
        self.save_hyperparameters()
        self.input_mean, self.input_std = input_mean, input_std
        self.channels_last = channels_last
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=inplace_relu)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=inplace_relu)
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(6, 16, 3, padding=1)
        self.relu3 = nn.ReLU(inplace=inplace_relu)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * (image_size // 4) ** 2, 120)
        self.relu4 = nn.ReLU(inplace=inplace_relu)
        self.fc2 = nn.Linear(120, 100)
        self.relu5 = nn.ReLU(inplace=inplace_relu)
        self.fc3 = nn.Linear(100, num_classes)
        if conv_bias_init is not None:
            with torch.no_grad():
                for conv in (self.conv1, self.conv2, self.conv3):
                    conv.bias.fill_(conv_bias_init)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 100-d vector after FC2 and its ReLU, for images (N,1,28,28) in [0, 1]."""
        if self.input_mean is not None:
            x = (x - self.input_mean) / self.input_std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.pool1(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        x = self.pool2(self.relu3(self.conv3(x)))
        x = torch.flatten(x, 1)
        return self.relu5(self.fc2(self.relu4(self.fc1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.fc3(self.features(x))
