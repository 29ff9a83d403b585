"""Shared LightningModule for image classifiers: loss, accuracy, optimizer/scheduler from config.

Subclasses define ``features(x)`` (the last hidden layer, what the UMAP callback embeds by default) and
``forward``. The layer API (``graph``, ``node_names``, ``relu_nodes``, ``activation_after``, ``conv_layers``,
``layer``) is a convenience over ``cnnfeat.graph``, which cnnfeat's callbacks use directly, so they work on any
``nn.Module``, not only on subclasses of this one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from cnnfeat import graph as cgraph
from cnnfeat import layers
from cnnfeat.errors import ConfigError
from cnnfeat.models import optim
from cnnfeat.run import lightning_api as pl
from cnnfeat.run.rng import rng_states, set_rng_states

DEFAULT_OPTIMIZER: dict[str, Any] = {"_target_": "torch.optim.SGD", "lr": 0.2}
DEFAULT_SCHEDULER: dict[str, Any] = {
    "_target_": "torch.optim.lr_scheduler.MultiStepLR",
    "milestones": [2, 5, 8, 11, 14],
    "gamma": 0.5,
}


def plain(cfg: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists, so hparams (and checkpoints) hold primitives only."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_list(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def check_optimizer_spec(spec: Mapping[str, Any]) -> None:
    """Fail fast (before any training) on an optimizer spec that is not a ``torch.optim`` class or has lr <= 0."""
    optim.check_spec(spec, "optimizer", "model.optimizer")
    lr = spec.get("lr")
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"model.optimizer.lr must be a positive number, got {lr!r}")


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier with torchmetrics accuracy and config-built optimizer and scheduler.

    ``optimizer`` and ``scheduler`` are Hydra-style specs (``{"_target_": "torch.optim.SGD", "lr": 0.2}``), looked
    up and checked by :mod:`cnnfeat.models.optim` (only ``torch.optim`` classes; nothing is imported);
    the optimizer gets the trainable parameters, the scheduler the optimizer, and it steps once per epoch.
    ``scheduler=None`` keeps the learning rate constant.
    """

    def __init__(
        self,
        num_classes: int = 10,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = DEFAULT_SCHEDULER,
    ) -> None:
        super().__init__()
        self.optimizer_spec = dict(plain(optimizer) or DEFAULT_OPTIMIZER)
        self.scheduler_spec = dict(plain(scheduler)) if scheduler else None
        check_optimizer_spec(self.optimizer_spec)
        if self.scheduler_spec is not None:
            optim.check_spec(self.scheduler_spec, "scheduler", "model.scheduler")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes, average="micro", validate_args=False))
            setattr(self, f"{stage}_loss", MeanMetric())
        self._to_register: set[str] = set()

    # -- the public feature API ----------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer's output (N, D) for images ``x`` (N,C,H,W) in [0, 1]."""
        raise NotImplementedError

    def graph(self, x: torch.Tensor | None = None) -> cgraph.Graph:
        """The nodes of one forward pass on ``x`` (default: ``example_input_array``), see ``cnnfeat.graph``."""
        return cgraph.trace_graph(self, (self.example_input_array if x is None else x).to(self.device))

    def node_names(self) -> list[str]:
        """Every node name the callbacks accept (module calls, functional ops, ``name:k`` for repeated calls)."""
        return self.graph().names

    def relu_nodes(self) -> list[str]:
        """Every application of a ReLU-family activation, in execution order (what dead-unit counts cover)."""
        return cgraph.relu_family_nodes(self.graph())

    def conv_layers(self) -> dict[str, nn.Conv2d]:
        """Conv modules by name (names as in ``named_modules()``)."""
        return layers.conv_layers(self)

    def relu_layers(self) -> dict[str, nn.Module]:
        """ReLU-type activation modules by name."""
        return layers.relu_layers(self)

    def layer(self, name: str) -> nn.Module:
        """Resolve one module by name; an unknown name raises a ``LayerError`` listing the valid ones."""
        return layers.resolve_layers(self, [name])[name]

    def activation_after(self) -> dict[str, str | None]:
        """Each conv call -> the node of the first activation applied to its output (or ``None``), on the graph."""
        g = self.graph()
        return {conv: cgraph.activation_after(g, conv)[0] for conv in cgraph.conv_nodes(g)}

    # -- training ------------------------------------------------------------------------------------
    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc, mean_loss = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_loss")
        acc.update(logits.detach(), y)
        mean_loss.update(loss.detach(), weight=y.numel())
        # Register the metric objects with Lightning once per epoch: it keeps the reference, calls compute()
        # (synced across DDP ranks) at epoch end and resets them. self.log costs ~1 ms per call on CPU, which
        # per step would be 10-20% of this small network's training time.
        if stage in self._to_register:
            self._to_register.discard(stage)
            self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage != "test")
            self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True)
        return loss

    # Subclasses overriding these epoch-start hooks must call super(): they arm the once-per-epoch logging.
    def on_train_epoch_start(self) -> None:
        self._to_register.add("train")

    def on_validation_epoch_start(self) -> None:
        self._to_register.add("val")

    def on_test_epoch_start(self) -> None:
        self._to_register.add("test")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(dim=1)

    # -- checkpoints: exact resume -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the RNG states: the next epoch's shuffle (and dropout) depend on them."""
        checkpoint["rng_states"] = rng_states()
        checkpoint["cnnfeat_model"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """When resuming a fit, continue from the saved RNG states (``load_from_checkpoint`` leaves them alone)."""
        if "rng_states" in checkpoint and self._trainer is not None and self.trainer.state.fn == "fit":
            set_rng_states(checkpoint["rng_states"])

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = optim.build_optimizer(self.optimizer_spec, params, "model.optimizer")
        if self.scheduler_spec is None:  # a constant rate, still logged as "lr"
            scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        else:
            scheduler = optim.build_scheduler(self.scheduler_spec, optimizer, "model.scheduler")
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "name": "lr"},
        }
