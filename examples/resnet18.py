"""cnnfeat's pictures of a network it did not write: torchvision's ResNet-18, as people adapt it to grey images.

The model is ``torchvision.models.resnet18(weights=None, num_classes=10)`` with the usual 1-channel stem swap,
wrapped in a minimal LightningModule; nothing in it was written for cnnfeat. Its blocks are conv -> BatchNorm ->
ReLU, and each ``BasicBlock`` calls one inplace ``self.relu`` twice. The callbacks see the forward pass as a
graph: "after ReLU" of ``layer1.0.conv1`` is found through its BatchNorm (``layer1.0.relu``), the second call of
the shared ReLU is the node ``layer1.0.relu:1`` (counted separately by the dead-unit callback), and the top
patches of ``layer2.1.conv1`` are cut by a receptive field composed over the residual paths.

    python examples/resnet18.py --limit-batches 200 --out outputs/examples/resnet18   # README pictures, 48 s
    python examples/resnet18.py --out outputs/examples/resnet18          # a whole epoch
    tensorboard --logdir outputs/examples/resnet18
"""

from __future__ import annotations

import argparse
import os

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torchvision.models import resnet18

from cnnfeat.callbacks import DeadReluCallback, FeatureMapCallback, FilterCallback, TopPatchesCallback
from cnnfeat.data.fashion_mnist import FashionMNISTDataModule

CONVS = ["conv1", "layer1.0.conv1", "layer2.1.conv1"]


class ResNetClassifier(pl.LightningModule):
    """torchvision ResNet-18 (1-channel stem, 10 classes) trained with SGD + momentum."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = resnet18(weights=None, num_classes=10)
        self.net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (default: all)")
    p.add_argument("--probe", type=int, default=2000, help="probe images for dead ReLUs and top patches")
    p.add_argument("--out", default="outputs/examples/resnet18")
    p.add_argument("--data-dir", default=os.environ.get("CNNFEAT_DATA"))
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args()

    pl.seed_everything(0)
    # the wrapper's layers are "net.<torchvision name>"
    layers = [f"net.{c}" for c in CONVS]
    callbacks = [
        FilterCallback(layers=["net.conv1"], save_png=True),
        FeatureMapCallback(layers=layers[1:], image_ids=[22, 193], channels=list(range(8)), save_png=True),
        DeadReluCallback(probe_size=args.probe),
        TopPatchesCallback(layers=layers[1:], probe_size=args.probe, max_channels=8, save_png=True),
    ]
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.limit_batches,
        limit_val_batches=10,
        accelerator="auto",
        logger=TensorBoardLogger(args.out, name="", version=""),
        callbacks=callbacks,
        default_root_dir=args.out,
        enable_model_summary=False,
    )
    trainer.fit(ResNetClassifier(), datamodule=FashionMNISTDataModule(data_dir=args.data_dir, cache_dir=args.cache_dir))
    print(f"done: {args.out}/images (PNGs), tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
