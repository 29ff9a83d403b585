"""cnnfeat's DataModule and picture callbacks on a LightningModule of your own (not a cnnfeat model).

The callbacks name layers as nodes of one forward pass (``cnnfeat.graph.graph_node_names(model, x)`` lists
them: module paths, functional ops such as ``relu`` or ``max_pool2d``, ``name:1`` for a module's second
call); they find each conv's activation (module or functional, any kind) on the graph, and embed
``features(x)`` when the module has it, or any node given as ``EmbeddingCallback(layer=...)``. Probe
images come from the DataModule's test split (or validation, when the test set only exists for testing),
shown un-normalised when its transform has a torchvision ``Normalize``.

    python examples/own_model.py --epochs 2 --out outputs/examples/own_model
    tensorboard --logdir outputs/examples/own_model
"""

from __future__ import annotations

import argparse
import os
from collections import OrderedDict

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from cnnfeat.callbacks import (
    DeadReluCallback,
    EmbeddingCallback,
    EpochSummary,
    FeatureMapCallback,
    FilterCallback,
    TopPatchesCallback,
)
from cnnfeat.data.fashion_mnist import FashionMNISTDataModule


def block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(c_in, c_out, 3, padding=1), relu=nn.ReLU(), pool=nn.MaxPool2d(2)))


class TinyVGG(pl.LightningModule):
    """Two conv blocks and a 64-d hidden layer; layer names: block1.conv, block1.relu, ..., fc, fc_relu."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.block1, self.block2 = block(1, 8), block(8, 16)
        self.fc, self.fc_relu, self.out = nn.Linear(16 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 64-d hidden vector (what the UMAP callback maps)."""
        return self.fc_relu(self.fc(torch.flatten(self.block2(self.block1(x)), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (default: all)")
    p.add_argument("--probe", type=int, default=2000, help="probe images for dead ReLUs, top patches and UMAP")
    p.add_argument("--out", default="outputs/examples/own_model")
    p.add_argument("--data-dir", default=os.environ.get("CNNFEAT_DATA"))
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args()

    pl.seed_everything(0)
    convs = ["block1.conv", "block2.conv"]
    callbacks = [
        FilterCallback(layers=convs),
        FeatureMapCallback(layers=convs),
        DeadReluCallback(probe_size=args.probe),
        TopPatchesCallback(layers=convs, probe_size=args.probe, every_n_epochs=1),
        EmbeddingCallback(probe_size=args.probe),
        EpochSummary(),
    ]
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        limit_train_batches=args.limit_batches,
        accelerator="auto",
        logger=TensorBoardLogger(args.out, name="", version=""),
        callbacks=callbacks,
        default_root_dir=args.out,
        enable_model_summary=False,
    )
    datamodule = FashionMNISTDataModule(data_dir=args.data_dir, cache_dir=args.cache_dir)
    trainer.fit(TinyVGG(), datamodule=datamodule)
    print(f"done: tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
