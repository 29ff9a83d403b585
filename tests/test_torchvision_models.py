"""model=torchvision: any torchvision classification network adapted to the data, trained and reloaded through the
composed config, its pretrained weights from a file, and the transfer recipe (frozen backbone, trained head)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from omegaconf import DictConfig
from torch import nn

from cnnfeat import graph as cgraph
from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.data.feature_cache import FrozenFeatureDataModule
from cnnfeat.errors import CheckpointError, ConfigError, WeightsError
from cnnfeat.models import FrozenTorchvision, SmallCNN, TorchvisionClassifier
from cnnfeat.models.parts import IMAGENET_MEAN, IMAGENET_STD
from cnnfeat.probe import ProbeSpec, check_batch_inputs
from cnnfeat.run.checkpoints import load_model
from cnnfeat.run.cli import instantiate_node
from cnnfeat.run.train import train
from tests.conftest import read_events

MakeCfg = Callable[..., DictConfig]

#: stem (first conv) and head (the module computing the logits) per family, written down from torchvision's source
FAMILIES = {
    "alexnet": ("features.0", "classifier.6"),
    "convnext_tiny": ("features.0.0", "classifier.2"),
    "densenet121": ("features.conv0", "classifier"),
    "efficientnet_b0": ("features.0.0", "classifier.1"),
    "efficientnet_v2_s": ("features.0.0", "classifier.1"),
    "googlenet": ("conv1.conv", "fc"),
    "inception_v3": ("Conv2d_1a_3x3.conv", "fc"),
    "maxvit_t": ("stem.0.0", "classifier.5"),
    "mnasnet0_5": ("layers.0", "classifier.1"),
    "mobilenet_v2": ("features.0.0", "classifier.1"),
    "mobilenet_v3_small": ("features.0.0", "classifier.3"),
    "regnet_x_400mf": ("stem.0", "fc"),
    "resnet18": ("conv1", "fc"),
    "resnext50_32x4d": ("conv1", "fc"),
    "wide_resnet50_2": ("conv1", "fc"),
    "shufflenet_v2_x0_5": ("conv1.0", "fc"),
    "squeezenet1_1": ("features.0", "classifier.1"),
    "swin_t": ("features.0.0", "head"),
    "vgg11_bn": ("features.0", "classifier.6"),
    "vit_b_16": ("conv_proj", "heads.head"),
}
#: what the default picture callbacks draw, per network (their default layer names, conv1..conv3, are SmallCNN's)
PICTURE_LAYERS = {
    "resnet18": (["net.conv1", "net.layer1.0.conv1"], ["net.conv1", "net.layer1.0.conv2"]),
    "mobilenet_v3_small": (["net.features.0.0", "net.features.1.block.0.0"], ["net.features.0.0"]),
    "vgg11_bn": (["net.features.0", "net.features.4"], ["net.features.0", "net.features.4", "net.features.8"]),
    "densenet121": (
        ["net.features.conv0", "net.features.denseblock1.denselayer1.conv1"],
        ["net.features.conv0", "net.features.denseblock1.denselayer1.conv2"],
    ),
}
FOUR = list(PICTURE_LAYERS)


def _head_input(model: TorchvisionClassifier, head: str, x: torch.Tensor) -> torch.Tensor:
    """The input of the module ``head`` (a name of the torchvision network), read by a plain forward hook."""
    seen: list[torch.Tensor] = []
    handle = model.net.get_submodule(head).register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_every_family_adapts_stem_and_head(arch: str) -> None:
    """On the meta device (shapes only): the first conv takes 1 channel, the head gives 10 classes, the graph's first
    conv and last Linear call are the table's, and features() has the head's input width."""
    stem, head = FAMILIES[arch]
    device = "cpu" if arch.startswith("regnet") else "meta"  # RegNet's builder reads tensor values
    with torch.device(device):
        model = TorchvisionClassifier(arch, in_channels=1, image_size=28, weights="none").eval()
        x = torch.zeros(2, 1, 28, 28)
        assert (model.stem_name, model.head_name) == (stem, head)
        conv, out = model.net.get_submodule(stem), model.net.get_submodule(head)
        assert conv.in_channels == 1 and (getattr(out, "out_features", None) or out.out_channels) == 10
        graph = cgraph.trace_graph(model, x)
        calls = [n for n in graph if n.kind == "module" and not n.alias]
        convs = [n.name for n in calls if isinstance(n.module, nn.Conv2d)]
        linears = [n.name for n in calls if isinstance(n.module, nn.Linear)]
        assert convs[0] == f"net.{stem}" and (linears or convs)[-1] == f"net.{head}"
        assert tuple(model(x).shape) == (2, 10)
        width = out.in_features if isinstance(out, nn.Linear) else out.in_channels
        assert tuple(model.features(x).shape) == (2, width)
    if model.input_size != 28:
        assert model.input_size == tvm.get_model_weights(arch).DEFAULT.meta["min_size"][0]


@pytest.mark.parametrize(
    ("arch", "channels", "size"),
    [
        *[(arch, channels, size) for arch in FOUR for channels, size in ((1, 28), (3, 32)) if arch != "vgg11_bn"],
        ("vgg11_bn", 1, 28),
        pytest.param("vgg11_bn", 3, 32, marks=pytest.mark.slow),  # 133M parameters to initialise
    ],
)
def test_four_networks_from_the_config_adapt_to_grey_28_and_rgb_32(
    arch: str, channels: int, size: int, make_cfg: MakeCfg
) -> None:
    stem, head = FAMILIES[arch]
    cfg = make_cfg(
        "model=torchvision",
        f"model.arch={arch}",
        "model.weights=none",
        f"model.in_channels={channels}",
        f"model.image_size={size}",
    )
    torch.manual_seed(0)
    model = instantiate_node(cfg.model, "model").eval()
    assert isinstance(model, TorchvisionClassifier) and model.net.get_submodule(stem).in_channels == channels
    assert model.input_size == max(size, {"vgg11_bn": 32, "densenet121": 29}.get(arch, 1))
    x = torch.rand(3, channels, size, size)
    logits = model(x)
    assert logits.shape == (3, 10)
    expected = _head_input(model, head, x)  # the penultimate vector, taken by a hook on the known head
    assert torch.equal(model.features(x), expected)
    assert torch.allclose(model.net.get_submodule(head)(expected), logits, atol=1e-5)


def test_the_config_falls_back_to_fashion_mnist_shapes(make_cfg: MakeCfg) -> None:
    cfg = make_cfg("model=torchvision", "model.weights=none")
    assert (cfg.model.num_classes, cfg.model.in_channels, cfg.model.image_size) == (10, 1, 28)
    del cfg.data.num_classes, cfg.data.in_channels, cfg.data.image_size  # a data config that does not list them
    assert (cfg.model.num_classes, cfg.model.in_channels, cfg.model.image_size) == (10, 1, 28)
    cfg = make_cfg("model=torchvision", "data.in_channels=3", "data.image_size=32", "data.num_classes=5")
    assert (cfg.model.num_classes, cfg.model.in_channels, cfg.model.image_size) == (5, 3, 32)


def _train_args(arch: str) -> list[str]:
    maps, patches = PICTURE_LAYERS[arch]
    return [
        "model=torchvision",
        f"model.arch={arch}",
        "model.weights=none",
        "callbacks=default",
        f"callbacks.filters.layers=[{','.join(maps)}]",
        f"callbacks.feature_maps.layers=[{','.join(maps)}]",
        "callbacks.feature_maps.image_ids=[0,3]",
        f"callbacks.top_patches.layers=[{','.join(patches)}]",
        "callbacks.top_patches.probe_size=16",
        "callbacks.top_patches.max_channels=4",
        "callbacks.dead_relu.probe_size=20",
        "callbacks.umap.probe_size=50",
        "callbacks.umap.cv_folds=2",
        "callbacks.umap.full_epochs=20",
        "callbacks.umap.warm_epochs=10",
        "callbacks.umap.gif=false",
        "callbacks.umap.projector=false",
        "callbacks.umap.pixels=false",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "trainer.limit_train_batches=2",
    ]


def _train_and_reload(arch: str, make_cfg: MakeCfg, tmp_path: Path, datamodule: FashionMNISTDataModule) -> None:
    metrics = train(make_cfg(*_train_args(arch)))
    images = read_events(tmp_path)["images"]
    maps, patches = PICTURE_LAYERS[arch]
    for layer in maps:
        assert [e.step for e in images[f"filters/{layer}"]] == [0, 1]
        assert f"feature_maps/{layer}/conv/img3" in images
    for layer in patches:
        assert f"top_patches/{layer}" in images
    assert [e.step for e in images["umap/features"]] == [0, 1]
    assert "relu/dead_fraction/all" in read_events(tmp_path)["scalars"]
    # the checkpoint rebuilds the trained network: its loss on the 8 test images the run tested on is the run's
    model, _ = load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(model, TorchvisionClassifier) and model.hparams.arch == arch and not model.training
    x, y = datamodule.images("test", range(8))
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y)
    assert float(loss) == pytest.approx(metrics["test/loss"], rel=1e-4)


def test_resnet18_trains_two_batches_with_every_picture_then_reloads(
    make_cfg: MakeCfg, tmp_path: Path, datamodule: FashionMNISTDataModule
) -> None:
    _train_and_reload("resnet18", make_cfg, tmp_path, datamodule)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "vgg11_bn", "densenet121"])
def test_networks_train_with_every_picture_then_reload(
    arch: str, make_cfg: MakeCfg, tmp_path: Path, datamodule: FashionMNISTDataModule
) -> None:
    """MobileNetV3-small also trains through the config in the default suite (experiment=transfer_torchvision)."""
    _train_and_reload(arch, make_cfg, tmp_path, datamodule)


def test_small_input_is_the_cifar_stem() -> None:
    model = TorchvisionClassifier("resnet18", in_channels=3, image_size=32, weights="none", small_input=True)
    conv = model.net.conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    shapes = {n.name: n.output_shape for n in cgraph.trace_graph(model, torch.zeros(1, 3, 32, 32))}
    assert shapes["net.layer1.0.conv1"] == (1, 64, 32, 32), "no stride-2 stem and no max-pool: full resolution"
    plain = TorchvisionClassifier("resnet18", in_channels=3, image_size=32, weights="none")
    shapes = {n.name: n.output_shape for n in cgraph.trace_graph(plain, torch.zeros(1, 3, 32, 32))}
    assert shapes["net.layer1.0.conv1"] == (1, 64, 8, 8)


def test_weights_from_a_file_load_exactly(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = tvm.resnet18(num_classes=1000).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    rgb = TorchvisionClassifier("resnet18", in_channels=3, image_size=32, weights=str(path), normalize="none").eval()
    mine = rgb.net.state_dict()
    for key, value in reference.state_dict().items():
        if key.startswith("fc."):
            assert mine[key].shape[0] == 10, "a head of another size stays new"
        else:
            assert torch.equal(mine[key], value), key
    x = torch.rand(2, 3, 32, 32)
    reference.fc = nn.Identity()
    with torch.no_grad():
        assert torch.allclose(rgb.features(x), reference(x), atol=1e-5)
        # grey input: the stem's RGB kernels summed = the RGB network on the grey image in three channels
        grey = TorchvisionClassifier("resnet18", in_channels=1, image_size=32, weights=str(path), normalize="none")
        g = torch.rand(2, 1, 32, 32)
        assert torch.allclose(grey.eval().features(g), reference(g.expand(-1, 3, -1, -1)), atol=1e-4)

    # a file saved from a cnnfeat model of the same shape (net.* keys, 10-class head) loads head and all
    trained = TorchvisionClassifier("resnet18", in_channels=1, image_size=28, weights="none")
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "mine.ckpt")
    again = TorchvisionClassifier("resnet18", in_channels=1, image_size=28, weights=str(tmp_path / "mine.ckpt"))
    assert all(
        torch.equal(a, b) for a, b in zip(trained.state_dict().values(), again.state_dict().values(), strict=True)
    )

    torch.save(SmallCNN().state_dict(), tmp_path / "small.pth")
    with pytest.raises(WeightsError, match=r"small.pth is not a resnet18 state dict"):
        TorchvisionClassifier("resnet18", weights=str(tmp_path / "small.pth"))
    state = reference.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match=r"tensors do not fit resnet18: layer1.0.conv1.weight: \(64, 64, 5, 5\)"):
        TorchvisionClassifier("resnet18", weights=str(tmp_path / "wrong.pth"))
    with pytest.raises(WeightsError, match=r"no such file \(expected a resnet18 state dict\)"):
        TorchvisionClassifier("resnet18", weights=str(tmp_path / "nope.pth"))


def test_imagenet_weights_are_the_architectures_default_adapted_to_grey(monkeypatch: pytest.MonkeyPatch) -> None:
    """weights=imagenet asks torchvision for <Arch>_Weights.DEFAULT (here answered without a download)."""
    torch.manual_seed(5)
    reference = tvm.resnet18(num_classes=1000)
    asked = []

    def get_state_dict(self: tvm.WeightsEnum, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        asked.append(self)
        return reference.state_dict()

    monkeypatch.setattr(tvm.ResNet18_Weights, "get_state_dict", get_state_dict)
    model = TorchvisionClassifier("resnet18", in_channels=1, image_size=28, weights="imagenet")
    assert asked == [tvm.ResNet18_Weights.DEFAULT]
    assert torch.equal(model.net.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.net.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_missing_imagenet_weights_say_where_to_put_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(
        "torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1.value.url",
        "http://127.0.0.1:9/mobilenet_v3_small-047dcff4.pth",
        raising=False,
    )
    with pytest.raises(WeightsError) as e:
        TorchvisionClassifier("mobilenet_v3_small", weights="imagenet")
    msg = str(e.value)
    assert "MobileNet_V3_Small ImageNet weights (MobileNet_V3_Small_Weights.IMAGENET1K_V1)" in msg
    assert "mobilenet_v3_small-047dcff4.pth" in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert "model.weights=/path/to/mobilenet_v3_small.pth" in msg and "model.weights=none" in msg


def test_bad_arguments_are_refused_with_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model.arch='resnet19' is not a torchvision .* Did you mean resnet18"):
        TorchvisionClassifier("resnet19", weights="none")
    with pytest.raises(ConfigError, match=r"model.small_input=true replaces the ResNet stem .* not vgg11_bn's"):
        TorchvisionClassifier("vgg11_bn", weights="none", small_input=True)
    with pytest.raises(ConfigError, match=r"model.freeze must be one of \['none', 'backbone'\], got 'head'"):
        TorchvisionClassifier("resnet18", weights="none", freeze="head")
    with pytest.raises(ConfigError, match=r"normalize=imagenet needs 1 or 3 input channels, got 4"):
        TorchvisionClassifier("resnet18", weights="none", in_channels=4)
    with pytest.raises(ConfigError, match=r"model.arch=vgg11_bn cannot take 1x16x16 inputs .* at least 32"):
        TorchvisionClassifier("vgg11_bn", weights="none", in_channels=1, image_size=16, input_size=16)
    with pytest.raises(ConfigError, match=r"freeze=backbone trains a Linear head .* \(classifier.1\) is a Conv2d"):
        TorchvisionClassifier("squeezenet1_1", weights="none", freeze="backbone")


def test_a_checkpoint_naming_another_architecture_is_refused(tmp_path: Path) -> None:
    """``arch`` is looked up among torchvision's builders; a checkpoint cannot name anything else."""
    model = TorchvisionClassifier("mobilenet_v3_small", weights="none")
    for arch, message in (("os.system", r"model.arch='os.system' is not a torchvision"), ("resnet18", r"missing")):
        path = tmp_path / "forged.ckpt"
        torch.save(
            {
                "state_dict": model.state_dict(),
                "hyper_parameters": {**model.hparams, "arch": arch},
                "cnnfeat_model": "cnnfeat.models.torchvision_net.TorchvisionClassifier",
            },
            path,
        )
        with pytest.raises(CheckpointError, match=message):
            load_model(path)


def test_transfer_recipe_on_resnet18_trains_only_the_head(datamodule: FashionMNISTDataModule) -> None:
    model = TorchvisionClassifier(
        "resnet18", in_channels=1, image_size=28, weights="none", freeze="backbone", seed=0,
        optimizer={"_target_": "torch.optim.SGD", "lr": 0.1},
    )  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = model.configure_optimizers()["optimizer"]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.net.fc.parameters()}
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)  # on images: the frozen backbone runs at every step
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["net.fc.bias", "net.fc.weight"], "BN statistics too stay as they were"
    assert model.training and model.net.fc.training
    assert not any(m.training for n, m in model.net.named_modules() if n != "fc")


def test_frozen_torchvision_feeds_the_feature_cache(data_dir: Path, cache_dir: Path) -> None:
    """The cache's backbone is the model's frozen part: same fingerprint, its vectors give the model's logits; a
    cache of another backbone is refused by the probe."""
    model = TorchvisionClassifier("resnet18", in_channels=1, image_size=28, weights="none", freeze="backbone", seed=0)
    frozen = FrozenTorchvision("resnet18", "none", seed=0)
    assert model.fingerprint() == frozen.fingerprint() != FrozenTorchvision("resnet18", "none", seed=1).fingerprint()
    for seed, ok in ((0, True), (1, False)):
        dm = FrozenFeatureDataModule(
            FrozenTorchvision("resnet18", "none", seed=seed),
            data_dir=data_dir,
            cache_dir=cache_dir,
            max_images=16,
            download=False,
        )
        dm.prepare_data()
        dm.setup()
        assert dm.cache_file("test").parent.name.startswith("resnet18-")
        probe = dm.probe_set(ProbeSpec())
        with torch.no_grad():
            if ok:
                x, _ = dm.images("test", [0, 5])
                assert torch.allclose(dm.inputs("test", [0, 5]), model.eval().features(x), rtol=2e-3, atol=2e-3)
                check_batch_inputs(model, probe)
            else:
                with pytest.raises(ConfigError, match=r"do not give TorchvisionClassifier"):
                    check_batch_inputs(model, probe)


def test_transfer_torchvision_experiment_end_to_end(make_cfg: MakeCfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "experiment=transfer_torchvision",
        "backbone.arch=mobilenet_v3_small",
        "backbone.weights=none",
        "data.max_images=64",
        "trainer.max_epochs=1",
        "callbacks.umap.probe_size=50",
        "callbacks.umap.cv_folds=2",
        "callbacks.umap.full_epochs=20",
        "callbacks.umap.warm_epochs=10",
    )
    assert cfg.model.arch == cfg.data.backbone.arch == "mobilenet_v3_small" and cfg.model.freeze == "backbone"
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert [e.step for e in read_events(tmp_path)["images"]["umap/features"]] == [0, 1]
    model, _ = load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(model, TorchvisionClassifier) and model.frozen
    assert not any(p.requires_grad for n, p in model.net.named_parameters() if not n.startswith("classifier.3."))


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_every_family_runs_on_grey_28px_images(arch: str) -> None:
    """For real (not on the meta device): logits, and features() = the input of the table's head, by a hook."""
    torch.manual_seed(0)
    model = TorchvisionClassifier(arch, in_channels=1, image_size=28, weights="none").eval()
    x = torch.rand(2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    head = FAMILIES[arch][1]
    expected = _head_input(model, head, x)
    if expected.ndim > 2:  # SqueezeNet's 1x1-conv head: features() averages its input over the positions
        expected = expected.mean(dim=(2, 3))
    with torch.no_grad():  # as the hook's pass: ViT's attention takes a fused path without autograd
        assert torch.equal(model.features(x), expected)


def test_imagenet_normalisation_values() -> None:
    rgb = TorchvisionClassifier("resnet18", in_channels=3, image_size=32, weights="none")
    x = torch.rand(1, 3, 32, 32)
    expected = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(rgb.preprocess(x), expected)
    grey = TorchvisionClassifier("resnet18", in_channels=1, image_size=28, weights="none", normalize="none")
    g = torch.rand(1, 1, 28, 28)
    assert torch.equal(grey.preprocess(g), g)
