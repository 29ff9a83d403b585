"""SmallCNN: the lecture's architecture, the public layer API, and argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnfeat import layers
from cnnfeat.errors import ConfigError
from cnnfeat.models import SmallCNN


def test_output_and_feature_shapes() -> None:
    model = SmallCNN().eval()
    x = torch.rand(5, 1, 28, 28)
    assert model(x).shape == (5, 10)
    f = model.features(x)
    assert f.shape == (5, 100) and (f >= 0).all(), "features are taken after FC2's ReLU"
    assert torch.allclose(model(x), model.fc3(f))


def test_architecture_is_the_lectures() -> None:
    model = SmallCNN()
    convs = model.conv_layers()
    assert list(convs) == ["conv1", "conv2", "conv3"]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs.values()] == [
        (1, 6, (3, 3)),
        (6, 6, (3, 3)),
        (6, 16, (3, 3)),
    ]
    assert [(m.in_features, m.out_features) for m in (model.fc1, model.fc2, model.fc3)] == [
        (784, 120),
        (120, 100),
        (100, 10),
    ]
    shapes = {c.name: c.output_shape for c in layers.trace(model, torch.zeros(1, 1, 28, 28))}
    assert shapes["conv1"] == (1, 6, 28, 28) and shapes["pool1"] == (1, 6, 14, 14)
    assert shapes["pool2"] == (1, 16, 7, 7) and shapes["fc2"] == (1, 100)
    assert list(model.relu_layers()) == ["relu1", "relu2", "relu3", "relu4", "relu5"]
    assert model.activation_after() == {"conv1": "relu1", "conv2": "relu2", "conv3": "relu3"}


def test_unknown_layer_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['conv9'\].*'conv1'.*'fc3'"):
        SmallCNN().layer("conv9")
    with pytest.raises(ValueError, match=r"Unknown conv layer.*\['fc1'\].*valid names: \['conv1', 'conv2', 'conv3'\]"):
        layers.resolve_layers(SmallCNN(), ["fc1"], nn.Conv2d, what="conv layer")


def test_channels_last_does_not_change_results() -> None:
    torch.manual_seed(0)
    a = SmallCNN(channels_last=False).eval()
    b = SmallCNN(channels_last=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(8, 1, 28, 28)
    assert torch.allclose(a(x), b(x), atol=1e-5)


def test_conv_bias_init_and_input_normalisation() -> None:
    model = SmallCNN(conv_bias_init=-5.0)
    assert all((c.bias == -5.0).all() for c in model.conv_layers().values())
    x = torch.rand(4, 1, 28, 28)
    raw = SmallCNN(input_mean=None, input_std=None).eval()
    std = SmallCNN(input_mean=0.5, input_std=0.25).eval()
    std.load_state_dict(raw.state_dict())
    assert torch.allclose(std(x), raw((x - 0.5) / 0.25), atol=1e-5)
    with pytest.raises(ValueError, match="input_mean and input_std"):
        SmallCNN(input_mean=0.3, input_std=None)


@pytest.mark.parametrize("lr", [0, -0.1, float("nan"), "fast", None])
def test_bad_learning_rate_is_refused(lr: object) -> None:
    with pytest.raises(ValueError, match=r"model.optimizer.lr must be a positive number, got"):
        SmallCNN(optimizer={"_target_": "torch.optim.SGD", "lr": lr})


def test_capture_is_correct_under_inplace_relu() -> None:
    """With inplace ReLUs a plain hook on the conv would return the post-ReLU map; ours clones."""
    model = SmallCNN(inplace_relu=True, conv_bias_init=0.0).eval()
    x = torch.rand(3, 1, 28, 28)
    with layers.capture(model, ["conv1", "relu1"]) as out, torch.no_grad():
        model(x)
    pre, post = out["conv1"], out["relu1"]
    assert (pre < 0).any(), "the pre-ReLU map must keep its negative values"
    assert torch.equal(post, pre.clamp(min=0))
    assert not model.conv1._forward_hooks, "hooks are removed on exit"


def test_small_cnn_adapts_to_the_datas_channels_and_size() -> None:
    """The data configs give in_channels and image_size; the defaults are the lecture's 1 x 28 x 28 network."""
    lecture = SmallCNN()
    assert lecture.conv1.in_channels == 1 and lecture.fc1.in_features == 16 * 7 * 7
    rgb = SmallCNN(in_channels=3, image_size=32, num_classes=100)
    assert rgb.conv1.in_channels == 3 and rgb.fc1.in_features == 16 * 8 * 8
    assert rgb(torch.rand(2, 3, 32, 32)).shape == (2, 100)
    assert tuple(rgb.example_input_array.shape) == (1, 3, 32, 32)
    with pytest.raises(ConfigError, match="image_size must be >= 4"):
        SmallCNN(image_size=3)


def test_a_checkpoint_from_before_in_channels_resumes_with_the_lectures_values() -> None:
    """Checkpoints written before model.in_channels/image_size existed were trained with 1 and 28."""
    from cnnfeat.run.resume import differences

    saved = {"model": {"_target_": "cnnfeat.models.SmallCNN", "num_classes": 10}}
    assert differences(saved, {"model": {**saved["model"], "in_channels": 1, "image_size": 28}}) == []
    assert differences(saved, {"model": {**saved["model"], "in_channels": 3, "image_size": 28}}) == [
        ("model.in_channels", 1, 3)
    ]


def test_a_checkpoint_from_before_augment_defaulted_to_null_resumes() -> None:
    """data.augment was {} (which the command line could not override) before it became null: the same setting."""
    from omegaconf import OmegaConf

    from cnnfeat.run.resume import differences, training_config

    old = {"data": {"_target_": "cnnfeat.data.CIFAR10DataModule", "augment": {}, "batch_size": 128}}
    new = {"data": {**old["data"], "augment": None}}
    assert differences(old, new) == []
    flip = {"data": {**old["data"], "augment": {"RandomHorizontalFlip": {}}}}
    assert ("data.augment.RandomHorizontalFlip", None, {}) in differences(old, flip)  # a real change is one
    cfg = OmegaConf.create({"data": {**old["data"], "_convert_": "all"}})
    assert "_convert_" not in training_config(cfg)["data"]  # how Hydra passes the arguments is not training
