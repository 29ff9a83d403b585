"""FeatureVisCallback: a hand-built unit with a known optimum through a real Trainer into TensorBoard, flags that are
shown and never hidden, the transfer model's RGB 224 inputs, and every bad argument's message."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cnnfeat.callbacks.base import inference
from cnnfeat.callbacks.featviz import FeatureVisCallback
from cnnfeat.errors import ConfigError
from cnnfeat.probe import ProbeSpec, probe_from_datamodule, probe_from_tensors
from tests.conftest import read_events
from tests.helpers.zoo import zoo

SIDE = 21


def edge_filter(k: int = 7, degrees: float = 30.0) -> torch.Tensor:
    """A k x k step edge at ``degrees``: +1 on one side, -1 on the other (no pixel on the edge line)."""
    r = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    i, j = torch.meshgrid(r, r, indexing="ij")
    side = j * math.cos(math.radians(degrees)) + i * math.sin(math.radians(degrees)) + 0.25
    return torch.where(side > 0, 1.0, -1.0)


class EdgeNet(pl.LightningModule):
    """A frozen conv whose one filter is an oriented edge (unit ``edge``, channel 0), a dead twin (channel 1: a bias
    no [0, 1] image can overcome), and a trainable head so that there is something to fit."""

    def __init__(self) -> None:
        super().__init__()
        self.edge = nn.Conv2d(1, 2, 7)
        w = edge_filter()
        with torch.no_grad():
            self.edge.weight.copy_(torch.stack([w, w])[:, None])
            self.edge.bias.copy_(torch.tensor([0.0, -100.0]))
        self.edge.requires_grad_(False)
        self.relu = nn.ReLU()
        self.head = nn.Linear(2 * 15 * 15, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.edge(x)).flatten(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.01)


class RandomImages(pl.LightningDataModule):
    """Uniform [0, 1] images, 21x21, with two labels: the probe is their test split."""

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.rand(64, 1, SIDE, SIDE, generator=g), torch.randint(0, 2, (64,), generator=g))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def test_known_optimum_through_a_trainer_into_tensorboard(tmp_path: Path) -> None:
    cb = FeatureVisCallback(layers=["edge"], settings={"steps": 128}, every_n_epochs=1, class_names=["a", "b"])
    trainer = pl.Trainer(
        max_epochs=1,
        logger=TensorBoardLogger(str(tmp_path), name="", version=""),
        callbacks=[cb],
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(EdgeNet(), datamodule=RandomImages())

    result = cb.last_results["edge"]
    w = edge_filter()
    (r, c) = result.targets[0].tolist()  # the output position the neuron objective read (centre or best real)
    patch = result.images[0, 0, r : r + 7, c : c + 7]  # that unit's 7x7 receptive field (no padding, stride 1)
    assert pearson(patch, w) > 0.9, "the optimum of an edge detector over [0, 1] images is the edge itself"
    assert float(result.activation[0]) >= 0.95 * float(w.clamp(min=0).sum())
    assert float(result.fidelity[0]) >= 1.0 and not bool(result.flagged[0])

    ev = read_events(tmp_path)
    steps = [e.step for e in ev["images"]["featviz/edge"]]
    assert steps == [0, 1], "the untrained network, then after each epoch: the one step axis"
    assert ev["images"]["featviz/edge"][0].width > 2 * 56, "both units, side by side"
    share = dict(ev["scalars"]["featviz/fidelity_share/edge"])
    assert share == {0: 0.5, 1: 0.5}, "the edge unit reaches its best real patch, the dead twin cannot"
    assert [s for s, _ in ev["scalars"]["featviz/seconds_per_unit/edge"]] == [0, 1]
    table = ev["tensors"]["featviz/edge/table/text_summary"][-1].tensor_proto.string_val[0].decode()
    assert "| 1 |" in table and "| nan | yes |" in table, "the dead unit is listed and flagged, not hidden"


def test_flagged_units_are_marked_on_the_picture() -> None:
    model = EdgeNet()
    images = torch.rand(32, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    probe = probe_from_tensors(images, torch.zeros(32, dtype=torch.long), class_names=["a"])
    cb = FeatureVisCallback(layers=["edge"], settings={"steps": 16})
    cb.prepare(model, probe)
    with inference(model):
        pictures = cb.render(model, probe, 3)
    result = cb.last_results["edge"]
    assert result.flagged.tolist() == [False, True] and math.isnan(float(result.fidelity[1]))
    assert cb.picture(result).shape == pictures.images["featviz/edge"].shape
    assert pictures.scalars["featviz/fidelity_share/edge"] == 0.5


def test_transfer_model_gets_rgb_224_inputs_of_its_frozen_backbone(datamodule) -> None:
    from cnnfeat.models import TransferClassifier
    from cnnfeat.models.alexnet import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    model = TransferClassifier(weights="none")
    probe = probe_from_datamodule(datamodule, ProbeSpec(max_images=8))
    cb = FeatureVisCallback(
        layers=["backbone.conv1"],
        units=[0, 5],
        settings={"steps": 3},
        at_real_best=False,
        input_module="backbone",
        input_mean=list(IMAGENET_MEAN),
        input_std=list(IMAGENET_STD),
        batch_size=8,
    )
    cb.prepare(model, probe)
    with inference(model):
        pictures = cb.render(model, probe, 0)
    result = cb.last_results["backbone.conv1"]
    assert result.images.shape == (2, 3, 224, 224) and result.units.tolist() == [0, 5]
    assert result.reference is not None and torch.isfinite(result.reference).all(), "real best from the same space"
    assert pictures.images["featviz/backbone.conv1"].shape[0] == 3
    assert all(not p.requires_grad for p in model.backbone.parameters()), "the frozen backbone stays frozen"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_units": 0}, "max_units must be an integer >= 1, got 0"),
        ({"units": []}, "units must be a non-empty list of indices >= 0"),
        ({"input_module": "backbone"}, "input_module needs input_mean and input_std"),
        ({"settings": {"objective": "mean"}}, "objective must be one of"),
        ({"settings": {"lr": -1}}, "lr must be > 0"),
        ({"settings": {"decay": 1}}, r"unknown feature-visualisation setting\(s\) \['decay'\]"),
        ({"probe_size": 0}, "probe_size must be >= 1 or null"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FeatureVisCallback(**kwargs)


def test_bad_layers_and_units_are_refused_before_training() -> None:
    model = EdgeNet()
    probe = probe_from_tensors(torch.rand(8, 1, SIDE, SIDE), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"Unknown layer name\(s\) \['conv9'\].*valid names: \['edge'"):
        FeatureVisCallback(layers=["conv9"]).prepare(model, probe)
    with pytest.raises(ConfigError, match=r"units \[2\] out of range for 'edge', which has 2 \(valid 0..1\)"):
        FeatureVisCallback(layers=["edge"], units=[0, 2]).prepare(model, probe)
    mnist = zoo()["mnist_net"].model()
    small = probe_from_tensors(torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ConfigError, match="needs a module node; 'relu' is a functional op of MnistNet"):
        FeatureVisCallback(layers=["relu"]).prepare(mnist, small)
    scaled = probe_from_tensors(torch.rand(8, 1, SIDE, SIDE), torch.zeros(8, dtype=torch.long))
    object.__setattr__(scaled, "inputs", scaled.images**2)  # not an affine map of the display images
    with pytest.raises(ConfigError, match="not a per-channel affine map of the display images"):
        FeatureVisCallback(layers=["edge"]).prepare(model, scaled)
