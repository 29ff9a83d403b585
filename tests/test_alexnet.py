"""The original frozen-AlexNet route (model=alexnet: TransferClassifier, FrozenAlexNet), its weights, its feature cache
and its layers (random weights). experiment=transfer now runs through model=torchvision: tests/test_transfer_freeze.py
checks that it gives this route's numbers, and runs it end to end with every picture."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torchvision.models import alexnet

from cnnfeat import layers
from cnnfeat.callbacks.shape_table import shape_table
from cnnfeat.data import feature_cache
from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.data.feature_cache import FrozenFeatureDataModule
from cnnfeat.errors import ConfigError
from cnnfeat.models import SmallCNN, TransferClassifier
from cnnfeat.models.alexnet import FrozenAlexNet, WeightsError, imagenet_weights_file
from cnnfeat.probe import ProbeSpec, check_batch_inputs
from cnnfeat.receptive_field import receptive_fields

CONVS = [f"backbone.conv{i}" for i in range(1, 6)]


@pytest.fixture(scope="module")
def model() -> TransferClassifier:
    return TransferClassifier(weights="none")


def test_receptive_fields_of_alexnet_layers_1_to_5(model: TransferClassifier) -> None:
    rf = receptive_fields(model, torch.zeros(1, 1, 28, 28), CONVS)
    assert [f.size[0] for f in rf.values()] == [11, 51, 99, 131, 163]
    assert [f.jump[0] for f in rf.values()] == [4, 8, 16, 16, 16]
    assert {f.frame for f in rf.values()} == {"resize"}, "coordinates are those of the 224x224 resized image"
    assert rf["backbone.conv1"].box(0, 0) == (-2, -2, 8, 8)  # padding 2


def test_shape_table_is_the_lectures(model: TransferClassifier) -> None:
    rows = shape_table(model.backbone, [1, 3, 224, 224])
    convs = [s for _, t, s in rows if t == "Conv2d"]
    assert convs == [(1, 64, 55, 55), (1, 192, 27, 27), (1, 384, 13, 13), (1, 256, 13, 13), (1, 256, 13, 13)]
    assert [t for _, t, _ in rows][:3] == ["Conv2d", "ReLU", "MaxPool2d"] and rows[-1][2] == (1, 256, 6, 6)


def test_inplace_relus_do_not_overwrite_the_captured_conv_output(model: TransferClassifier) -> None:
    assert model.backbone.relu1.inplace, "torchvision's AlexNet ReLUs are inplace: the trap we guard against"
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad(), layers.capture(model, ["backbone.conv1", "backbone.relu1"]) as out:
        model(x)
    pre, post = out["backbone.conv1"], out["backbone.relu1"]
    assert (pre < 0).any() and not torch.equal(pre, post)
    assert torch.equal(post, pre.clamp(min=0))


def test_only_the_head_trains_and_the_backbone_stays_frozen_in_eval(datamodule: FashionMNISTDataModule) -> None:
    model = TransferClassifier(weights="none", hidden=[64], optimizer={"_target_": "torch.optim.SGD", "lr": 0.05})
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.classifier.weight.clone()
    optimizer = model.configure_optimizers()["optimizer"]
    trainable = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trainable == {id(p) for p in [*model.hidden.parameters(), *model.classifier.parameters()]}
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)  # on images: the backbone runs, frozen, every step
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert not torch.equal(head_before, model.classifier.weight), "the head did train"
    assert model.training and not model.backbone.training and not any(m.training for m in model.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_missing_imagenet_weights_say_where_to_put_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(
        "torchvision.models.AlexNet_Weights.IMAGENET1K_V1.value.url",
        "http://127.0.0.1:9/alexnet-owt-7be5be79.pth",
        raising=False,
    )
    with pytest.raises(WeightsError) as e:
        TransferClassifier(weights="imagenet")
    msg = str(e.value)
    assert "alexnet-owt-7be5be79.pth" in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert "model.weights=/path/to/alexnet.pth" in msg and "model.weights=none" in msg
    assert imagenet_weights_file().parent == tmp_path / "torch" / "hub" / "checkpoints"


def test_local_weights_file_loads_and_bad_files_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = alexnet(weights=None)
    good = tmp_path / "alexnet.pth"
    torch.save(reference.state_dict(), good)
    model = TransferClassifier(weights=str(good))
    assert torch.equal(model.backbone.conv5.weight, reference.features[10].weight)

    torch.save(SmallCNN().state_dict(), tmp_path / "small.pth")
    with pytest.raises(WeightsError, match=r"not an AlexNet state dict: no 'features\.\*' keys"):
        TransferClassifier(weights=str(tmp_path / "small.pth"))
    state = reference.state_dict()
    state["features.0.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "wrong_shape.pth")
    with pytest.raises(WeightsError, match=r"do not fit AlexNet's convolutional layers"):
        TransferClassifier(weights=str(tmp_path / "wrong_shape.pth"))
    with pytest.raises(WeightsError, match=r"no such file"):
        TransferClassifier(weights=str(tmp_path / "nope.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"could not be loaded as a weights-only state dict"):
        TransferClassifier(weights=str(tmp_path / "garbage.pth"))


def test_feature_cache_is_computed_once_and_matches_the_backbone(data_dir: Path, cache_dir: Path) -> None:
    dm = FrozenFeatureDataModule(
        FrozenAlexNet("none"), data_dir=data_dir, cache_dir=cache_dir, max_images=64, download=False
    )
    dm.prepare_data()
    path = dm.cache_file("test")
    stamp = path.stat().st_mtime_ns
    dm.prepare_data()
    assert path.stat().st_mtime_ns == stamp, "a cached split is not extracted again"
    dm.setup()
    model = TransferClassifier(weights="none").eval()
    x, _ = dm.images("test", [0, 5, 63])
    expected = model.backbone_features(x)
    cached = dm.inputs("test", [0, 5, 63])
    assert torch.allclose(cached, expected, rtol=2e-3, atol=2e-3)  # stored as float16
    assert torch.allclose(model(cached), model(x), rtol=1e-2, atol=1e-2)

    other = FrozenFeatureDataModule(
        FrozenAlexNet("none", seed=1), data_dir=data_dir, cache_dir=cache_dir, max_images=64, download=False
    )
    assert other.cache_file("test") != path, "another backbone gets another cache entry"


def test_model_and_cache_share_one_backbone_and_a_mismatch_is_refused(data_dir: Path, cache_dir: Path) -> None:
    """The data code knows no model class; the probe checks that the cached vectors are the model's own."""
    assert not [v for v in vars(feature_cache).values() if isinstance(v, type) and issubclass(v, pl.LightningModule)]
    model = TransferClassifier(weights="none", input_size=64).eval()
    assert (
        model.fingerprint() == FrozenAlexNet("none", 0, 64).fingerprint() != FrozenAlexNet("none", 1, 64).fingerprint()
    )
    for seed, ok in ((0, True), (1, False)):
        dm = FrozenFeatureDataModule(
            FrozenAlexNet("none", seed, 64),
            data_dir=data_dir,
            cache_dir=cache_dir,
            max_images=16,
            download=False,
        )
        dm.prepare_data()
        dm.setup()
        probe = dm.probe_set(ProbeSpec())
        x, y = dm.images("test")
        assert torch.equal(probe.images, x) and torch.equal(probe.inputs, x) and torch.equal(probe.labels, y)
        assert torch.equal(probe.batch_inputs, dm.inputs("test", range(16)))
        with torch.no_grad():
            if ok:
                check_batch_inputs(model, probe)
            else:
                with pytest.raises(ConfigError, match=r"cached frozen-backbone features\) do not give TransferClass"):
                    check_batch_inputs(model, probe)
