"""model=custom: your own nn.Module by import path, wrapped by cnnfeat's classifier; trained and reloaded through the
composed config; refused clearly when the path is wrong; never imported from a checkpoint."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.errors import CheckpointError, ConfigError
from cnnfeat.models import CustomClassifier
from cnnfeat.run.checkpoints import load_model
from cnnfeat.run.cli import instantiate_node
from cnnfeat.run.train import train
from tests.conftest import read_events

MakeCfg = Callable[..., DictConfig]
TARGET = f"{__name__}.TinyNet"


class TinyNet(nn.Module):
    """A user's network: convs, a functional ReLU, two Linears (the second gives the logits)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(8 * 16, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc2(F.relu(self.fc1(torch.flatten(self.pool(x), 1))))


class WrongOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


def not_a_module() -> None:
    """A function, not an nn.Module class."""


def _fc2_input(model: CustomClassifier, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.net.fc2.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def test_config_builds_the_class_passes_data_shape_and_finds_the_penultimate_vector(make_cfg: MakeCfg) -> None:
    cfg = make_cfg("model=custom", f"model.net._target_={TARGET}", "+model.net.width=6")
    model = instantiate_node(cfg.model, "model").eval()
    assert isinstance(model, CustomClassifier) and isinstance(model.net, TinyNet)
    assert model.net.conv1.out_channels == 6 and model.net.conv1.in_channels == 1 and model.net.fc2.out_features == 10
    assert model.head_name == "fc2", "the last Linear call on the graph"
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(model.features(x), _fc2_input(model, x))
    assert torch.equal(model(x), model.net(x)), "images go to the network as they come"
    rgb = CustomClassifier({"_target_": TARGET}, num_classes=3, in_channels=3, image_size=32)
    assert rgb.net.conv1.in_channels == 3 and rgb(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_train_two_batches_with_the_default_pictures_then_reload(
    make_cfg: MakeCfg, tmp_path: Path, datamodule: FashionMNISTDataModule
) -> None:
    cfg = make_cfg(
        "model=custom",
        f"model.net._target_={TARGET}",
        "callbacks.filters.layers=[net.conv1,net.conv2]",
        "callbacks.feature_maps.layers=[net.conv1,net.conv2]",
        "callbacks.feature_maps.image_ids=[0,3]",
        "callbacks.top_patches.layers=[net.conv1,net.conv2]",
        "callbacks.top_patches.probe_size=16",
        "callbacks.dead_relu.probe_size=20",
        "~callbacks.umap",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "trainer.limit_train_batches=2",
    )
    metrics = train(cfg)
    ev = read_events(tmp_path)
    assert {"filters/net.conv2", "feature_maps/net.conv1/relu/img3", "top_patches/net.conv2"} <= set(ev["images"])
    assert "relu/dead_fraction/all" in ev["scalars"]
    raw = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert raw["hyper_parameters"]["net"] == {"_target_": TARGET}
    model, _ = load_model(tmp_path / "checkpoints" / "last.ckpt")  # this module is imported: looked up, not imported
    x, y = datamodule.images("test", range(8))
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) == pytest.approx(metrics["test/loss"], rel=1e-4)


def test_bad_targets_are_refused_with_a_message() -> None:
    with pytest.raises(ConfigError, match=r"model.net._target_ must name your network's class, e.g. .* got None"):
        CustomClassifier({"_target_": None})
    with pytest.raises(ConfigError, match=r"'no_such_pkg.Net' cannot be imported \(No module named 'no_such_pkg'\)"):
        CustomClassifier({"_target_": "no_such_pkg.Net"})
    with pytest.raises(ConfigError, match=r"_target_='tests.test_custom_model.Missing' cannot be imported"):
        CustomClassifier({"_target_": f"{__name__}.Missing"})
    with pytest.raises(ConfigError, match=r"not_a_module' is a function, not an nn.Module class"):
        CustomClassifier({"_target_": f"{__name__}.not_a_module"})
    with pytest.raises(ConfigError, match=r"returns \(1, 7\) for a \(1, 1, 28, 28\) input; .* logits \(N, 10\)"):
        CustomClassifier({"_target_": f"{__name__}.WrongOutput"})
    with pytest.raises(ConfigError, match=r"TinyNet.__init__\(\) got an unexpected keyword argument 'depth'"):
        CustomClassifier({"_target_": TARGET, "depth": 3})
    with pytest.raises(ConfigError, match=r"\['_partial_'\] are not keyword arguments"):
        CustomClassifier({"_target_": TARGET, "_partial_": True})


def test_freeze_backbone_trains_only_the_last_linear() -> None:
    model = CustomClassifier(
        {"_target_": TARGET}, freeze="backbone", optimizer={"_target_": "torch.optim.SGD", "lr": 1}
    )
    optimizer = model.configure_optimizers()["optimizer"]
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(model.net.fc2.weight), id(model.net.fc2.bias)}
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model(model.features(x)), model(x)), "cached head inputs (N, D) go straight to the head"


def _forged_checkpoint(tmp_path: Path, target: str) -> Path:
    """A checkpoint of a real CustomClassifier whose hyper-parameters then name ``target`` as the network."""
    model = CustomClassifier({"_target_": TARGET})
    path = tmp_path / "forged.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": {**model.hparams, "net": {"_target_": target}},
            "cnnfeat_model": "cnnfeat.models.custom.CustomClassifier",
        },
        path,
    )
    return path


def test_a_checkpoint_never_imports_its_network_class(tmp_path: Path) -> None:
    """A module that is not imported yet is refused, not imported; an imported non-Module is refused too."""
    pkg = tmp_path / "side_effect_pkg"
    pkg.mkdir()
    marker = tmp_path / "imported.txt"
    (pkg / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nimport torch\nclass Net(torch.nn.Module):\n    pass\n"
    )
    path = _forged_checkpoint(tmp_path, "side_effect_pkg.Net")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(
            CheckpointError, match=r"'side_effect_pkg.Net' is not imported. Nothing named in a checkpoint"
        ):
            load_model(path)
        assert not marker.exists() and "side_effect_pkg" not in sys.modules
    finally:
        sys.path.remove(str(tmp_path))
    with pytest.raises(
        CheckpointError, match=r"_target_='os.system' is a builtin_function_or_method, not an nn.Module"
    ):
        load_model(_forged_checkpoint(tmp_path, "os.system"))


def test_config_without_a_target_is_refused_before_training(make_cfg: MakeCfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.net._target_ must name your network's class"):
        train(make_cfg("model=custom"))
    assert not (tmp_path / "checkpoints").exists()
