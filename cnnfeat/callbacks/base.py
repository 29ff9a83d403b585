"""What every cnnfeat picture callback shares: when to run, where pictures go, and module hygiene.

A subclass implements ``check`` (validate its arguments against the model and data before training) and
``render`` (compute pictures and numbers from a module). The base class runs ``render`` on the untrained
network (step 0) and every ``every_n_epochs`` epochs (step = epochs trained), under ``torch.no_grad()``
with every submodule's train/eval mode restored afterwards, never during the sanity check; it writes
images to TensorBoard from rank zero (warning once when there is no TensorBoard logger) and optionally
as PNG files, and logs scalars through ``pl_module.log``. ``render`` is public so that other tools
(``cnnfeat-explore``) can draw the same pictures from a checkpoint without a Trainer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from typing_extensions import override

from cnnfeat import viz

log = logging.getLogger("cnnfeat")


@dataclass
class Pictures:
    """What one ``render`` produced: RGB images (3,H,W) in [0,1], scalars, histograms and text, by tag."""

    images: dict[str, torch.Tensor] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, torch.Tensor] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)

    def write(self, writer: SummaryWriter | None, step: int, png_dir: Path | None = None, scalars: bool = True) -> None:
        """Send everything to ``writer`` (if any) and images to ``png_dir/<tag>/step_NNN.png`` (if set)."""
        if writer is not None:
            for tag, img in self.images.items():
                writer.add_image(tag, img, step, dataformats="CHW")
            for tag, values in self.histograms.items():
                writer.add_histogram(tag, values, step)
            for tag, text in self.texts.items():
                writer.add_text(tag, text, step)
            if scalars:
                for tag, value in self.scalars.items():
                    writer.add_scalar(tag, value, step)
        if png_dir is not None:
            for tag, img in self.images.items():
                viz.save_png(img, png_dir / tag / f"step_{step:03d}.png")


@contextmanager
def inference(module: nn.Module) -> Iterator[None]:
    """``torch.no_grad`` and eval mode inside; afterwards every submodule gets its own mode back.

    Restoring each submodule (not just calling ``train()``) keeps frozen backbones in eval mode.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def sync_epoch_metrics(trainer: pl.Trainer) -> None:
    """Under DDP, compute the epoch's logged metrics on every rank now.

    Rank 0's progress bar computes them (an all-gather) in ``on_train_epoch_end``; a callback that runs a
    collective of its own in the same hook must let the other ranks join that gather first, or the two
    collectives pair up across ranks and the run hangs.
    """
    if trainer.world_size > 1:
        _ = trainer.callback_metrics


def tensorboard_writer(trainer: pl.Trainer) -> SummaryWriter | None:
    """The SummaryWriter of the trainer's TensorBoardLogger, or None."""
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            return lg.experiment
    return None


def probe_images(
    datamodule: pl.LightningDataModule, split: str, ids: Sequence[int] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images in [0,1] and labels for image IDs of a split.

    Uses the datamodule's ``images(split, ids)`` when it has one (cnnfeat's does); otherwise indexes the
    dataset behind ``<split>_dataloader()``, which must return ``(image tensor, label)`` pairs.
    """
    if hasattr(datamodule, "images"):
        return datamodule.images(split, ids)
    ds = getattr(datamodule, f"{split}_dataloader")().dataset
    xs, ys = zip(*(ds[int(i)] for i in ids), strict=True)
    x = torch.stack([torch.as_tensor(v) for v in xs])
    if x.dtype == torch.uint8:
        x = x.float() / 255
    return x, torch.as_tensor(ys)


def model_inputs(datamodule: pl.LightningDataModule, split: str, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """What the model consumes for these image IDs: the datamodule's ``inputs(split, ids)`` when it has one
    (e.g. cached frozen-backbone features), otherwise the images themselves."""
    if hasattr(datamodule, "inputs"):
        return datamodule.inputs(split, ids)
    return probe_images(datamodule, split, ids)[0]


def split_size(datamodule: pl.LightningDataModule, split: str) -> int:
    """Number of images in a split of the datamodule (after ``setup``)."""
    if hasattr(datamodule, "dataset"):
        return len(datamodule.dataset(split))
    return len(getattr(datamodule, f"{split}_dataloader")().dataset)


def class_names(datamodule: pl.LightningDataModule | None, n: int) -> list[str]:
    """The datamodule's ``classes`` if it has them, else ``"0" .. "n-1"``."""
    names = getattr(datamodule, "classes", None)
    return list(names) if names is not None else [str(i) for i in range(n)]


def check_ids(ids: Sequence[int], size: int, what: str = "image_ids") -> None:
    """Raise a clear error for IDs outside ``[0, size)``."""
    bad = [i for i in ids if not 0 <= int(i) < size]
    if bad:
        raise ValueError(f"{what} {bad} out of range: the probe split has {size} images (valid IDs 0..{size - 1})")


class VisualizationCallback(pl.Callback):
    """Base class: schedule, output and module hygiene for picture callbacks (see the module docstring).

    Args:
        every_n_epochs: render after every N-th epoch (and after the last one).
        log_untrained: also render before training (step 0, the untrained network).
        save_png: also write every image as a PNG under ``<run dir>/images/<tag>/step_NNN.png``.
        during_training: ``False`` renders only before training: for layers that are frozen.

    Under DDP every process renders (a callback may gather work across processes, as top patches do)
    unless ``rank_zero_render`` is set, for work that needs no other process (UMAP); images are written
    by rank 0 only.
    """

    #: render on rank 0 only; its scalars are then logged from rank 0 without syncing
    rank_zero_render: bool = False

    def __init__(
        self, every_n_epochs: int = 1, log_untrained: bool = True, save_png: bool = False, during_training: bool = True
    ) -> None:
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        self.every_n_epochs = every_n_epochs
        self.log_untrained = log_untrained
        self.save_png = save_png
        self.during_training = during_training
        self._warned = False
        #: wall seconds of each emission (render + write), for cost accounting in benchmarks
        self.seconds: list[float] = []

    # -- to implement --------------------------------------------------------------------------------
    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validate arguments against the model and data; raise ``ValueError`` with a clear message."""

    def render(
        self, pl_module: pl.LightningModule, datamodule: pl.LightningDataModule | None, step: int = 0
    ) -> Pictures:
        """Compute the pictures for ``step`` (epochs trained) under ``inference``; must not change the module."""
        raise NotImplementedError

    # -- Lightning hooks -----------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_untrained and trainer.current_epoch == 0 and trainer.global_step == 0:
            self._emit(trainer, pl_module, step=0)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync_epoch_metrics(trainer)
        if not self.during_training:
            return
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.every_n_epochs == 0 or last:
            self._emit(trainer, pl_module, step=epoch)

    # -- plumbing ------------------------------------------------------------------------------------
    def require_datamodule(self, trainer: pl.Trainer) -> pl.LightningDataModule:
        """The trainer's datamodule (where probe images come from); a clear error when there is none."""
        if trainer.datamodule is None:
            raise ValueError(
                f"{type(self).__name__} reads its probe images from the datamodule: pass one to the Trainer"
            )
        return trainer.datamodule

    def check_probe_size(self, trainer: pl.Trainer, split: str, probe_size: int | None) -> None:
        """Refuse a probe set larger than the split it is drawn from."""
        n = split_size(self.require_datamodule(trainer), split)
        if probe_size is not None and probe_size > n:
            raise ValueError(f"probe_size={probe_size} is larger than the {split} split ({n} images)")

    def should_render(self, trainer: pl.Trainer) -> bool:
        """Rendering is pointless without a destination; subclasses with scalars override this."""
        return tensorboard_writer(trainer) is not None or self.save_png

    def _writer(self, trainer: pl.Trainer) -> SummaryWriter | None:
        writer = tensorboard_writer(trainer)
        if writer is None and not self._warned:
            rank_zero_warn(
                f"{type(self).__name__}: no TensorBoardLogger on the trainer, so its pictures are not "
                "logged to TensorBoard (save_png=true writes images as PNG files)."
            )
            self._warned = True
        return writer

    def png_dir(self, trainer: pl.Trainer) -> Path | None:
        return Path(trainer.log_dir or trainer.default_root_dir) / "images" if self.save_png else None

    def _emit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        if trainer.sanity_checking:
            return
        png_dir = self.png_dir(trainer)  # trainer.log_dir is a broadcast under DDP: every rank must ask
        if self.rank_zero_render and not trainer.is_global_zero:
            return
        start = time.perf_counter()
        writer = self._writer(trainer)
        if not self.should_render(trainer):
            return
        with inference(pl_module):
            pictures = self.render(pl_module, trainer.datamodule, step)
        on_epoch_end = step > 0
        if on_epoch_end:  # through Lightning: any logger, callback_metrics, all ranks take part
            for tag, value in pictures.scalars.items():
                pl_module.log(
                    tag,
                    value,
                    on_step=False,
                    on_epoch=True,
                    sync_dist=not self.rank_zero_render,
                    rank_zero_only=self.rank_zero_render,
                )
        if trainer.is_global_zero:
            # the untrained network has no Lightning step, so its scalars go to TensorBoard at step 0
            pictures.write(writer, step, png_dir, scalars=not on_epoch_end)
        self.seconds.append(time.perf_counter() - start)
