"""Receptive fields against a brute-force gradient measurement, and the errors where there is none."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnfeat.graph import LayerError, conv_nodes, split_call, trace_graph
from cnnfeat.models import SmallCNN, TransferClassifier
from cnnfeat.receptive_field import ReceptiveFieldError, graph_receptive_fields, receptive_fields
from tests.helpers.gradient_support import GradientEverywhere, clipped, positive_copy, support_box
from tests.helpers.zoo import zoo

ZOO = zoo()
UNITS = 5  # corner, opposite corner, centre, top-right, middle-left: one sample each, one backward per conv


def outputs_of_every_conv_call(model: nn.Module) -> tuple[dict[nn.Module, list[torch.Tensor]], list]:
    """Forward hooks keeping every call's output of every conv module (hooks returned for removal)."""
    outs: dict[nn.Module, list[torch.Tensor]] = {}
    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            outs[m] = []
            handles.append(m.register_forward_hook(lambda mod, a, o: outs[mod].append(o)))
    return outs, handles


def check_every_conv_against_gradient_support(
    model: nn.Module,
    x: torch.Tensor,
    frame: torch.Tensor | None = None,
    run: Callable[[nn.Module, torch.Tensor], object] | None = None,
    dtype: torch.dtype = torch.float64,
) -> int:
    """Compare the box of a few units of every conv call with the support of their input gradient.

    Fields come from the graph traced on ``x``; the gradient goes to ``frame`` (default: ``x``), from which
    ``run(model, frame)`` computes the forward pass (default: ``model(frame)``). Returns how many units.
    """
    graph = trace_graph(model, x)
    convs = conv_nodes(graph)
    fields = graph_receptive_fields(graph, convs)
    frames = {f.frame for f in fields.values()}
    assert len(frames) == 1
    probe = positive_copy(model, dtype)
    image = (x if frame is None else frame).detach().to(dtype)
    source = image.expand(UNITS, -1, -1, -1).clone().requires_grad_(True)  # sample i: the i-th unit's gradient
    outs, handles = outputs_of_every_conv_call(probe)
    with GradientEverywhere():
        (run or (lambda m, s: m(s)))(probe, source)
    for h in handles:
        h.remove()
    modules = dict(probe.named_modules())
    checked = 0
    h, w = source.shape[-2:]
    for name in convs:
        base, k = split_call(name)
        out = outs[modules[base]][k]
        rf = fields[name]
        assert out.shape[-2:] == rf.output_shape
        oh, ow = rf.output_shape
        units = [(0, 0), (oh - 1, ow - 1), (oh // 2, ow // 2), (0, ow - 1), (oh // 2, 0)]
        loss = sum(out[i, :, r, c].sum() for i, (r, c) in enumerate(units))
        (grad,) = torch.autograd.grad(loss, source, retain_graph=True)
        for i, (r, c) in enumerate(units):
            assert support_box(grad[i]) == clipped(rf.box(r, c), h, w), (name, r, c, rf)
            checked += 1
    return checked


@pytest.mark.parametrize(
    ("name", "size"), [("mnist_net", 28), ("lenet", 32), ("inception", 28), ("dynamic", 28), ("resnet18", 64)]
)
def test_zoo_receptive_fields_equal_gradient_support(name: str, size: int) -> None:
    """Every conv call of the functional nets, the Inception concat block, and ResNet-18 (at 64x64)."""
    model = ZOO[name].model()
    checked = check_every_conv_against_gradient_support(model, torch.rand(1, 1, size, size))
    assert checked >= 2 * len(conv_nodes(trace_graph(model, torch.rand(1, 1, size, size))))


def test_small_cnn_receptive_fields_equal_gradient_support() -> None:
    model = SmallCNN()
    assert check_every_conv_against_gradient_support(model, torch.rand(1, 1, 28, 28)) >= 9
    assert receptive_fields(model, torch.zeros(1, 1, 28, 28), ["conv3"])["conv3"].size == (10, 10)


def test_known_values_of_lenet_and_resnet18() -> None:
    """The issue's numbers: LeNet conv2 14 px / step 2 (not 9 / 1), ResNet-18 layer2.1.conv1 83 / 8 (not 99 / 16)."""
    lenet = receptive_fields(ZOO["lenet"].model(), torch.zeros(1, 1, 32, 32), ["conv2"])["conv2"]
    assert (lenet.size, lenet.jump) == ((14, 14), (2, 2))
    resnet = receptive_fields(ZOO["resnet18"].model(), torch.zeros(1, 1, 64, 64), ["layer2.1.conv1"])
    assert (resnet["layer2.1.conv1"].size, resnet["layer2.1.conv1"].jump) == ((83, 83), (8, 8))


def test_alexnet_receptive_fields_equal_gradient_support_in_the_resized_frame() -> None:
    """Boxes refer to the 224x224 output of the ``resize`` module; measured there (float32: 5 layers)."""
    model = TransferClassifier(weights="none")
    x = torch.rand(1, 1, 28, 28)
    graph = trace_graph(model, x)
    fields = graph_receptive_fields(graph, conv_nodes(graph))
    assert {f.frame for f in fields.values()} == {"resize"}
    frame = model.resize(x)

    def from_frame(probe: nn.Module, image: torch.Tensor) -> object:
        return probe.backbone(probe.to_imagenet(image))  # the model's own path after ``resize``

    assert check_every_conv_against_gradient_support(model, x, frame, from_frame, torch.float32) == 25
    assert [fields[f"backbone.conv{i}"].size[0] for i in range(1, 6)] == [11, 51, 99, 131, 163]


class OddOps(nn.Module):
    """Functional padding, "same" dilated conv, a sum of a wide and a tall conv (neither field holds the other),
    functional avg-pool, adaptive max-pool, a channel slice, a functional conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3, padding="same", dilation=2)
        self.wide = nn.Conv2d(4, 4, (1, 5), padding=(0, 2))
        self.tall = nn.Conv2d(4, 4, (5, 1), padding=(1, 0), stride=1)
        self.pool = nn.AdaptiveMaxPool2d(6)
        self.weight = nn.Parameter(torch.randn(4, 2, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 2, 0, 3))
        x = F.relu(self.conv1(x))
        x = self.conv2(x)
        x = self.wide(x)[:, :, 1:-1] + self.tall(x)
        x = F.avg_pool2d(x, 3, stride=2, padding=1)
        x = self.pool(x)
        return F.conv2d(x[:, 2:], self.weight.abs(), stride=(1, 2), padding=(1, 0))


def test_functional_geometry_equals_gradient_support() -> None:
    model = OddOps()
    x = torch.rand(1, 1, 24, 23)  # padded 27x26; conv1 25x24; wide+tall 23x24; avg-pool 12x12; adaptive 6x6
    fields = receptive_fields(model, x, ["conv1", "conv2", "avg_pool2d", "pool", "conv2d"])
    assert fields["pool"].jump == (4, 4), "adaptive pooling 12x12 -> 6x6 is a 2x2 pool"
    probe = positive_copy(model)
    source = x.double().requires_grad_(True)
    with GradientEverywhere():
        out = probe(source)
    for r, c in [(0, 0), (out.shape[2] - 1, out.shape[3] - 1), (2, 1)]:
        (grad,) = torch.autograd.grad(out[0, :, r, c].sum(), source, retain_graph=True)
        assert support_box(grad[0]) == clipped(fields["conv2d"].box(r, c), 24, 23)


class Rolled(nn.Module):
    def __init__(self, pool: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.mid = pool or nn.Identity()
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv1(x))
        if isinstance(self.mid, nn.Identity):
            x = torch.roll(x, 1, -1)
        return self.conv2(x)


def test_an_unknown_op_on_the_spatial_path_is_an_error_naming_it() -> None:
    x = torch.rand(1, 1, 28, 28)
    assert receptive_fields(Rolled(), x, ["conv1"])["conv1"].size == (3, 3)
    with pytest.raises(ReceptiveFieldError, match=r"'conv2' has no receptive field: 'roll' \(roll\) is not a known"):
        receptive_fields(Rolled(), x, ["conv2"])
    assert list(receptive_fields(Rolled(), x)) == ["conv1"], "the default leaves out what has no field"


def test_adaptive_pooling_that_does_not_divide_is_an_error_naming_it() -> None:
    x = torch.rand(1, 1, 28, 28)  # conv1: 26x26 -> 5x5
    message = r"adaptive pooling 'mid' maps 26x26 to 5x5, not a whole multiple"
    for name in ("mid", "conv2"):
        with pytest.raises(ReceptiveFieldError, match=rf"'{name}' has no receptive field: {message}"):
            receptive_fields(Rolled(nn.AdaptiveAvgPool2d(5)), x, [name])
    assert receptive_fields(Rolled(nn.AdaptiveAvgPool2d(13)), x, ["conv2"])["conv2"].jump == (2, 2)


def test_after_flattening_there_is_no_receptive_field() -> None:
    model, x = ZOO["mnist_net"].model(), torch.rand(1, 1, 28, 28)
    with pytest.raises(ReceptiveFieldError, match="'fc2' comes after 'fc1', which has no spatial geometry"):
        receptive_fields(model, x, ["fc2"])
    with pytest.raises(ReceptiveFieldError, match="'flatten' flattens the spatial axes"):
        receptive_fields(model, x, ["flatten"])
    with pytest.raises(LayerError, match=r"Unknown layer name\(s\) \['conv7'\] for MnistNet; valid names: \['conv1'"):
        receptive_fields(model, x, ["conv7"])


class Upsampled(nn.Module):
    """An input transform (upsampling x2) before the first conv; after a conv, the same op is unknown."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2)
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = F.interpolate(self.conv1(x), scale_factor=2.0)
        return self.conv2(x)


def test_an_input_transform_restarts_the_frame_and_is_unknown_later() -> None:
    fields = receptive_fields(Upsampled(), torch.rand(1, 1, 14, 14), ["conv1"])
    assert fields["conv1"].frame == "interpolate" and fields["conv1"].size == (3, 3)
    with pytest.raises(ReceptiveFieldError, match=r"'interpolate:1' \(interpolate\) is not a known spatial operation"):
        receptive_fields(Upsampled(), torch.rand(1, 1, 14, 14), ["conv2"])


class Mismatched(nn.Module):
    """Squeeze-and-excitation (a global context multiplies every unit) and a sum of paths of different steps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 2, stride=2)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        scale = torch.sigmoid(self.fc(y.mean((2, 3)))).view(-1, 4, 1, 1)
        return y * scale, y + x[:, :, :14, :14]


def test_joining_paths_without_one_grid_is_an_error_naming_the_join() -> None:
    graph = trace_graph(Mismatched(), torch.rand(1, 1, 28, 28))
    assert graph_receptive_fields(graph, ["getitem"])["getitem"].jump == (1, 1), "a crop keeps the step"
    with pytest.raises(ReceptiveFieldError, match=r"'mul' comes after 'mean', which has no spatial geometry"):
        graph_receptive_fields(graph, ["mul"])
    steps = r"'add' \(add\) joins paths with different jumps \[\(1, 1\), \(2, 2\)\]"
    with pytest.raises(ReceptiveFieldError, match=steps):
        graph_receptive_fields(graph, ["add"])


class _Inception(nn.Module):
    """A 1x1 and a 3x3 branch concatenated (each channel sees its own branch's window), then a max-pool that keeps
    channels apart, a depthwise conv that does too, and a conv that mixes them."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow, self.wide = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 3, padding=1)
        self.same = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.mix = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        same = torch.cat([self.wide(x), self.same(x)], dim=1)  # equal fields: the union is every channel's
        h = self.pool(torch.cat([self.narrow(x), self.wide(x)], dim=1))
        return self.mix(self.depthwise(h)) + same[:, :3, ::2, ::2]


def test_a_concatenation_of_different_fields_says_its_boxes_are_a_union() -> None:
    """Channel 0 of the concatenation comes from the 1x1 branch and sees one pixel; the field cnnfeat keeps per layer
    is the 3x3 branch's. The field says so (``joined``) through channel-wise ops until a conv mixes the channels, and
    the layer plan warns naming the layer and the concatenation."""
    from cnnfeat.plan import LayerPlan

    model = _Inception().eval()
    x = torch.rand(1, 1, 12, 12)
    graph = trace_graph(model, x)
    cats = [n.name for n in graph if n.op == "cat"]
    fields = graph_receptive_fields(graph, [*cats, "pool", "depthwise", "mix"])
    assert fields[cats[0]].joined is None, "branches with equal fields: the union is exact for every channel"
    assert fields[cats[1]].joined == cats[1] and fields["pool"].joined == fields["depthwise"].joined == cats[1]
    assert fields["mix"].joined is None, "a conv mixing the channels sees the union: exact again"
    # ground truth: the gradient support of channel 0 (narrow) is 1 pixel, the box drawn is 3x3
    xr = x.clone().requires_grad_(True)
    out = torch.cat([model.narrow(xr), model.wide(xr)], dim=1)
    (g,) = torch.autograd.grad(out[0, 0, 5, 5], xr)
    assert int((g != 0).sum()) == 1 and fields[cats[1]].box(5, 5) == (4, 4, 6, 6)
    with pytest.warns(UserWarning, match=rf"'pool': its channels come from branches concatenated at '{cats[1]}'"):
        LayerPlan.trace(model, x).fields(["pool", "mix"])
