"""experiment=transfer as one case of model=torchvision model.freeze=backbone: AlexNet with a new MLP top on the
frozen-feature cache gives the original route's numbers (model=alexnet, TransferClassifier, FrozenAlexNet), and the
MLP top (model.head_hidden) works for any torchvision network whose head takes a feature vector."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from omegaconf import DictConfig
from torch import nn

from cnnfeat import atlas
from cnnfeat.callbacks.representations import CrossModelCKACallback
from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.errors import ConfigError
from cnnfeat.models import FrozenAlexNet, FrozenTorchvision, SmallCNN, TorchvisionClassifier, TransferClassifier
from cnnfeat.models.parts import IMAGENET_MEAN, IMAGENET_STD
from cnnfeat.probe import probe_from_tensors
from cnnfeat.run import lightning_api as pl
from cnnfeat.run.checkpoints import load_model
from cnnfeat.run.cli import instantiate_node
from cnnfeat.run.train import train
from tests.conftest import read_events

MakeCfg = Callable[..., DictConfig]

#: the top a new MLP head replaces, per family, written down from torchvision's source: the classifier block after
#: the feature vector when it holds only Linear/dropout/activation layers, else the head itself
TOPS = {
    "alexnet": "classifier",
    "convnext_tiny": "classifier.2",  # LayerNorm2d and Flatten come first
    "densenet121": "classifier",
    "efficientnet_b0": "classifier",
    "googlenet": "fc",
    "maxvit_t": "classifier.5",  # pooling and LayerNorm come first
    "mnasnet0_5": "classifier",
    "mobilenet_v2": "classifier",
    "mobilenet_v3_small": "classifier",
    "regnet_x_400mf": "fc",
    "resnet18": "fc",
    "shufflenet_v2_x0_5": "fc",
    "swin_t": "head",
    "vgg11_bn": "classifier",
    "vit_b_16": "heads",
}


def new_name(old: str, head: str) -> str:
    """A TransferClassifier parameter's name in the new route: ``hidden.K.*`` -> ``net.classifier.K.*`` (the same
    dropout/Linear/ReLU layout), ``classifier.*`` -> ``net.<head>.*``."""
    if old.startswith("hidden."):
        return f"net.classifier.{old.removeprefix('hidden.')}"
    return f"net.{head}.{old.removeprefix('classifier.')}"


def old_route(*overrides: str) -> tuple[str, ...]:
    """The original experiment=transfer, spelt out: model=alexnet with FrozenAlexNet feeding the cache."""
    return ("model=alexnet", "data=alexnet_features", "model.weights=none", "data.backbone.weights=none", *overrides)


def test_frozen_torchvision_alexnet_gives_frozen_alexnets_features_bit_for_bit(
    datamodule: FashionMNISTDataModule,
) -> None:
    """Same seed: the same conv weights (torchvision draws features first, whatever the head); grey -> RGB and
    ImageNet's RGB mean/std in front of the RGB stem; both run channels-last (FrozenAlexNet's habit), so the same
    kernels give the same bits. Ground truth for both: torchvision's AlexNet built from the seed, run by hand."""
    old = FrozenAlexNet("none", seed=3, input_size=224)
    kw = {"input_size": 224, "head_hidden": [4096, 4096], "grey_to_rgb": True}
    new = FrozenTorchvision("alexnet", "none", seed=3, channels_last=True, **kw)
    x = torch.cat([datamodule.images("test", range(3))[0], torch.rand(2, 1, 28, 28)])
    assert torch.equal(new(x), old(x))
    default_layout = FrozenTorchvision("alexnet", "none", seed=3, **kw)
    assert default_layout.fingerprint() != new.fingerprint(), "the layout changes the last bits: another cache key"
    torch.manual_seed(3)
    ref = tvm.alexnet(weights=None).eval()
    big = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    rgb = (big.expand(-1, 3, -1, -1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        want = torch.flatten(ref.avgpool(ref.features(rgb)), 1)
    assert torch.allclose(new(x), want, rtol=1e-5, atol=1e-5)  # another memory layout: the float rounding differs


def test_the_same_weights_file_gives_the_same_features(tmp_path: Path) -> None:
    torch.manual_seed(11)
    path = tmp_path / "alexnet.pth"
    torch.save(tvm.alexnet(weights=None).state_dict(), path)
    old = FrozenAlexNet(str(path), input_size=64)
    new = FrozenTorchvision("alexnet", str(path), input_size=64, head_hidden=[8], grey_to_rgb=True, channels_last=True)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(new(x), old(x))


def test_experiment_transfer_is_torchvision_alexnet_with_the_original_head_at_init(make_cfg: MakeCfg) -> None:
    cfg = make_cfg("experiment=transfer", "backbone.weights=none", "backbone.input_size=64")
    assert cfg.model.arch == cfg.data.backbone.arch == "alexnet" and cfg.model.freeze == "backbone"
    assert cfg.model.head_hidden == cfg.data.backbone.head_hidden == [4096, 4096] and cfg.model.grey_to_rgb
    assert cfg.model.channels_last and cfg.data.backbone.channels_last, "as the original route ran AlexNet"
    pl.seed_everything(cfg.seed)
    dm = instantiate_node(cfg.data, "data")
    model = instantiate_node(cfg.model, "model")
    old_cfg = make_cfg(*old_route("model.input_size=64", "data.backbone.input_size=64"))
    pl.seed_everything(old_cfg.seed)
    old = instantiate_node(old_cfg.model, "model")
    assert isinstance(model, TorchvisionClassifier) and isinstance(old, TransferClassifier)
    assert isinstance(dm.backbone, FrozenTorchvision) and dm.fingerprint == model.fingerprint()
    assert dm.cache_file("test").parent.name == f"alexnet-{dm.fingerprint}"
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    old_trained = {new_name(n, model.head_name): p for n, p in old.named_parameters() if p.requires_grad}
    assert sorted(trained) == sorted(old_trained) and len(trained) == 6
    for name, p in trained.items():
        assert torch.equal(p, old_trained[name]), f"{name} at init"
    frozen, old_frozen = model.net.features.state_dict(), old.backbone.state_dict()
    assert len(frozen) == len(old_frozen) == 10
    assert all(torch.equal(a, b) for a, b in zip(frozen.values(), old_frozen.values(), strict=True))
    assert (model.head_name, model.top_name) == ("classifier.6", "classifier")
    x = torch.rand(2, 9216)
    with torch.no_grad():
        assert torch.equal(model.eval().features(x), old.eval().features(x)) and torch.equal(model(x), old(x))


def test_a_short_run_gives_the_original_routes_numbers_epoch_by_epoch(make_cfg: MakeCfg, tmp_path: Path) -> None:
    """Two epochs of a 256-unit head on the cached features of 96 images (64 px: the features' equality at 224 is the
    first test's): every logged scalar of every epoch equal (the cache stores the same bits, the head starts equal,
    dropout and the shuffle draw the same numbers)."""
    common = (
        "data.max_images=96",
        "data.batch_size=16",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=null",
        "callbacks=none",
        "seed=5",
    )
    new = make_cfg(
        "experiment=transfer", "backbone.weights=none", "backbone.input_size=64", "model.head_hidden=[256]", *common,
        f"paths.output_dir={tmp_path / 'new'}",
    )  # fmt: skip
    old = make_cfg(
        *old_route("model.hidden=[256]", "model.input_size=64", "data.backbone.input_size=64", *common),
        f"paths.output_dir={tmp_path / 'old'}",
    )  # the old route's defaults: backbone seed 0, lr 0.01 with momentum 0.9, no scheduler
    got, want = train(new), train(old)
    assert got == want
    scalars = read_events(tmp_path / "new")["scalars"]
    old_scalars = read_events(tmp_path / "old")["scalars"]
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "test/acc"):
        assert scalars[tag] == old_scalars[tag], tag
    assert [s for s, _ in scalars["val/acc"]] == [s for s, _ in old_scalars["val/acc"]] and len(scalars["val/acc"]) == 2
    # both checkpoints reload (the original route's TransferClassifier too) with the same trained head
    model, _ = load_model(tmp_path / "new" / "checkpoints" / "last.ckpt")
    old_model, _ = load_model(tmp_path / "old" / "checkpoints" / "last.ckpt")
    assert isinstance(model, TorchvisionClassifier) and isinstance(old_model, TransferClassifier)
    trained = {new_name(n, model.head_name): p for n, p in old_model.named_parameters() if p.requires_grad}
    assert all(torch.equal(p, model.get_parameter(n)) for n, p in trained.items()) and len(trained) == 4


def test_transfer_callbacks_find_their_layers_on_the_new_model(make_cfg: MakeCfg) -> None:
    """callbacks=[transfer, atlas_transfer, cross_cka] of experiment=transfer name AlexNet's conv1..5 and relu1..5 in
    torchvision's tree; the atlas optimises the RGB 224 input of net (ImageNet-normalised)."""
    cfg = make_cfg(
        "experiment=transfer", "backbone.weights=none", "model.head_hidden=[8]", "callbacks=[transfer,atlas_transfer]"
    )
    model = instantiate_node(cfg.model, "model").eval()
    convs = dict(model.conv_layers())
    kernels = [convs[name].kernel_size[0] for name in cfg.callbacks.atlas.layers]
    assert kernels == [11, 5, 3, 3, 3], "AlexNet's conv1..conv5"
    assert cfg.callbacks.top_patches.layers == cfg.callbacks.atlas.layers
    assert cfg.callbacks.filters.layers == cfg.callbacks.atlas.layers[:2]
    assert list(cfg.callbacks.feature_maps.layers) == cfg.callbacks.atlas.layers[:1]
    space = atlas.module_space(
        model, cfg.callbacks.atlas.featviz_input, model.example_input_array, IMAGENET_MEAN, IMAGENET_STD
    )
    assert space.shape == (3, 224, 224)
    relus = make_cfg("experiment=transfer", "backbone.weights=none").callbacks.cross_cka.layers
    assert all(isinstance(model.layer(n), nn.ReLU) for n in relus) and len(relus) == 5
    assert [model.net.features[int(n.rsplit(".", 1)[1]) - 1] for n in relus] == [
        convs[f"net.features.{i}"] for i in (0, 3, 6, 8, 10)
    ], "each relu follows its conv"

    torch.manual_seed(1)
    reference = SmallCNN().eval()
    probe = probe_from_tensors(torch.rand(20, 1, 28, 28), torch.arange(20) % 10)
    small = TorchvisionClassifier(
        "alexnet", weights="none", in_channels=1, image_size=28, freeze="backbone", input_size=63, seed=0,
        head_hidden=[8], grey_to_rgb=True,
    ).eval()  # fmt: skip
    cb = CrossModelCKACallback(reference, layers=list(relus), probe_size=20, block_size=10, batch_size=8)
    cb.prepare(small, probe)
    scalars = cb.render(small, cb.probe, 0).scalars
    assert {k.rsplit("/", 1)[1] for k in scalars} == set(relus) and all(abs(v) <= 1 + 1e-6 for v in scalars.values())


def test_the_transfer_experiment_runs_every_picture_on_the_new_model(make_cfg: MakeCfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "experiment=transfer",
        "backbone.weights=none",
        "model.head_hidden=[64]",
        "data.max_images=96",
        "trainer.max_epochs=1",
        "callbacks.feature_maps.image_ids=[22,36,74]",
        "callbacks.top_patches.probe_size=32",
        "callbacks.top_patches.max_channels=4",
        "callbacks.umap.probe_size=90",
        "callbacks.umap.cv_folds=2",
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    ev = read_events(tmp_path)
    images = ev["images"]
    conv1 = images["filters/net.features.0"][0]
    assert (conv1.width, conv1.height) == (8 * 35 + 2, 8 * 35 + 2)  # 64 RGB filters 11x11 upscaled to 33, 8 x 8
    conv2 = images["filters/net.features.3"][0]
    assert (conv2.width, conv2.height) == (64 * 27 + 2, 16 * 27 + 2)  # the first 16 of 192 filters x 64 inputs
    for kind in ("conv", "relu"):
        e = images[f"feature_maps/net.features.0/{kind}/img22"][0]
        assert (e.width, e.height) == (7 * 57 + 2, 55 + 4)  # the lecture's 7 filters, 55x55 maps
    for conv in cfg.callbacks.top_patches.layers:
        assert [e.step for e in images[f"top_patches/{conv}"]] == [0], "frozen layers are drawn once"
    assert [e.step for e in images["umap/features"]] == [0, 1]
    assert "model/shapes/text_summary" in ev["tensors"]


@pytest.mark.parametrize("arch", sorted(TOPS))
def test_every_family_takes_an_mlp_top(arch: str) -> None:
    """On the meta device (shapes only): the top is the table's, replaced by dropout/Linear/ReLU + the Linear head;
    only its parameters train; features() is the last hidden layer, for images and for cached top inputs."""
    device = "cpu" if arch.startswith("regnet") else "meta"  # RegNet's builder reads tensor values
    with torch.device(device):
        model = TorchvisionClassifier(arch, image_size=28, in_channels=1, weights="none", freeze="backbone",
                                      head_hidden=[16, 8], head_dropout=0.25)  # fmt: skip
        top = model.net.get_submodule(TOPS[arch])
        assert model.top_name == TOPS[arch] and model.head_name == f"{TOPS[arch]}.6"
        assert [type(m) for m in top] == [nn.Dropout, nn.Linear, nn.ReLU] * 2 + [nn.Linear]
        assert top[0].p == 0.25 and (top[1].out_features, top[4].out_features, top[6].out_features) == (16, 8, 10)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            f"net.{TOPS[arch]}.{i}.{w}" for i in (1, 4, 6) for w in ("weight", "bias")
        }
        model.eval()
        x = torch.zeros(2, 1, 28, 28)
        assert tuple(model(x).shape) == (2, 10) and tuple(model.features(x).shape) == (2, 8)
        vectors = model.top_input(x)
        assert vectors.ndim == 2 and vectors.shape[1] == top[1].in_features
        assert tuple(model.features(vectors).shape) == (2, 8) and tuple(model(vectors).shape) == (2, 10)


def test_mlp_top_values_on_resnet18_match_a_hand_built_head() -> None:
    """features() of cached vectors and of images = the hand-applied MLP on the frozen part's output."""
    torch.manual_seed(0)
    model = TorchvisionClassifier("resnet18", in_channels=1, image_size=28, weights="none", freeze="backbone",
                                  seed=0, head_hidden=[12]).eval()  # fmt: skip
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        v = model.top_input(x)
        fc = model.net.fc
        hidden = torch.relu(fc[1](v))
        assert torch.equal(model.features(v), hidden) and torch.allclose(model.features(x), hidden, atol=1e-6)
        assert torch.allclose(model(x), fc[3](hidden), atol=1e-6) and torch.equal(model(v), fc[3](hidden))
    plain = TorchvisionClassifier("resnet18", in_channels=1, image_size=28, weights="none", freeze="backbone", seed=0)
    assert plain.fingerprint() == model.fingerprint(), "fc's input is cached either way: one cache"
    assert FrozenTorchvision("resnet18", "none", head_hidden=[5]).fingerprint() == model.fingerprint()


def test_pretrained_weights_skip_the_replaced_top(tmp_path: Path) -> None:
    """A weights file's classifier tensors do not fit (or would be loaded into) the new MLP: they are skipped."""
    torch.manual_seed(2)
    reference = tvm.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(reference.state_dict(), path)
    torch.manual_seed(9)
    model = TorchvisionClassifier("alexnet", in_channels=1, image_size=28, weights=str(path), head_hidden=[4096, 4096],
                                  grey_to_rgb=True, input_size=64, seed=4)  # fmt: skip
    assert torch.equal(model.net.features[0].weight, reference.features[0].weight), "the RGB stem as in the file"
    assert not torch.equal(model.net.classifier[1].weight, reference.classifier[1].weight), "a new head"
    torch.manual_seed(9)
    again = TorchvisionClassifier("alexnet", in_channels=1, image_size=28, weights="none", head_hidden=[4096, 4096],
                                  grey_to_rgb=True, input_size=64, seed=4)  # fmt: skip
    assert torch.equal(model.net.classifier[1].weight, again.net.classifier[1].weight), "drawn from the run's RNG"


def test_bad_head_arguments_are_refused_with_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model.head_hidden must be null or a list of layer widths >= 1.* got \[0\]"):
        TorchvisionClassifier("resnet18", weights="none", head_hidden=[0])
    with pytest.raises(ConfigError, match=r"model.head_hidden must be null or a list .* got '4096'"):
        TorchvisionClassifier("resnet18", weights="none", head_hidden="4096")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"model.head_dropout must be a number in \[0, 1\), got 1.0"):
        TorchvisionClassifier("resnet18", weights="none", head_hidden=[8], head_dropout=1.0)
    with pytest.raises(ConfigError, match=r"head \(classifier.1\) is a Conv2d on a spatial map, not a Linear"):
        TorchvisionClassifier("squeezenet1_1", weights="none", head_hidden=[8])
    with pytest.raises(ConfigError, match=r"model.grey_to_rgb=true repeats grey images .* the data has 3 channels"):
        TorchvisionClassifier("resnet18", weights="none", in_channels=3, grey_to_rgb=True)
