"""LRP (``cnnfeat.lrp``) against independent ground truth: gradient x input, conservation, a hand-folded BatchNorm.

The epsilon rule on a ReLU network without biases is gradient x input (Ancona et al. 2018), computed here by autograd;
epsilon-plus-flat conserves relevance where no bias absorbs any (the input relevance sums to the logit); a merged
BatchNorm gives what the network with the BatchNorm folded into its conv by hand gives, and leaves the parameters as
they were. Networks the rules do not fit are refused, naming the node. The callback's LRP panels are read back from
the event files of a real Trainer run and compared with the core on the checkpoint.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from torch import nn

from cnnfeat import tags, viz
from cnnfeat.attribution import LRP, explain
from cnnfeat.callbacks import AttributionCallback
from cnnfeat.callbacks.attribution import CELL, GAP, pixel_cells
from cnnfeat.callbacks.session import build_probe
from cnnfeat.errors import ConfigError
from cnnfeat.graph import trace_graph
from cnnfeat.lrp import EPSILON, LRPError, lrp, lrp_rules
from cnnfeat.models import SmallCNN
from cnnfeat.run.train import build, train
from tests.conftest import read_events

MakeCfg = Callable[..., DictConfig]


def _no_biases(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    return model.eval()


class FunctionalNet(nn.Module):
    """ReLU and pooling as functions, modules defined in the reverse order of their use."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8 * 7 * 7, 10, bias=False)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def _grad_x_input(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).gather(1, targets.view(-1, 1)).sum(), x)
    return (g * x).detach()


@pytest.mark.parametrize("make", [lambda: SmallCNN(input_mean=None, input_std=None), FunctionalNet])
def test_epsilon_rule_is_gradient_times_input_without_biases(make: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    model = _no_biases(make())
    x, targets = torch.rand(5, 1, 28, 28), torch.tensor([0, 3, 9, 1, 5])
    r = lrp(model, x, targets, composite=EPSILON, epsilon=1e-9)
    expected = _grad_x_input(model, x, targets)
    assert r.relevance.shape == x.shape
    scale = float(expected.abs().max())
    assert float((r.relevance - expected).abs().max()) <= 1e-3 * scale, "LRP-eps = grad x input"
    assert torch.allclose(r.logit, model(x).gather(1, targets.view(-1, 1)).squeeze(1).detach())


def test_equals_zennits_own_epsilon_plus_flat_where_modules_are_in_execution_order() -> None:
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    torch.manual_seed(5)
    model = SmallCNN(input_mean=None, input_std=None).eval()  # defined in execution order, no input standardisation
    x = torch.rand(4, 1, 28, 28)
    targets = model(x).argmax(1)
    ours = lrp(model, x, targets)
    with Gradient(model=model, composite=EpsilonPlusFlat()) as attributor:
        logits, theirs = attributor(x.clone().requires_grad_(True), lambda out: F.one_hot(targets, 10) * out)
    assert torch.allclose(ours.relevance, theirs, rtol=1e-5, atol=1e-7)
    assert torch.allclose(ours.logit, logits.gather(1, targets.view(-1, 1)).squeeze(1).detach())


def test_first_layer_is_the_first_the_input_meets() -> None:
    plan = lrp_rules(trace_graph(FunctionalNet().eval(), torch.zeros(1, 1, 28, 28)))
    assert plan.rules == {"conv1": "flat", "conv2": "zplus", "fc": "epsilon"}, "execution order, not definition order"
    assert plan.entry == "input"
    x = torch.zeros(1, 1, 28, 28)
    plain = lrp_rules(trace_graph(SmallCNN(input_mean=None, input_std=None).eval(), x))
    assert plain.entry == "input", "x.contiguous() in front of conv1 leaves relevance on the input itself"
    standardised = lrp_rules(trace_graph(SmallCNN().eval(), x))
    assert standardised.entry not in ("input", "conv1"), "relevance is taken after the standardisation"


def test_epsilon_plus_flat_conserves_relevance_without_biases() -> None:
    torch.manual_seed(1)
    x = torch.rand(6, 1, 28, 28)
    for model in (_no_biases(SmallCNN()), _no_biases(FunctionalNet())):  # SmallCNN standardises its input itself
        targets = model(x).argmax(1)
        r = lrp(model, x, targets)
        assert r.relevance.shape == x.shape
        assert torch.allclose(r.conserved, torch.ones(6), atol=1e-4), type(model).__name__
    with_biases = SmallCNN().eval()
    r = lrp(with_biases, x, torch.zeros(6, dtype=torch.long))
    assert not torch.allclose(r.conserved, torch.ones(6), atol=1e-3), "biases absorb relevance: not 1"


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(4))
        self.head = nn.Linear(6 * 7 * 7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def test_batchnorm_is_merged_as_by_hand_and_the_parameters_are_restored() -> None:
    torch.manual_seed(2)
    model = ConvBN().eval()
    bn = model.body[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv_weight = model.body[0].weight
    x, targets = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    got = lrp(model, x, targets)
    # fold by hand: conv' = BN(conv(.)), BN removed
    folded = ConvBN().eval()
    folded.load_state_dict(before)
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded.body[0].weight.copy_(before["body.0.weight"] * scale.view(-1, 1, 1, 1))
        folded.body[0].bias.copy_((before["body.0.bias"] - bn.running_mean) * scale + bn.bias)
    folded.body[1] = nn.Identity()
    want = lrp(folded, x, targets)
    assert torch.allclose(got.relevance, want.relevance, atol=1e-5), "merged BatchNorm = folded by hand"
    assert torch.allclose(got.logit, want.logit, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} restored"
    assert model.body[0].weight is conv_weight


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(28 * 28, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x + self.conv(x)).flatten(1))


class Squash(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 28 * 28, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.sigmoid(self.conv(x)).flatten(1))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(28 * 28, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(F.relu(self.conv(x))).flatten(1))


class LoneBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 28 * 28, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(F.relu(self.conv(x))).flatten(1))


class Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.norm = nn.LayerNorm([2, 28, 28])
        self.fc = nn.Linear(2 * 28 * 28, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.conv(x)).flatten(1))


@pytest.mark.parametrize(
    ("model", "node", "why"),
    [
        (Residual(), "add", "combines 2 tensors"),
        (Squash(), "sigmoid", "function 'sigmoid' after the first conv/linear layer"),
        (Twice(), "conv:1", "another call"),
        (LoneBN(), "bn", "BatchNorm"),
        (Norm(), "norm", "LayerNorm"),
    ],
)
def test_networks_the_rules_do_not_fit_are_refused_naming_the_node(model: nn.Module, node: str, why: str) -> None:
    with pytest.raises(LRPError) as err:
        lrp(model.eval(), torch.rand(2, 1, 28, 28), torch.tensor([0, 1]))
    assert repr(node) in str(err.value) and why in str(err.value) and "Integrated Gradients" in str(err.value)


def test_grey_repeated_to_rgb_sums_the_copies_relevance() -> None:
    class Grey(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.fc = nn.Linear(4 * 14 * 14, 5, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.max_pool2d(F.relu(self.conv(x.repeat(1, 3, 1, 1))), 2).flatten(1))

    torch.manual_seed(3)
    model, x, targets = Grey().eval(), torch.rand(2, 1, 28, 28), torch.tensor([1, 4])
    r = lrp(model, x, targets, composite=EPSILON, epsilon=1e-9)
    rgb = x.repeat(1, 3, 1, 1).requires_grad_(True)
    inner = nn.Sequential(model.conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), model.fc)
    (g,) = torch.autograd.grad(inner(rgb).gather(1, targets.view(-1, 1)).sum(), rgb)
    expected = (g * rgb).detach().sum(dim=1, keepdim=True)
    assert r.relevance.shape == x.shape
    assert float((r.relevance - expected).abs().max()) <= 1e-3 * float(expected.abs().max())


def test_explain_with_lrp_gives_both_classes_and_no_ig() -> None:
    torch.manual_seed(4)
    model = SmallCNN().eval()
    x, labels = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    ex = explain(model, x, labels, "relu3", pixel_method=LRP)
    assert ex.ig_predicted is None and ex.lrp_predicted is not None and ex.lrp_true is not None
    pred, true = ex.pixel_maps()
    assert torch.allclose(pred, lrp(model, x, ex.predicted).relevance, rtol=1e-4, atol=1e-9)
    assert torch.allclose(true, lrp(model, x, labels).relevance, rtol=1e-4, atol=1e-9)
    with pytest.raises(ConfigError, match="pixel_method"):
        explain(model, x, labels, "relu3", pixel_method="saliency")


def _decode(event: object) -> torch.Tensor:
    arr = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def test_callback_draws_lrp_panels_read_back_from_the_event_file(make_cfg: MakeCfg, tmp_path: Path) -> None:
    ids = [22, 193]
    cfg = make_cfg(
        "callbacks=[none,attribution]",
        "trainer.max_epochs=1",
        "callbacks.attribution.pixel_method=lrp",
        f"callbacks.attribution.image_ids=[{','.join(map(str, ids))}]",
    )
    train(cfg)
    ev = read_events(tmp_path)
    images, scalars = ev["images"], ev["scalars"]
    assert not any(t.startswith("attribution/ig_gap/") for t in scalars), "no IG numbers from an LRP run"
    for tag in scalars:
        if tag.startswith("attribution/"):
            assert tags.family(tag, "scalar") is tags.ATTRIBUTION_LRP_CONSERVED, tag
    assert {tags.family(t, "image") for t in images if t.startswith("attribution/")} == {tags.ATTRIBUTION}
    datamodule, model, _ = build(cfg)
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(trained)
    model.eval()
    datamodule.prepare_data()
    datamodule.setup("fit")
    probe = build_probe(datamodule, AttributionCallback().probe_spec, model)
    positions = probe.positions(ids)
    x, y = probe.inputs[positions], probe.labels[positions]
    with torch.no_grad():
        predicted = model(x).argmax(1)
    pred_r, true_r = lrp(model, x, predicted), lrp(model, x, y)
    row_width = 5 * CELL + 4 * GAP
    for k, img in enumerate(ids):
        tag = tags.ATTRIBUTION.format(image=img)
        event = next(e for e in images[tag] if e.step == 1)
        picture = _decode(event)
        left = (event.width - row_width) // 2
        assert float(pred_r.relevance[k].abs().max()) > 0, "a trained network's LRP map is not all zero"
        for j, cell in enumerate(pixel_cells(pred_r.relevance[k], true_r.relevance[k]), start=3):
            expected = viz.upscale(cell.unsqueeze(0), CELL)[0]
            shown = picture[:, :CELL, left + j * (CELL + GAP) : left + j * (CELL + GAP) + CELL]
            assert (shown - expected).abs().max() <= 1.5 / 255, f"{tag}: LRP panel {j}"
        conserved = dict(scalars[tags.ATTRIBUTION_LRP_CONSERVED.format(image=img)])
        both = torch.stack([pred_r.conserved[k], true_r.conserved[k]])
        assert conserved[1] == pytest.approx(float(both[(both - 1).abs().argmax()]), rel=1e-5, abs=1e-6)


def test_callback_refuses_lrp_on_a_residual_network_before_training() -> None:
    cb = AttributionCallback(pixel_method="lrp", image_ids=[0])
    with pytest.raises(LRPError, match="'add'"):
        from cnnfeat.probe import probe_from_tensors

        cb.prepare(Residual().eval(), probe_from_tensors(torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 0])))
    with pytest.raises(ConfigError, match="pixel_method"):
        AttributionCallback(pixel_method="LRP")


# -- the review's cases: each refused naming the node, or mapped back exactly -------------------------------------
class SharedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 28 * 28, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv2(F.relu(self.bn(self.conv1(x))))).flatten(1))


class Prefix(nn.Module):
    """A first conv behind ``prefix`` (a rearrangement of the input)."""

    def __init__(self, prefix: Callable[[torch.Tensor], torch.Tensor], channels: int = 1) -> None:
        super().__init__()
        self.prefix = prefix
        self.conv = nn.Conv2d(channels, 2, 3, padding=1, bias=False)
        self.fc = nn.Linear(2 * 28 * 28, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(self.prefix(x))).flatten(1))


class ReusedOnABuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(28 * 28, 3)
        self.register_buffer("ref", torch.zeros(1, 28 * 28))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(self.conv(x).flatten(1))
        self.fc(self.ref)  # a second call on a tensor not computed from the input: zennit would keep its tensors
        return out


@pytest.mark.parametrize(
    ("model", "node", "channels"),
    [
        (SharedBN(), "bn:1", 1),
        (Prefix(lambda x: x.transpose(2, 3)), "transpose", 1),
        (Prefix(lambda x: x.permute(0, 1, 3, 2)), "permute", 1),
        (Prefix(lambda x: x[:, [2, 1, 0]], channels=3), "getitem", 3),
        (ReusedOnABuffer(), "fc:1", 1),
    ],
)
def test_what_would_move_relevance_or_corrupt_the_model_is_refused(model: nn.Module, node: str, channels: int) -> None:
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LRPError) as err:
        lrp(model, torch.rand(2, channels, 28, 28), torch.tensor([0, 1]))
    assert repr(node) in str(err.value), str(err.value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} untouched"


def test_flattened_and_standardised_inputs_map_back_onto_their_pixels() -> None:
    torch.manual_seed(6)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
    x, targets = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 3])
    r = lrp(mlp.eval(), x, targets, composite=EPSILON, epsilon=1e-9)
    expected = _grad_x_input(mlp, x, targets)
    assert r.relevance.shape == x.shape
    assert float((r.relevance - expected).abs().max()) <= 1e-3 * float(expected.abs().max())
    # a per-channel standardisation that broadcasts grey to three channels: each copy's relevance comes back home
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    model = _no_biases(Prefix(lambda x: (x - mean) / std, channels=3))
    r = lrp(model, x, torch.tensor([0, 1, 2]), composite=EPSILON, epsilon=1e-9)
    z = ((x - mean) / std).requires_grad_(True)
    inner = nn.Sequential(model.conv, nn.ReLU(), nn.Flatten(), model.fc)
    (g,) = torch.autograd.grad(inner(z).gather(1, torch.tensor([[0], [1], [2]])).sum(), z)
    expected = (g * z).detach().sum(dim=1, keepdim=True)
    assert r.relevance.shape == x.shape
    assert float((r.relevance - expected).abs().max()) <= 1e-3 * float(expected.abs().max())
