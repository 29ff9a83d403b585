"""A Trainer whose checkpoints are large (hundreds of MB), saved every epoch through cnnfeat's checkpoint I/O.

``python tests/helpers/big_checkpoint_run.py RUN_DIR [MEGABYTES]``: the kill-while-saving test starts this,
waits for a save to begin (its temporary file appears) and SIGKILLs it.
"""

from __future__ import annotations

import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from cnnfeat.run.checkpoint_io import AtomicCheckpointIO


class Big(pl.LightningModule):
    def __init__(self, megabytes: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(megabytes * 262_144))  # 4 bytes each

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return ((self.w[:16] - batch[0][:, :16]) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    run_dir, mb = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 400
    data = DataLoader(TensorDataset(torch.randn(8, 16)), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=1000,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=run_dir, filename="last", monitor=None, enable_version_counter=False)],
    )
    trainer.fit(Big(mb), data)
