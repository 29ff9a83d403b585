"""Zoo networks in a minimal LightningModule, and a DataModule written as Lightning's tutorials write one."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchvision import transforms
from torchvision.datasets import FashionMNIST


class Padded(nn.Module):
    """``net`` behind a zero-padding of 28x28 images to its ``input_size`` (LeNet's 32)."""

    def __init__(self, net: nn.Module, input_size: int = 28) -> None:
        super().__init__()
        self.net, self.pad = net, (input_size - 28) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (self.pad,) * 4)
        return self.net(x)


class ZooModule(pl.LightningModule):
    """A foreign ``nn.Module`` as ``self.net`` (behind ``Padded``'s padding) with cross-entropy and SGD: every node
    name starts with ``net.``, and ``Padded(module.net, input_size)`` computes the same function."""

    def __init__(self, net: nn.Module, input_size: int = 28, lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.pad, self.lr = net, (input_size - 28) // 2, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Padded.forward(self, x)  # type: ignore[arg-type]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def torchvision_root(data_dir: Path, root: Path) -> Path:
    """A writable torchvision root: the four gzip files decompressed into ``root/FashionMNIST/raw``.

    torchvision reads the raw IDX files there; the shared data directory is read-only, so it cannot be the root.
    """
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in sorted((data_dir / "FashionMNIST" / "raw").glob("*.gz")):
        with gzip.open(gz) as src, (raw / gz.stem).open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


class TutorialFashionMNIST(pl.LightningDataModule):
    """As Lightning's docs write a DataModule: torchvision ``FashionMNIST`` with ``ToTensor`` + ``Normalize``, a
    seeded ``random_split`` for validation, the test set built only in ``setup("test")``, no ``classes``."""

    def __init__(self, data_dir: str | Path, batch_size: int = 32) -> None:
        super().__init__()
        self.data_dir, self.batch_size = str(data_dir), batch_size
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])

    def prepare_data(self) -> None:
        FashionMNIST(self.data_dir, train=True)
        FashionMNIST(self.data_dir, train=False)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            full = FashionMNIST(self.data_dir, train=True, transform=self.transform)
            self.fmnist_train, self.fmnist_val = random_split(
                full, [55000, 5000], generator=torch.Generator().manual_seed(42)
            )
        if stage == "test":
            self.fmnist_test = FashionMNIST(self.data_dir, train=False, transform=self.transform)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.fmnist_train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.fmnist_val, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.fmnist_test, batch_size=self.batch_size)
