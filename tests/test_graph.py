"""The recorded graph: node names, capture by node name, activations after convs, ReLU applications."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from cnnfeat import layers
from cnnfeat.graph import (
    LayerError,
    activation_after,
    capture,
    conv_nodes,
    graph_node_names,
    relu_family_nodes,
    trace_graph,
)
from cnnfeat.models import SmallCNN
from tests.helpers.zoo import DynamicNet, MnistNet, resnet18_grey, zoo

ZOO = zoo()


def _no_hooks(model: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# -- names --------------------------------------------------------------------------------------------
def test_node_names_of_small_cnn() -> None:
    names = graph_node_names(SmallCNN(), torch.zeros(1, 1, 28, 28))
    # features(): standardise, channels_last copy, the lecture's layers, torch.flatten between pool2 and fc1
    assert names == [
        "sub",
        "div",
        "contiguous",
        "conv1",
        "relu1",
        "conv2",
        "relu2",
        "pool1",
        "conv3",
        "relu3",
        "pool2",
        "flatten",
        "fc1",
        "relu4",
        "fc2",
        "relu5",
        "fc3",
    ]


def test_node_names_of_the_functional_mnist_net() -> None:
    g = trace_graph(MnistNet(), torch.zeros(1, 1, 28, 28))
    assert g.names == [
        "conv1",
        "relu",
        "conv2",
        "relu:1",
        "max_pool2d",
        "dropout1",
        "flatten",
        "fc1",
        "relu:2",
        "dropout2",
        "fc2",
        "log_softmax",
    ]
    assert g["relu:1"].parents == ("conv2",) and g["max_pool2d"].parents == ("relu:1",)
    assert (g["relu"].kind, g["relu"].op, g["conv1"].kind, g["conv1"].op) == ("function", "relu", "module", "Conv2d")
    assert g["max_pool2d"].output_shape == (1, 64, 12, 12) and g["max_pool2d"].input_shapes == ((1, 64, 24, 24),)
    assert g["conv1"].parents == ("input",) and g.children("conv2") == ["relu:1"]


def test_resnet_block_applies_its_relu_twice_as_two_nodes() -> None:
    g = trace_graph(resnet18_grey(), torch.zeros(1, 1, 28, 28))
    names = g.names
    block = names[names.index("layer1.0.conv1") : names.index("layer1.0") + 1]
    assert block == [
        "layer1.0.conv1",
        "layer1.0.bn1",
        "layer1.0.relu",
        "layer1.0.conv2",
        "layer1.0.bn2",
        "layer1.0.add",  # out += identity
        "layer1.0.relu:1",
        "layer1.0",  # the block's output, an alias of relu:1
    ]
    assert g["layer1.0.relu"].module is g["layer1.0.relu:1"].module
    assert g["layer1.0.relu"].parents == ("layer1.0.bn1",)
    assert g["layer1.0.add"].parents == ("layer1.0.bn2", "maxpool")
    assert g["layer1.0.relu:1"].parents == ("layer1.0.add",), "the inplace relu takes over the add's tensor"
    assert g["layer2.0.add"].parents == ("layer2.0.bn2", "layer2.0.downsample")
    assert g["layer1.0"].alias and g["layer1.0"].parents == ("layer1.0.relu:1",)


class ReluTwice(nn.Module):
    """A module ``relu`` and a functional ``F.relu`` in the same scope."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.relu(y) + F.relu(-y)


def test_a_function_named_like_a_module_gets_brackets() -> None:
    model = ReluTwice().eval()
    x = torch.randn(2, 1, 8, 8)
    assert graph_node_names(model, x) == ["conv", "relu", "neg", "relu()", "add"]
    with torch.no_grad(), capture(model, ["relu", "relu()"]) as out:
        model(x)
        y = model.conv(x)
    assert torch.equal(out["relu"], y.clamp(min=0)) and torch.equal(out["relu()"], (-y).clamp(min=0))


# -- capture ------------------------------------------------------------------------------------------
def test_capture_of_functional_ops_equals_a_recomputation_from_the_weights() -> None:
    model = MnistNet().eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad(), capture(model, ["relu", "relu:1", "max_pool2d", "flatten", "relu:2"]) as out:
        model(x)
    with torch.no_grad():
        r1 = F.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias))
        c2 = F.conv2d(r1, model.conv2.weight, model.conv2.bias)
        pool = F.max_pool2d(F.relu(c2), 2)
        fc1 = F.relu(F.linear(pool.flatten(1), model.fc1.weight, model.fc1.bias))
    torch.testing.assert_close(out["relu"], r1)
    torch.testing.assert_close(out["relu:1"], F.relu(c2))
    torch.testing.assert_close(out["max_pool2d"], pool)
    torch.testing.assert_close(out["flatten"], pool.flatten(1))
    torch.testing.assert_close(out["relu:2"], fc1)
    with torch.no_grad(), capture(model, ["relu:1"], inputs=True) as pre:
        model(x)
    torch.testing.assert_close(pre["relu:1"], c2)
    assert (pre["relu:1"] < 0).any(), "the pre-activation keeps its negative values"


def test_capture_each_call_of_a_module_called_twice_under_inplace_relu() -> None:
    model = resnet18_grey().eval()
    relu = model.layer1[0].relu
    assert relu.inplace, "torchvision's BasicBlock shares one inplace ReLU"
    calls: list[torch.Tensor] = []
    pre_calls: list[torch.Tensor] = []
    h1 = relu.register_forward_hook(lambda m, a, o: calls.append(o.clone()))
    h2 = relu.register_forward_pre_hook(lambda m, a: pre_calls.append(a[0].clone()))
    x = torch.rand(2, 1, 32, 32)
    names = ["layer1.0.relu", "layer1.0.relu:1", "layer1.0.add"]
    with torch.no_grad(), capture(model, names) as out, capture(model, names[:2], inputs=True) as pre:
        model(x)
    h1.remove()
    h2.remove()
    assert len(calls) == 2
    assert torch.equal(out["layer1.0.relu"], calls[0]) and torch.equal(out["layer1.0.relu:1"], calls[1])
    assert torch.equal(pre["layer1.0.relu"], pre_calls[0]) and torch.equal(pre["layer1.0.relu:1"], pre_calls[1])
    assert (out["layer1.0.add"] < 0).any(), "the residual sum is cloned before the inplace relu overwrites it"
    assert torch.equal(out["layer1.0.add"], pre_calls[1])
    assert _no_hooks(model)


class InplaceMethod(nn.Module):
    """``x.relu_()`` and ``+=`` on a conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y.relu_()
        y += 1.0
        return y


def test_capture_is_correct_under_inplace_tensor_methods() -> None:
    model = InplaceMethod().eval()
    x = torch.randn(2, 1, 10, 10)
    assert graph_node_names(model, x) == ["conv", "relu", "add"]
    with torch.no_grad():
        y = model.conv(x)
        with capture(model, ["conv", "relu", "add"]) as out, capture(model, ["relu"], inputs=True) as pre:
            model(x)
    assert (out["conv"] < 0).any() and torch.equal(out["conv"], y)
    assert torch.equal(pre["relu"], y)
    assert torch.equal(out["relu"], y.clamp(min=0))
    assert torch.equal(out["add"], y.clamp(min=0) + 1)


def test_capture_under_inplace_relu_modules_keeps_pre_activations() -> None:
    model = ZOO["vgg_bn"].model().eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad(), capture(model, ["features.0", "features.1", "features.2"]) as out:
        model(x)
    with torch.no_grad():
        conv = model.features[0](x)
        bn = model.features[1](conv)
    torch.testing.assert_close(out["features.0"], conv)
    assert (out["features.1"] < 0).any()
    torch.testing.assert_close(out["features.1"], bn)
    assert torch.equal(out["features.2"], out["features.1"].clamp(min=0))


def test_capture_is_nchw_under_channels_last_and_later_passes_replace_tensors() -> None:
    torch.manual_seed(0)
    plain = SmallCNN(channels_last=False).eval()
    fast = SmallCNN(channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    x1, x2 = torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)
    with torch.no_grad(), capture(fast, ["conv1", "flatten"]) as out, capture(plain, ["conv1"]) as ref:
        fast(x1)
        fast(x2)
        plain(x2)
    assert out["conv1"].is_contiguous() and not out["conv1"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out["conv1"], ref["conv1"])
    assert out["flatten"].shape == (2, 784)


def test_layers_capture_and_activation_after_use_node_names() -> None:
    model = MnistNet().eval()
    x = torch.rand(1, 1, 28, 28)
    assert layers.activation_after(model, x) == {"conv1": "relu", "conv2": "relu:1"}
    with torch.no_grad(), layers.capture(model, ["conv2", "relu:1"]) as out:
        model(x)
    assert torch.equal(out["relu:1"], out["conv2"].clamp(min=0))
    assert [c.name for c in layers.trace(model, x)][:3] == ["conv1", "conv2", "dropout1"]


# -- unknown names ------------------------------------------------------------------------------------
def test_unknown_names_fail_with_the_list_of_valid_names() -> None:
    model = MnistNet().eval()
    x = torch.rand(1, 1, 28, 28)
    valid = r"valid names: \['conv1', 'relu', 'conv2', 'relu:1', 'max_pool2d', .*'log_softmax'\]"
    with pytest.raises(LayerError, match=r"Unknown layer name\(s\) \['conv9'\] for MnistNet; " + valid):
        trace_graph(model, x).resolve(["conv1", "conv9"])
    bad_call = r"Unknown layer name\(s\) \['relu:7'\] for MnistNet: .*" + valid
    with pytest.raises(LayerError, match=bad_call), torch.no_grad(), capture(model, ["conv1", "relu:7"]):
        model(x)
    module_calls = r"Unknown layer name\(s\) \['conv1:1'\].*\['conv1', 'conv2', 'dropout1'"
    with pytest.raises(LayerError, match=module_calls), torch.no_grad(), capture(model, ["conv1:1"]):
        model(x)  # module calls only: no function mode, so the list has module calls only
    with pytest.raises(LayerError, match=r"\['nope'\].*" + valid):
        activation_after(trace_graph(model, x), "nope")
    assert _no_hooks(model) and torch._C._len_torch_function_stack() == 0


# -- activation after each conv -----------------------------------------------------------------------
INCEPTION_BRANCHES = ["branch1", "branch2.0", "branch2.1", "branch3.0", "branch3.1", "branch4.1"]
#: Per zoo model, each conv call -> its activation node, or (None, the node that blocks it); read off the code.
EXPECTED_ACTIVATION = {
    "mnist_net": {"conv1": "relu", "conv2": "relu:1"},
    "lenet": {"conv1": "relu", "conv2": "relu:1"},
    "sequential": {"0": (None, "'1' (MaxPool2d)"), "3": "4"},
    "vgg_bn": {"features.0": "features.2", "features.3": "features.5", "features.7": "features.9"}
    | {"features.10": "features.12"},
    "inception": {"conv1.conv": "conv1.relu"}
    | {f"inception3{x}.{p}.conv": f"inception3{x}.{p}.relu" for x in "ab" for p in INCEPTION_BRANCHES},
    "gelu_silu": {"conv1": "act1", "conv2": "silu"},
    "dynamic": {"conv1": "relu", "bright": (None, "'shared' (Conv2d)"), "shared": "relu:1", "shared:1": "relu:2"},
    "resnet18": {"conv1": "relu"}
    | {f"layer{i}.{j}.conv1": f"layer{i}.{j}.relu" for i in range(1, 5) for j in (0, 1)}
    | {f"layer{i}.{j}.conv2": (None, f"'layer{i}.{j}.add' (add of input") for i in range(1, 5) for j in (0, 1)}
    | {f"layer{i}.0.downsample.0": (None, f"'layer{i}.0.add' (add") for i in range(2, 5)},
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_activation_after_each_conv_of_the_zoo(name: str) -> None:
    entry = ZOO[name]
    g = trace_graph(entry.model(), entry.example_input())
    expected = EXPECTED_ACTIVATION[name]
    assert sorted(conv_nodes(g)) == sorted(expected)
    for conv, want in expected.items():
        act, reason = activation_after(g, conv)
        if isinstance(want, str):
            assert (act, reason) == (want, "")
        else:
            assert act is None and f"no activation after {conv!r}" in reason and want[1] in reason


class Branching(nn.Module):
    """A conv whose output feeds two consumers, and a conv followed by a bias add and a scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3, bias=False)
        self.bias = nn.Parameter(torch.zeros(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        z = F.relu(y) + y.mean()
        return F.hardswish(2.0 * (self.conv2(z) + self.bias))


def test_activation_after_walks_bias_and_scale_and_stops_at_a_branch() -> None:
    g = trace_graph(Branching(), torch.rand(1, 1, 12, 12))
    act, reason = activation_after(g, "conv1")
    assert act is None and reason == "no activation after 'conv1': the output of 'conv1' branches into ['relu', 'mean']"
    assert activation_after(g, "conv2") == ("hardswish", "")


# -- ReLU applications --------------------------------------------------------------------------------
EXPECTED_RELUS = {
    "mnist_net": ["relu", "relu:1", "relu:2"],
    "lenet": ["relu", "relu:1", "relu:2", "relu:3"],
    "sequential": ["2", "4"],
    "vgg_bn": ["features.2", "features.5", "features.9", "features.12", "classifier.1"],
    "inception": ["conv1.relu"] + [f"inception3{x}.{p}.relu" for x in "ab" for p in INCEPTION_BRANCHES],
    "gelu_silu": [],
    "dynamic": ["relu", "relu:1", "relu:2"],
    "resnet18": ["relu"] + [f"layer{i}.{j}.relu{k}" for i in range(1, 5) for j in (0, 1) for k in ("", ":1")],
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_relu_family_nodes_are_every_application(name: str) -> None:
    entry = ZOO[name]
    model = entry.model().eval()
    x = entry.example_input()
    assert relu_family_nodes(trace_graph(model, x)) == EXPECTED_RELUS[name]
    module_calls = []  # independent count of the ReLU *module* applications, by hooks
    handles = [
        m.register_forward_hook(lambda m, a, o: module_calls.append(m)) for m in model.modules() if type(m) is nn.ReLU
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    g = trace_graph(model, x)
    assert len(module_calls) == sum(g[n].kind == "module" for n in EXPECTED_RELUS[name])


# -- eager control flow, and cleaning up --------------------------------------------------------------
def test_a_model_fx_cannot_trace_is_recorded_as_it_runs() -> None:
    model = DynamicNet().eval()
    with pytest.raises(torch.fx.proxy.TraceError, match="control flow"):
        torch.fx.symbolic_trace(model)
    bright, dark = torch.rand(2, 1, 28, 28) * 0.5 + 0.5, torch.zeros(2, 1, 28, 28)
    assert "bright" in graph_node_names(model, bright) and "dark" not in graph_node_names(model, bright)
    assert "dark" in graph_node_names(model, dark)
    with torch.no_grad(), capture(model, ["shared", "shared:1", "relu:2"]) as out:
        model(bright)
    with torch.no_grad():
        s0 = model.shared(model.bright(F.relu(model.conv1(bright))))
        s1 = model.shared(F.relu(s0))
    torch.testing.assert_close(out["shared"], s0)
    torch.testing.assert_close(out["shared:1"], s1)
    torch.testing.assert_close(out["relu:2"], F.relu(s1))
    missing = r"\['bright'\].*this forward pass produced no such node.*'dark'"
    with pytest.raises(LayerError, match=missing), torch.no_grad(), capture(model, ["bright", "relu"]):
        model(dark)


class Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if F.relu(self.bn(self.conv(x))).sum() > -1:
            raise RuntimeError("boom")
        return x


def test_hooks_and_mode_are_removed_and_modes_restored_when_the_forward_raises() -> None:
    model = Boom()
    model.bn.eval()  # a frozen part stays frozen, the rest stays in training mode
    modes = {n: m.training for n, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="boom"):
        trace_graph(model, torch.rand(2, 1, 8, 8))
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert _no_hooks(model) and torch._C._len_torch_function_stack() == 0
    for names in (["conv"], ["relu"]):  # module hooks only; with the function mode
        with pytest.raises(RuntimeError, match="boom"), capture(model, names):
            model(torch.rand(2, 1, 8, 8))
        assert _no_hooks(model) and torch._C._len_torch_function_stack() == 0
    model = SmallCNN().train()
    model.relu2.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    trace_graph(model, torch.zeros(1, 1, 28, 28))
    assert {n: m.training for n, m in model.named_modules()} == modes and _no_hooks(model)
