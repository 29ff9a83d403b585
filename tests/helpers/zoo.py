"""Foreign architectures written the way their authors write them, for tests of "works with any network".

Each entry of ``zoo()`` builds a fresh model (seeded) and an example input: 1-channel 28x28 unless its
docstring says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18


class MnistNet(nn.Module):
    """The PyTorch examples' MNIST ``Net`` (examples/mnist/main.py): functional ReLU and max-pooling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


class LeNet(nn.Module):
    """The PyTorch 60-minute blitz LeNet ("Neural Networks" tutorial); input 1x32x32."""

    def __init__(self):
        super().__init__()
        # 1 input image channel, 6 output channels, 5x5 square convolution kernel
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        # an affine operation: y = Wx + b
        self.fc1 = nn.Linear(16 * 5 * 5, 120)  # 5*5 from image dimension
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        # Max pooling over a (2, 2) window
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        # If the size is a square, you can specify with a single number
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, self.num_flat_features(x))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x

    def num_flat_features(self, x):
        size = x.size()[1:]  # all dimensions except the batch dimension
        num_features = 1
        for s in size:
            num_features *= s
        return num_features


def resnet18_grey() -> nn.Module:
    """torchvision ResNet-18 (``weights=None``, 10 classes) with the usual 1-channel stem swap."""
    model = resnet18(weights=None, num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def bare_sequential() -> nn.Module:
    """A bare ``nn.Sequential``, pooling before the first ReLU (an old habit), global average pool at the end."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class VGGBN(nn.Module):
    """A small VGG with batch norm, as torchvision's ``make_layers`` builds it (inplace ReLUs)."""

    def __init__(self, cfg=(16, 16, "M", 32, 32, "M"), num_classes=10):
        super().__init__()
        layers = []
        in_channels = 1
        for v in cfg:
            if v == "M":
                layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
            else:
                conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(32 * 7 * 7, 64),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


class BasicConv2d(nn.Module):
    """torchvision GoogLeNet's conv + BN + functional inplace ReLU."""

    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class Inception(nn.Module):
    """GoogLeNet's Inception block: parallel 1x1, 1x1-3x3, 1x1-5x5 and pool-1x1 branches, concatenated."""

    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, kernel_size=1), BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1)
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, kernel_size=1), BasicConv2d(ch5x5red, ch5x5, kernel_size=5, padding=2)
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, pool_proj, kernel_size=1),
        )

    def _forward(self, x):
        branch1 = self.branch1(x)
        branch2 = self.branch2(x)
        branch3 = self.branch3(x)
        branch4 = self.branch4(x)
        outputs = [branch1, branch2, branch3, branch4]
        return outputs

    def forward(self, x):
        outputs = self._forward(x)
        return torch.cat(outputs, 1)


class InceptionNet(nn.Module):
    """A GoogLeNet-style stem (conv 3x3 stride 2, max-pool 3 stride 2, ceil mode), two Inception blocks, a head."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = BasicConv2d(1, 16, kernel_size=3, stride=2, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(16, 8, 8, 16, 4, 8, 8)
        self.inception3b = Inception(40, 8, 8, 16, 4, 8, 8)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(40, num_classes)

    def forward(self, x):
        x = self.conv1(x)
        x = self.maxpool1(x)
        x = self.inception3a(x)
        x = self.inception3b(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class GeluSiluNet(nn.Module):
    """Modern activations: ``nn.GELU`` after the first conv, ``F.silu`` after the second; no ReLU anywhere."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.act1(self.conv1(x))
        x = F.silu(self.conv2(x))
        x = x.mean((2, 3))
        return self.head(x)


class DynamicNet(nn.Module):
    """Data-dependent Python control flow (``torch.fx`` cannot trace it): a branch on the mean brightness and a
    loop whose count comes from a tensor, applying one conv (``shared``) that many times."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bright = nn.Conv2d(8, 8, 3, padding=1)
        self.dark = nn.Conv2d(8, 8, 5, padding=2)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        image = x
        x = F.relu(self.conv1(x))
        x = self.bright(x) if image.mean() > 0.25 else self.dark(x)
        for _ in range(int(image.abs().sum() >= 0) + 1):  # always 2 steps, but only a tensor knows
            x = F.relu(self.shared(x))
        return self.fc(x.amax(dim=(2, 3)))


@dataclass(frozen=True)
class ZooModel:
    """One foreign architecture: ``build()`` gives a fresh seeded model, ``example_input()`` a probe batch."""

    build: Callable[[], nn.Module]
    input_size: int = 28

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """Images in [0, 1], (batch, 1, input_size, input_size)."""
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(batch, 1, self.input_size, self.input_size, generator=gen)

    def model(self, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build()


def zoo() -> dict[str, ZooModel]:
    """The foreign architectures by name."""
    return {
        "mnist_net": ZooModel(MnistNet),
        "lenet": ZooModel(LeNet, input_size=32),
        "resnet18": ZooModel(resnet18_grey),
        "sequential": ZooModel(bare_sequential),
        "vgg_bn": ZooModel(VGGBN),
        "inception": ZooModel(InceptionNet),
        "gelu_silu": ZooModel(GeluSiluNet),
        "dynamic": ZooModel(DynamicNet),
    }
