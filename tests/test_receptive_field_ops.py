"""Receptive fields through axis moves, channel shuffles, channels-last blocks and transposed convs, against the
support of the input gradient; torchvision's classification families; FilterCallback on ConvTranspose2d."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlock, LayerNorm2d
from torchvision.models.shufflenetv2 import InvertedResidual
from torchvision.ops import SqueezeExcitation

from cnnfeat import viz
from cnnfeat.callbacks.filters import FilterCallback, conv_filters
from cnnfeat.graph import LayerError, conv_nodes, split_call, trace_graph
from cnnfeat.receptive_field import ReceptiveField, ReceptiveFieldError, graph_receptive_fields, receptive_fields
from tests.helpers.gradient_support import GradientEverywhere, clipped, positive_copy, support_box


# -- brute force ------------------------------------------------------------------------------------------
class AllPass(GradientEverywhere):
    """``GradientEverywhere`` plus the saturating activations torchvision uses (hardsigmoid gates)."""

    _MORE = frozenset({"hardsigmoid", "hardtanh", "mish", "softplus", "selu", "celu"})

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):
        if getattr(func, "__name__", "") in self._MORE:
            return args[0]
        return super().__torch_function__(func, types, args, kwargs)


def positive(model: nn.Module) -> nn.Module:
    """``positive_copy`` (float64) with transposed-conv and LayerNorm weights > 0 too: no gradient cancels."""
    probe = positive_copy(model)
    with torch.no_grad():
        for m in probe.modules():
            if isinstance(m, (nn.ConvTranspose2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.abs_().add_(1e-2)
    return probe


def supports(
    model: nn.Module, x: torch.Tensor, units: list[tuple[int, int]], node: str | None = None
) -> list[tuple[int, int, int, int] | None]:
    """Support box of the input gradient of each unit (row, col), all channels, of ``node``'s output (a module
    call ``path`` or ``path:k``; default: the model's output); None where it is 0 (the unit sees no pixel).
    One sample per unit, one backward pass."""
    probe = positive(model)
    source = x.double().expand(len(units), -1, -1, -1).clone().requires_grad_(True)
    outs: list[torch.Tensor] = []
    handle = None
    if node is not None:
        handle = dict(probe.named_modules())[split_call(node)[0]].register_forward_hook(lambda m, a, o: outs.append(o))
    try:
        with AllPass():
            result = probe(source)
    finally:
        if handle is not None:
            handle.remove()
    out = result if node is None else outs[split_call(node)[1]]
    rows, cols = torch.tensor([u[0] for u in units]), torch.tensor([u[1] for u in units])
    (grad,) = torch.autograd.grad(out[torch.arange(len(units)), :, rows, cols].sum(), source)
    return [support_box(g) if g.any() else None for g in grad]


def every_unit(rf: ReceptiveField) -> list[tuple[int, int]]:
    return [(r, c) for r in range(rf.output_shape[0]) for c in range(rf.output_shape[1])]


def output_field(model: nn.Module, x: torch.Tensor) -> ReceptiveField:
    """The field of the node that produced the model's output (the last node of its graph)."""
    graph = trace_graph(model, x)
    last = list(graph)[-1]
    assert last.output_shape == tuple(model.eval()(x).shape)
    return graph_receptive_fields(graph, [last.name])[last.name]


def expected(rf: ReceptiveField, r: int, c: int, h: int, w: int) -> tuple[int, int, int, int] | None:
    """The box clipped to the image; None where the field says the unit sees no pixel."""
    assert rf.axes is not None
    if rf.axes[0].seen[r] is None or rf.axes[1].seen[c] is None:
        return None
    return clipped(rf.box(r, c), h, w)


def assert_exact(model: nn.Module, x: torch.Tensor, node: str | None = None) -> ReceptiveField:
    """Every unit's box, clipped to the image, is the bounding box of its gradient support."""
    rf = output_field(model, x) if node is None else receptive_fields(model, x, [node])[node]
    units = every_unit(rf)
    h, w = x.shape[-2:]
    assert supports(model, x, units, node) == [expected(rf, r, c, h, w) for r, c in units], (node, rf)
    for r, c in units:  # the window contains the box, and has the field's size where the field is regular
        (t, left, b, right), (wt, wl, wb, wr) = rf.box(r, c), rf.window(r, c)
        assert wt <= t <= b <= wb and wl <= left <= right <= wr
        assert not rf.regular or (wb - wt + 1, wr - wl + 1) == rf.size
    return rf


def seeded(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return build().eval()


# -- ops that only move or regroup axes --------------------------------------------------------------------
class Shuffled(nn.Module):
    """A conv, the ShuffleNet channel shuffle (view / transpose / contiguous / view), chunk, a conv on one half."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        a, b = x.chunk(2, dim=1)
        return torch.cat([a, self.conv2(b)], dim=1)


class ChannelsLast(nn.Module):
    """ConvNeXt's permute to (N, H, W, C) for LayerNorm + Linear per position and back; then the image axes
    moved around (movedim, swapaxes, reshape, flatten, unflatten, split, stack, squeeze) and brought back, an int
    index, softmax and reductions over channels, channel slices and a cat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 6)
        self.conv2 = nn.Conv2d(6, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).permute(0, 2, 3, 1)
        x = torch.permute(F.gelu(self.fc(self.norm(x))), (0, 3, 1, 2))  # (N, 6, H, W)
        y = x.movedim(1, -1).swapaxes(-1, -2)  # (N, H, 6, W)
        y = y.reshape(y.shape[0], y.shape[1], 2, 3, y.shape[-1]).flatten(2, 3).unflatten(2, (3, 2))  # (N, H, 3, 2, W)
        y = torch.stack(y.split(1, dim=2), dim=1).squeeze(3).mean(3)  # (N, 3, H, W)
        z = x.softmax(dim=1)[:, 0].unsqueeze(1) + x.mean(1, keepdim=True) + x.amax(1, keepdim=True)  # (N, 1, H, W)
        return self.conv2(torch.cat([x[:, :3] * y, z, x[:, 3:5]], dim=1))


class ShapeOnly(nn.Module):
    """``expand_as``/``view_as`` take only a shape from their second operand; an ``nn.Softmax`` over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.softmax = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 5), nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.softmax(self.conv1(x))
        b = self.conv2(a)  # a wider field than a's
        return a[:, :1, 2:-2, 2:-2].expand_as(b).view_as(b)


def test_the_second_operand_of_expand_as_lends_only_its_shape() -> None:
    assert assert_exact(seeded(ShapeOnly), torch.rand(1, 1, 20, 20)).size == (3, 3)


def test_a_channel_shuffle_and_chunk_keep_the_field() -> None:
    rf = assert_exact(seeded(Shuffled), torch.rand(1, 1, 15, 13))
    assert (rf.size, rf.jump) == ((7, 7), (2, 2)), "the union of conv1 (3 px) and conv2 after it (7 px)"


def test_channels_last_and_axis_moves_keep_the_field() -> None:
    rf = assert_exact(seeded(ChannelsLast), torch.rand(1, 1, 12, 11))
    assert (rf.size, rf.jump) == ((5, 5), (2, 2))


def test_torchvision_shufflenet_blocks_equal_gradient_support() -> None:
    """ShuffleNetV2's own blocks (stride 2 with two branches, stride 1 with chunk), then a conv after each shuffle."""
    model = seeded(
        lambda: nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), InvertedResidual(8, 16, 2), InvertedResidual(16, 16, 1)
        )
    )
    x = torch.rand(1, 1, 32, 32)
    assert_exact(model, x)
    rf = assert_exact(model, x, "2.branch2.3")
    assert (rf.size, rf.jump) == ((15, 15), (4, 4)), "stem 3 px, stride-2 depthwise 7 px, stride-1 depthwise 15"


def test_torchvision_convnext_blocks_equal_gradient_support() -> None:
    """ConvNeXt's stem (LayerNorm2d: permute, layer_norm, permute), CNBlocks (Permute modules, LayerNorm and
    Linear on channels-last, layer scale, residual add) and a downsampling layer."""
    model = seeded(
        lambda: nn.Sequential(
            nn.Conv2d(1, 8, 4, stride=4),
            LayerNorm2d(8),
            CNBlock(8, 1e-6, 0.0),
            LayerNorm2d(8),
            nn.Conv2d(8, 16, 2, stride=2),
            CNBlock(16, 1e-6, 0.0),
        )
    )
    x = torch.rand(1, 1, 40, 40)
    assert assert_exact(model, x).size == (80, 80), "stem 4, block 4 + 6 * 4, downsampling + 4, block + 6 * 8"
    assert assert_exact(model, x, "2.block.0").size == (28, 28)


# -- transposed convolutions -------------------------------------------------------------------------------
class Decoder(nn.Module):
    """A strided conv, a transposed conv (module or functional), a conv after it."""

    def __init__(self, k: int, s: int, p: int, d: int, op: int, functional: bool = False) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 2, 3, stride=2)
        self.up = nn.ConvTranspose2d(2, 4, k, s, p, output_padding=op, dilation=d, groups=2)
        self.conv = nn.Conv2d(4, 2, 3, padding=1)
        self.functional = functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        if self.functional:
            up = self.up
            x = F.conv_transpose2d(x, up.weight, up.bias, up.stride, up.padding, up.output_padding, 2, up.dilation)
        else:
            x = self.up(x)
        return self.conv(x)


@pytest.mark.parametrize(
    ("k", "s", "p", "d", "op"),
    [
        (2, 2, 0, 1, 0),  # U-Net: each output reads one input
        (4, 2, 1, 1, 0),  # DCGAN
        (3, 2, 1, 1, 1),  # outputs read one or two inputs by phase
        (3, 1, 1, 1, 0),  # stride 1: a conv in disguise
        (5, 3, 2, 1, 2),
        (3, 2, 2, 3, 1),  # dilated: reads skip inputs
    ],
)
def test_transposed_conv_boxes_equal_gradient_support(k: int, s: int, p: int, d: int, op: int) -> None:
    model, x = seeded(lambda: Decoder(k, s, p, d, op)), torch.rand(1, 1, 13, 12)
    up = assert_exact(model, x, "up")
    assert_exact(model, x)
    assert up.jump == (2 / s, 2 / s), "the conv below steps 2 pixels; the transposed conv divides that by its stride"
    assert up.regular == (s == 1), "with a stride, boxes repeat by phase instead of moving a whole step per unit"


def test_transposed_conv_phases_give_boxes_of_two_sizes() -> None:
    """k3 s2 p1: even outputs read one input unit, odd ones two; the field is not start + pos * jump."""
    model, x = seeded(lambda: Decoder(3, 2, 1, 1, 1)), torch.rand(1, 1, 17, 16)
    rf = assert_exact(model, x, "up")
    heights = [rf.box(r, 0)[2] - rf.box(r, 0)[0] + 1 for r in range(2, 6)]
    assert heights == [3, 5, 3, 5] and rf.size[0] == 5 and not rf.regular
    assert rf.jump == (1, 1), "the stride-2 conv below and the stride-2 transposed conv cancel on average"


def test_functional_transposed_conv_equals_the_module() -> None:
    x = torch.rand(1, 1, 17, 16)
    module = receptive_fields(seeded(lambda: Decoder(3, 2, 1, 1, 1)), x, ["conv"])["conv"]
    functional = receptive_fields(seeded(lambda: Decoder(3, 2, 1, 1, 1, functional=True)), x, ["conv"])["conv"]
    assert module == functional
    assert_exact(seeded(lambda: Decoder(3, 2, 1, 1, 1, functional=True)), x)


class TinyUNet(nn.Module):
    """Two poolings down, a k2s2 and a k3s2 (output_padding 1) transposed conv up, skip connections by cat."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)
        self.bottom = nn.Conv2d(8, 8, 3, padding=1)
        self.up2, self.dec2 = nn.ConvTranspose2d(8, 8, 2, stride=2), nn.Conv2d(16, 8, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.dec1, self.head = nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = F.relu(self.enc1(x))
        e2 = F.relu(self.enc2(F.max_pool2d(e1, 2)))
        b = F.relu(self.bottom(F.max_pool2d(e2, 2)))
        d2 = F.relu(self.dec2(torch.cat([self.up2(b), e2], 1)))
        d1 = F.relu(self.dec1(torch.cat([self.up1(d2), e1], 1)))
        return self.head(d1)


def test_a_unet_decoder_equals_gradient_support() -> None:
    model, x = seeded(TinyUNet), torch.rand(1, 1, 12, 12)
    for node in ("up2", "dec2", "up1", "head"):
        assert_exact(model, x, node)
    fields = receptive_fields(model, x)
    assert {"up1", "up2", "head"} <= set(fields), "transposed convs are among the default layers"
    assert fields["head"].output_shape == (12, 12) and fields["head"].jump == (1, 1)


def test_a_transposed_conv_whose_outputs_read_nothing_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ConvTranspose2d(2, 2, 1, stride=2), nn.Conv2d(2, 2, 3))
    for name in ("1", "2"):
        message = rf"'{name}' has no receptive field: '1' \(ConvTranspose2d\) output positions 1 mod 2 read no input"
        with pytest.raises(ReceptiveFieldError, match=message):
            receptive_fields(model, torch.rand(1, 1, 12, 12), [name])


# -- refusals: each names the op, and the field there is not a box ---------------------------------------
class After(nn.Module):
    """conv (N, 4, 8, 8) -> ``op`` -> conv."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor], width: int = 4) -> None:
        super().__init__()
        self.conv, self.op, self.after = nn.Conv2d(1, 4, 3, padding=1), op, nn.Conv2d(width, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.op(self.conv(x)))


REFUSALS = [
    (lambda y: y.view(1, 32, 8, 1), 32, "view", r"'view' flattens the spatial axes \(\(1, 4, 8, 8\) -> \(1, 32, 8, "),
    (lambda y: y.view(1, 4, 4, 2, 8).sum(3), 4, "view", r"'view' splits a spatial axis \(\(1, 4, 8, 8\) -> "),
    (lambda y: y.transpose(2, 3), 4, "transpose", r"'transpose' \(transpose\) swaps the image's rows and columns"),
    (lambda y: y.chunk(2, dim=2)[0], 4, "chunk", r"'chunk' \(chunk\) splits an image axis"),
    (lambda y: y.softmax(dim=-2), 4, "softmax", r"'softmax' \(softmax\) mixes units along dim -2, an image axis"),
    (lambda y: y.permute(1, 0, 2, 3), 1, "permute", r"'permute' \(permute\) moves the batch axis"),
    (lambda y: y[:, :, 0].unsqueeze(2), 4, "getitem", r"'getitem' drops a spatial axis"),
    (lambda y: y[:, torch.tensor([0, 2])], 2, "getitem", r"'getitem' \(getitem\) indexes with tensors"),
    (lambda y: torch.cat([y, y], dim=3), 4, "cat", r"'cat' \(cat\) concatenates along an image axis"),
]


REFUSAL_IDS = [
    "merge-rows",
    "split-rows",
    "swap-rows-cols",
    "chunk-rows",
    "softmax-rows",
    "move-batch",
    "int-row",
    "tensor-index",
    "cat-cols",
]


@pytest.mark.parametrize(("op", "width", "node", "message"), REFUSALS, ids=REFUSAL_IDS)
def test_ops_that_mix_or_move_the_image_axes_are_refused_by_name(
    op: Callable[[torch.Tensor], torch.Tensor], width: int, node: str, message: str
) -> None:
    model, x = After(op, width), torch.rand(1, 1, 8, 8)
    with pytest.raises(ReceptiveFieldError, match=message):
        receptive_fields(model, x, [node])
    with pytest.raises(ReceptiveFieldError, match=rf"'after' .*'{node}'"):  # downstream, the op is named too
        receptive_fields(model, x, ["after"])
    assert receptive_fields(model, x, ["conv"])["conv"].size == (3, 3)


def test_a_linear_over_an_image_axis_is_refused() -> None:
    model = After(nn.Linear(8, 8))
    with pytest.raises(ReceptiveFieldError, match=r"'op' \(Linear\) mixes its last 1 axis\(es\), which include an"):
        receptive_fields(model, torch.rand(1, 1, 8, 8), ["after"])


def test_a_channels_last_node_is_refused_with_its_layout() -> None:
    with pytest.raises(ReceptiveFieldError, match=r"'fc' holds the image's rows and columns in dims \(1, 2\) of its"):
        receptive_fields(ChannelsLast(), torch.rand(1, 1, 12, 11), ["fc"])


def test_a_squeeze_excitation_gate_is_refused_and_its_units_really_see_the_whole_image() -> None:
    """Policy: a unit that depends on a global gate has no box; we refuse rather than call it the whole image."""
    model, x = seeded(lambda: After(SqueezeExcitation(4, 2))), torch.rand(1, 1, 8, 8)
    gate = r"'op.mul' \(mul\) broadcasts an operand of spatial shape \(1, 1\) to \(8, 8\): every unit depends on all"
    with pytest.raises(ReceptiveFieldError, match=rf"'after' has no receptive field: {gate}"):
        receptive_fields(model, x, ["after"])
    assert receptive_fields(model, x, ["conv"])["conv"].size == (3, 3), "before the gate: local"
    assert supports(model, x, [(0, 0), (4, 4)]) == [(0, 0, 7, 7)] * 2, "after it: every pixel"
    mean_gate = After(lambda y: y * y.mean((2, 3), keepdim=True))
    with pytest.raises(ReceptiveFieldError, match=r"'after' comes after 'mean', which has no spatial geometry"):
        receptive_fields(mean_gate, x, ["after"])


def test_after_flattening_the_message_names_the_flattening_op() -> None:
    model = After(lambda y: y.flatten(1).view(1, 4, 8, 8))
    with pytest.raises(ReceptiveFieldError, match=r"'flatten' flattens the spatial axes \(\(1, 4, 8, 8\) -> \(1, 256"):
        receptive_fields(model, torch.rand(1, 1, 8, 8), ["flatten"])
    with pytest.raises(ReceptiveFieldError, match=r"'view' has no spatial grid: 'flatten' flattened the spatial axes"):
        receptive_fields(model, torch.rand(1, 1, 8, 8), ["view"])
    with pytest.raises(LayerError, match=r"Unknown layer name\(s\) \['nope'\]"):
        receptive_fields(model, torch.rand(1, 1, 8, 8), ["nope"])


# -- torchvision's classification families ------------------------------------------------------------------
#: One model per family, random weights, a small input the network allows (inception_v3 needs 75 px).
FAMILIES = {
    "alexnet": 64,
    "vgg11_bn": 32,
    "resnet18": 64,
    "resnext50_32x4d": 64,
    "densenet121": 64,
    "mobilenet_v2": 64,
    "mobilenet_v3_small": 64,
    "efficientnet_b0": 64,
    "regnet_x_400mf": 64,
    "shufflenet_v2_x0_5": 64,
    "squeezenet1_0": 64,
    "mnasnet0_5": 64,
    "convnext_tiny": 37,
    "googlenet": 64,
    "inception_v3": 80,
}
#: Conv nodes still refused, per family: every one sits after a squeeze-excitation gate (its units see the whole
#: image). Any other family refuses none. A change here shows in the test.
REFUSED = {"mobilenet_v3_small": 48, "efficientnet_b0": 77}
SE_GATE = re.compile(
    r"has no receptive field: '(?P<gate>[\w.]+)\.mul' \(mul\) broadcasts an operand of spatial shape \(1, 1\)"
)
CONVS = 8  # convs checked per family (evenly spaced, first and last included)
UNITS = 5  # units per conv: both corners, centre, top-right, middle-left


def family(name: str) -> nn.Module:
    extra = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, **extra).eval()


def refusals(model: nn.Module, size: int) -> tuple[dict[str, ReceptiveField], dict[str, str]]:
    """Every conv node's field, or the message refusing it."""
    graph = trace_graph(model, torch.rand(1, 3, size, size))
    fields, refused = {}, {}
    for name in conv_nodes(graph):
        try:
            fields.update(graph_receptive_fields(graph, [name]))
        except ReceptiveFieldError as e:
            refused[name] = str(e)
    return fields, refused


def check_family(name: str, size: int, convs: int = CONVS) -> None:
    """Refusals as expected (squeeze-excitation gates, whose units do see every pixel); the boxes of ``UNITS``
    units of ``convs`` local conv nodes equal the support of their input gradient."""
    model = family(name)
    fields, refused = refusals(model, size)
    assert len(refused) == REFUSED.get(name, 0), sorted(refused.items())[:3]
    modules = dict(model.named_modules())
    for message in refused.values():
        gate = SE_GATE.search(message)
        assert gate and isinstance(modules[gate["gate"]], SqueezeExcitation), message
    local = list(fields)
    picked = [local[round(i * (len(local) - 1) / max(convs - 1, 1))] for i in range(min(convs, len(local)))]
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    probe = positive(model)
    outs: dict[str, list[torch.Tensor]] = {split_call(n)[0]: [] for n in [*picked, *refused][: len(picked) + 1]}
    handles = [
        dict(probe.named_modules())[base].register_forward_hook(lambda m, a, o, b=base: outs[b].append(o))
        for base in outs
    ]
    source = x.double().expand(UNITS, -1, -1, -1).clone().requires_grad_(True)
    try:
        with AllPass():
            probe(source)
    finally:
        for h in handles:
            h.remove()
    for node in [*picked, *list(refused)[:1]]:
        base, k = split_call(node)
        out = outs[base][k]
        oh, ow = out.shape[-2:]
        units = [(0, 0), (oh - 1, ow - 1), (oh // 2, ow // 2), (0, ow - 1), (oh // 2, 0)]
        loss = sum(out[i, :, r, c].sum() for i, (r, c) in enumerate(units))
        (grad,) = torch.autograd.grad(loss, source, retain_graph=True)
        got = [support_box(g) for g in grad]
        if node in refused:  # the gate makes every unit depend on the whole image
            assert got == [(0, 0, size - 1, size - 1)] * UNITS, node
        else:
            assert got == [clipped(fields[node].box(r, c), size, size) for r, c in units], (name, node)


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "mobilenet_v3_small"])
def test_torchvision_families_cheap_subset(name: str) -> None:
    """ShuffleNetV2 (once refused for "flattening") and a squeeze-excitation family, a few convs each."""
    check_family(name, FAMILIES[name], convs=4)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_torchvision_families_equal_gradient_support(name: str) -> None:
    check_family(name, FAMILIES[name])


# -- FilterCallback on transposed convs -------------------------------------------------------------------
def spread(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """Insert stride - 1 zeros between neighbouring pixels."""
    n, c, h, w = x.shape
    out = x.new_zeros(n, c, (h - 1) * stride[0] + 1, (w - 1) * stride[1] + 1)
    out[:, :, :: stride[0], :: stride[1]] = x
    return out


def test_transposed_conv_filters_are_the_convolution_it_equals() -> None:
    """conv_transpose2d(x, w) == conv2d(spread(x), conv_filters(layer)) with padding dilation * (k - 1) - padding."""
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2), groups=2, dilation=2)
    x = torch.randn(1, 4, 5, 6)
    w = conv_filters(up)
    assert w.shape == (6, 2, 3, 2)
    (ph, pw) = (2 * (3 - 1) - 1, 2 * (2 - 1) - 0)
    padded = F.pad(spread(x, (2, 3)), (pw, pw + 2, ph, ph + 1))
    want = F.conv2d(padded, w, up.bias, groups=2, dilation=2)
    torch.testing.assert_close(up(x), want)
    conv = nn.Conv2d(4, 6, 3)
    assert conv_filters(conv) is conv.weight


def test_filter_callback_draws_a_transposed_conv_like_the_conv_it_equals() -> None:
    """A ConvTranspose2d (in 4, out 3) is drawn as a 3 x 4 grid, the picture of a Conv2d holding its equivalent
    kernels (transposed, flipped by hand); its raw (4, 3) weight tensor would give a 4 x 3 grid."""
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(4, 3, (3, 2), stride=2)
    same = nn.Conv2d(4, 3, (3, 2))
    with torch.no_grad():
        for o in range(3):
            for i in range(4):
                same.weight[o, i] = up.weight[i, o].flip(0, 1)
    model = nn.ModuleDict({"up": up, "same": same})
    cb = FilterCallback(layers=["up", "same"], min_cell=6)
    cb.check(model, None)  # a ConvTranspose2d is a conv layer, not an unknown name
    images = cb.render(model, None).images
    torch.testing.assert_close(images["filters/up"], images["filters/same"])
    assert images["filters/up"].shape != viz.filter_grid(up.weight, min_cell=6).shape
    with pytest.raises(
        LayerError, match=r"Unknown conv layer name\(s\) \['nope'\] for ModuleDict; valid names: \['up', 'same'\]"
    ):
        FilterCallback(layers=["nope"]).check(model, None)


def test_the_atlas_refuses_a_layer_whose_boxes_change_with_the_phase() -> None:
    """The atlas stores one field per layer; a strided transposed conv's boxes alternate in size, so it refuses."""
    import torch
    from torch import nn

    from cnnfeat.callbacks import AtlasCallback
    from cnnfeat.probe import probe_from_tensors

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Conv2d(1, 4, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)
            self.fc = nn.Linear(4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.up(torch.relu(self.down(x)))).mean(dim=(2, 3)))

    g = torch.Generator().manual_seed(0)
    probe = probe_from_tensors(torch.rand(40, 1, 16, 16, generator=g), torch.arange(40) % 10)
    cb = AtlasCallback(layers=["up"], featviz=False, alive_probe_size=20, atlas_dir="/tmp/unused-atlas")
    with pytest.raises(Exception, match=r"cannot record \['up'\].*transposed conv"):
        cb.prepare(Decoder(), probe)


def test_many_single_channel_filters_wrap_into_rows_of_sixteen() -> None:
    """ResNet-18's grey stem (64 filters of 1 x 7 x 7) was one 64-cell row; each filter is its own cell, in order."""
    w = torch.randn(64, 1, 7, 7)
    img = viz.filter_grid(w, min_cell=7, scale=torch.tensor(1.0))
    cell, pad = 7, 2
    assert img.shape[1:] == (4 * (cell + pad) + pad, 16 * (cell + pad) + pad), "4 rows of 16"
    want = viz.diverging(w, torch.tensor(1.0))
    for k in (0, 15, 16, 63):
        r, c = divmod(k, 16)
        top, left = pad + r * (cell + pad), pad + c * (cell + pad)
        torch.testing.assert_close(img[:, top : top + cell, left : left + cell], want[k, 0])
    six = viz.filter_grid(torch.randn(6, 1, 3, 3), min_cell=3)
    assert six.shape[1] == 3 + 2 * pad, "the lecture's 6 conv1 filters stay one row"
