"""Shared LightningModule for image classifiers: loss, accuracy, optimizer/scheduler from config.

Subclasses define ``features(x)`` (the last hidden layer, what the UMAP callback embeds by default) and
``forward``. The layer API (``graph``, ``node_names``, ``relu_nodes``, ``activation_after``, ``conv_layers``,
``layer``) is a convenience over ``cnnfeat.graph``, which cnnfeat's callbacks use directly, so they work on any
``nn.Module``, not only on subclasses of this one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
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
from cnnfeat.models.parts import RepeatGrey, Resize, Standardize
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


FREEZE_CHOICES = ("none", "backbone")


def check_freeze(freeze: Any) -> bool:
    """``model.freeze``: ``none`` (everything trains) or ``backbone`` (only the head); True for ``backbone``."""
    if freeze is None or freeze is False:
        return False
    if freeze not in FREEZE_CHOICES:
        raise ConfigError(f"model.freeze must be one of {list(FREEZE_CHOICES)}, got {freeze!r}")
    return freeze == "backbone"


class NetClassifier(ImageClassifier):
    """A network ``net`` (images -> logits) as a cnnfeat classifier, whatever its layout.

    In front of ``net`` sit an optional ``resize`` (bilinear, to ``input_size``), ``to_rgb`` (grey images repeated
    to 3 channels, for an RGB network kept as it is) and ``normalize`` (per-channel standardisation), so that the model
    takes the DataModule's images in [0, 1] as they are. The *head* is the module that computes the logits (a
    network's last ``Linear``; found by the subclass); ``features(x)`` is its input, the penultimate vector (a spatial
    input, as SqueezeNet's final conv has, is averaged over its positions). The *top* is the part after the feature
    vector that transfer learning retrains: the head itself, or a block ending in it (a new MLP head).
    ``freeze=backbone`` is transfer learning: everything but the top gets ``requires_grad=False`` and stays in eval
    mode when Lightning calls ``train()``, so only the top reaches the optimizer; the model then also takes the top's
    inputs (N, D) in place of images (a frozen-feature cache) and sends them straight to the top.
    Layer names are ``net.<the network's own names>`` (``net.conv1``, ``net.features.0``).
    """

    def attach(
        self,
        net: nn.Module,
        head: str,
        in_channels: int,
        image_size: int,
        input_size: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        freeze: bool = False,
        top: str | None = None,
        grey_to_rgb: bool = False,
    ) -> None:
        """Install ``net`` with its head's and top's names (``top``: ``None`` = the head), the input modules and the
        frozen part (call once, in ``__init__``). ``grey_to_rgb``: 1-channel images enter ``net`` as 3 channels."""
        self.net, self.head_name, self.top_name, self.frozen = net, head, top or head, freeze
        if self.top_name != head and not head.startswith(f"{self.top_name}."):
            raise ValueError(f"the top {self.top_name} must hold the head {head}")  # a bug of the subclass
        self.in_channels, self.image_size = in_channels, image_size
        self.input_size = input_size or image_size
        self.resize = Resize(self.input_size) if self.input_size != image_size else None
        self.to_rgb = RepeatGrey(3) if grey_to_rgb else None
        self.normalize = Standardize(mean, std) if mean is not None and std is not None else None
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)
        if freeze:
            if not isinstance(self.head, nn.Linear):
                raise ConfigError(
                    f"model.freeze=backbone trains a Linear head on the backbone's feature vectors, but the head of "
                    f"this network ({head}) is a {type(self.head).__name__}"
                )
            for name, p in self.net.named_parameters():
                p.requires_grad_(name.startswith(f"{self.top_name}."))
            self.train(self.training)

    @property
    def head(self) -> nn.Module:
        """The module that computes the logits (``net.<head_name>``)."""
        return self.net.get_submodule(self.head_name)

    @property
    def top(self) -> nn.Module:
        """The part that takes the feature vector and ends in the head (``net.<top_name>``; the head itself, or a block
        holding it): what ``freeze=backbone`` trains."""
        return self.net.get_submodule(self.top_name)

    def train(self, mode: bool = True) -> NetClassifier:
        """With a frozen backbone, only the top follows ``mode``; everything before it stays in eval mode."""
        super().train(mode)
        if getattr(self, "frozen", False):
            self.net.train(False)
            self.top.train(mode)
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N,C,H,W) in [0, 1] -> what ``net`` takes (resized to ``input_size``, grey to RGB, standardised)."""
        if self.resize is not None:
            x = self.resize(x)
        if self.to_rgb is not None:
            x = self.to_rgb(x)
        return self.normalize(x) if self.normalize is not None else x

    def _input_of(self, module: nn.Module, run: Callable[[], object], name: str) -> torch.Tensor:
        """The input of the last call of ``module`` while ``run()`` runs, read by a forward pre-hook."""
        seen: list[torch.Tensor] = []
        handle = module.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
        try:
            run()
        finally:
            handle.remove()
        if not seen:
            raise ConfigError(f"{type(self).__name__}: net.{name} was not called by net's forward")
        return seen[-1]

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """The head's input (N, D) for images ``x``: one forward pass, read by a pre-hook on the head."""
        v = self._input_of(self.head, lambda: self.net(self.preprocess(x)), self.head_name)
        return v.mean(dim=tuple(range(2, v.ndim))) if v.ndim > 2 else v

    def top_input(self, x: torch.Tensor) -> torch.Tensor:
        """The top's input (N, D) for images ``x``: the frozen part's output, what a frozen-feature cache stores."""
        if self.top_name == self.head_name:
            return self.head_input(x)
        return self._input_of(self.top, lambda: self.net(self.preprocess(x)), self.top_name)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate vector (the head's input) for images (N,C,H,W), or (frozen backbone) for cached top inputs
        (N, D): those themselves when the top is the head, else the top's last hidden layer."""
        if self.frozen and x.ndim == 2:
            if self.top_name == self.head_name:
                return x
            return self._input_of(self.head, lambda: self.top(x), self.head_name)
        return self.head_input(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for images (N,C,H,W) in [0, 1], or (frozen backbone) for cached top inputs (N, D)."""
        if self.frozen and x.ndim == 2:
            return self.top(x)
        return self.net(self.preprocess(x))

    def frozen_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of everything before the top (what a frozen-feature cache depends on)."""
        return {k: v for k, v in self.net.state_dict().items() if not k.startswith(f"{self.top_name}.")}
