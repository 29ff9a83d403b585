"""Attribution and relevance (cnnfeat.attribution, cnnfeat.relevance) against independent answers: Captum's own
LayerGradCam and LayerGradientXActivation, Integrated Gradients by hand, full Jacobians, brute-force top-k, SciPy's
Spearman, and networks whose answer is known by construction."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam, LayerGradientXActivation
from scipy.stats import spearmanr
from torch import nn

from cnnfeat.attribution import (
    conditional_heatmaps,
    explain,
    forward_with_taps,
    grad_cam,
    integrated_gradients,
    intervene,
    last_conv_stage,
    unit_relevance,
    upsample,
)
from cnnfeat.errors import ConfigError
from cnnfeat.graph import LayerError, trace_graph
from cnnfeat.models import SmallCNN
from cnnfeat.receptive_field import graph_receptive_fields
from cnnfeat.relevance import boxes, lower_nodes, path_check, reference_heatmaps, references, spearman


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These tensors are small: one thread is as fast as two, and many times faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN().eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


class FunctionalNet(nn.Module):
    """Functional ReLUs (``relu``, then ``relu:1`` computed in place), as the PyTorch examples write them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 14 * 14, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.conv2(F.max_pool2d(x, 2))
        x.relu_()
        return self.fc(torch.flatten(x, 1))


# -- Grad-CAM ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("node", ["relu3", "conv2", "relu1"])
def test_grad_cam_equals_captums_layer_grad_cam_on_module_nodes(node: str) -> None:
    model, x = small_cnn(), images(5)
    targets = torch.tensor([0, 3, 9, 3, 5])
    layer = dict(model.named_modules())[node]
    for relu in (True, False):
        ours = grad_cam(model, x, targets, node, relu=relu)
        ref = LayerGradCam(model, layer).attribute(x, target=targets, relu_attributions=relu).squeeze(1).detach()
        scale = float(ref.abs().max())
        assert scale > 0
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=1e-5 * scale, rtol=1e-5)


def test_grad_cam_at_functional_relu_nodes_equals_autograd_through_a_plain_forward() -> None:
    """Captum needs a module and cannot hook ``F.relu`` or ``x.relu_()``: there, Grad-CAM is checked against
    gradients taken by hand through a re-implementation of the forward pass (no hooks)."""
    torch.manual_seed(0)
    model, x, t = FunctionalNet().eval(), images(4), torch.tensor([0, 1, 2, 1])
    assert last_conv_stage(trace_graph(model, x[:1])) == "relu:1"
    a1 = F.relu(model.conv1(x))
    a1.retain_grad()
    a2 = F.relu(model.conv2(F.max_pool2d(a1, 2)))
    a2.retain_grad()
    model.fc(torch.flatten(a2, 1)).gather(1, t.view(-1, 1)).sum().backward()
    for node, a in (("relu", a1), ("relu:1", a2)):
        by_hand = (a.grad.mean(dim=(2, 3), keepdim=True) * a).sum(1).clamp(min=0).detach()
        assert by_hand.abs().max() > 0
        torch.testing.assert_close(grad_cam(model, x, t, node), by_hand, atol=1e-6, rtol=1e-5)
    model.zero_grad()


def test_grad_cam_leaves_the_model_as_it_was() -> None:
    model, x = small_cnn(), images(3)
    model.train()
    model.fc1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        cam = grad_cam(model, x, torch.tensor([1, 2, 3]), "relu3")
    assert cam.shape == (3, 14, 14) and cam.min() >= 0
    assert model.training and not model.fc1.training and model.conv1.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    up = upsample(cam, (28, 28))
    assert up.shape == (3, 28, 28)
    with torch.inference_mode():  # as a callback may call them, with inputs made there
        xi = images(3) * 1.0
        torch.testing.assert_close(grad_cam(model, xi, torch.tensor([1, 2, 3]), "relu3"), cam)
        assert (
            integrated_gradients(model, xi, torch.tensor([1, 2, 3]), steps=4, max_steps=4).attributions.shape
            == xi.shape
        )
        assert conditional_heatmaps(model, xi, "relu3", [0, 1, 2]).shape == xi.shape
        assert references(model, xi, ["relu3"], k=2)["relu3"].by_relevance.ids.shape == (2, 16)
        assert ablation_importance_ok(model, xi)
        assert explain(model, xi, torch.tensor([1, 2, 3]), "relu3", ig_steps=4, ig_max_steps=4).cam_true.shape == (
            3,
            14,
            14,
        )


def ablation_importance_ok(model: nn.Module, x: torch.Tensor) -> bool:
    from cnnfeat.importance import ablation_importance

    graph = trace_graph(model, x[:1])
    return ablation_importance(model, x, torch.tensor([1, 2, 3]), graph, {"relu3": [0, 1]})["relu3"].images == 3


def test_grad_cam_refusals_name_the_problem() -> None:
    model, x = small_cnn(), images(2)
    with pytest.raises(ConfigError, match=r"spatial maps .* 'fc2'"):
        grad_cam(model, x, torch.tensor([0, 1]), "fc2")
    with pytest.raises(ConfigError, match=r"targets \[0, 10\] out of range: the model has 10 classes"):
        grad_cam(model, x, torch.tensor([0, 10]), "relu3")
    with pytest.raises(LayerError, match=r"\['conv9'\].*valid names.*relu3"):
        grad_cam(model, x, torch.tensor([0, 1]), "conv9")
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ConfigError, match="no convolution"):
        last_conv_stage(trace_graph(mlp, x[:1]))


def test_intervene_edits_any_node_and_removes_its_hooks() -> None:
    torch.manual_seed(0)
    model, x = FunctionalNet().eval(), images(2)
    with torch.no_grad():
        base = model(x)

        def zero(t: torch.Tensor, inplace: bool) -> torch.Tensor:
            return t.zero_() if inplace else torch.zeros_like(t)

        with intervene(model, {"relu:1": zero}):
            out = model(x)
        torch.testing.assert_close(out, model.fc.bias.expand(2, 3))  # everything before fc zeroed
        torch.testing.assert_close(model(x), base)  # nothing left behind
    _, taps = forward_with_taps(model, x, ["relu", "relu:1"])
    assert taps["relu"].shape == (2, 4, 28, 28) and taps["relu:1"].requires_grad
    message = r"this forward pass produced no such node; valid names: \['conv1', 'relu'"
    with pytest.raises(LayerError, match=message), intervene(model, {"relu:2": zero}):
        model(x)


# -- Integrated Gradients -------------------------------------------------------------------------------------------
def ig_by_hand(model: nn.Module, x: torch.Tensor, t: torch.Tensor, steps: int) -> torch.Tensor:
    """Gauss-Legendre Integrated Gradients with autograd, one point at a time (zero baseline)."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    total = torch.zeros_like(x)
    for a, w in zip((nodes + 1) / 2, weights / 2, strict=True):
        xi = (float(a) * x).requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi).gather(1, t.view(-1, 1)).sum(), [xi])
        total += float(w) * g
    return x * total


def test_integrated_gradients_equal_a_hand_computation_and_are_complete() -> None:
    model, x = small_cnn(3), images(3, seed=5)
    t = torch.tensor([2, 7, 4])
    fixed = integrated_gradients(model, x, t, steps=16, max_steps=16)
    torch.testing.assert_close(fixed.attributions, ig_by_hand(model, x, t, 16), atol=1e-6, rtol=1e-4)
    assert fixed.steps.tolist() == [16, 16, 16]
    # completeness: a small ReLU network with biases (not homogeneous, so the steps matter), against logits
    # computed here
    torch.manual_seed(4)
    net = BiasFree().eval()
    for m in (net.conv1, net.conv2):
        m.bias = nn.Parameter(torch.randn(m.out_channels) * 0.3)
    xs = torch.rand(4, 1, 10, 10, generator=torch.Generator().manual_seed(6))
    ts = torch.tensor([0, 1, 2, 0])
    res = integrated_gradients(net, xs, ts, steps=8, max_steps=2048, tolerance=0.01, atol=0.0)
    with torch.no_grad():
        diff = net(xs).gather(1, ts.view(-1, 1))[:, 0] - net(torch.zeros_like(xs)).gather(1, ts.view(-1, 1))[:, 0]
    sums = res.attributions.flatten(1).sum(1)
    assert diff.abs().min() > 1e-3
    assert ((sums - diff).abs() <= 0.01 * diff.abs()).all(), (sums, diff, res.steps)
    assert res.steps.max() > 8, "this network needs more than 8 steps somewhere"
    torch.testing.assert_close(res.difference, diff, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res.delta, sums - diff, atol=1e-5, rtol=1e-4)
    # started where each row ended (a callback's next epoch): the same counts, the same attributions, fewer passes
    again = integrated_gradients(net, xs, ts, steps=res.steps, max_steps=2048, tolerance=0.01, atol=0.0)
    assert torch.equal(again.steps, res.steps)
    torch.testing.assert_close(again.attributions, res.attributions)
    with pytest.raises(ConfigError, match="one count or one per input row, got 2 for 4 rows"):
        integrated_gradients(net, xs, ts, steps=torch.tensor([8, 8]))


def test_explain_gives_both_classes_and_reuses_agreeing_pairs() -> None:
    model, x = small_cnn(), images(4)
    with torch.no_grad():
        pred = model(x).argmax(1)
    labels = pred.clone()
    labels[1] = (pred[1] + 1) % 10  # one wrong prediction
    e = explain(model, x, labels, "relu3", ig_steps=8, ig_max_steps=8)
    assert e.predicted.tolist() == pred.tolist()
    torch.testing.assert_close(e.cam_predicted, grad_cam(model, x, pred, "relu3"))
    torch.testing.assert_close(e.cam_true, grad_cam(model, x, labels, "relu3"))
    torch.testing.assert_close(
        e.ig_true.attributions[1],
        integrated_gradients(model, x[1:2], labels[1:2], steps=8, max_steps=8).attributions[0],
    )
    torch.testing.assert_close(e.probabilities.sum(1), torch.ones(4))
    assert torch.equal(e.ig_steps(), torch.full((4,), 8))


# -- relevance at units ------------------------------------------------------------------------------------------------
def test_unit_relevance_equals_captums_gradient_x_activation() -> None:
    model, x = small_cnn(), images(4)
    rel, _, classes = unit_relevance(model, x, ["relu2", "relu5"])
    with torch.no_grad():
        assert classes.tolist() == model(x).argmax(1).tolist()
    for node in ("relu2", "relu5"):
        layer = dict(model.named_modules())[node]
        ref = LayerGradientXActivation(model, layer).attribute(x, target=classes).detach()
        torch.testing.assert_close(rel[node], ref, atol=1e-6, rtol=1e-5)


class BiasFree(nn.Module):
    """ReLU network without biases: positively homogeneous, so a unit's input relevance sums to its relevance."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 5 * 5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))), 1))


def test_conditional_heatmaps_equal_a_full_jacobian_and_conserve_relevance() -> None:
    torch.manual_seed(0)
    model = BiasFree().eval()
    x = torch.rand(3, 1, 10, 10, generator=torch.Generator().manual_seed(2))
    units = torch.tensor([0, 2, 3])
    heat = conditional_heatmaps(model, x, "relu2", units)
    rel, _, t = unit_relevance(model, x, ["relu2"])
    for i, u in enumerate(units.tolist()):
        xi = x[i : i + 1]

        def act(inp: torch.Tensor, u: int = u) -> torch.Tensor:
            return model.relu2(model.conv2(model.relu1(model.conv1(inp))))[0, u]

        jac = torch.autograd.functional.jacobian(act, xi)  # (h, w, 1, 1, H, W): unit u's map by input pixel
        a_all = model.relu2(model.conv2(model.relu1(model.conv1(xi))))
        a_all.retain_grad()
        model.fc(torch.flatten(model.pool(a_all), 1))[0, t[i]].backward()
        expect = xi[0] * torch.einsum("hw,hwabcd->abcd", a_all.grad[0, u], jac)[0]
        torch.testing.assert_close(heat[i], expect, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(heat[i].sum(), rel["relu2"][i, u].sum(), atol=1e-5, rtol=1e-4)


def test_relevance_references_equal_brute_force_top_k() -> None:
    model, x = small_cnn(), images(40)
    ids = torch.arange(100, 140)
    refs = references(model, x, ["relu3", "relu5"], k=5, ids=ids, batch_size=16)
    rel, acts, _ = unit_relevance(model, x, ["relu3", "relu5"])
    for node in ("relu3", "relu5"):
        r = refs[node]
        for top, maps in ((r.by_relevance, rel[node]), (r.by_activation, acts[node])):
            flat = maps.flatten(2) if maps.ndim == 4 else maps.unsqueeze(2)
            best = flat.max(dim=2).values  # (N, U): each image at its best position
            vals = best.topk(5, dim=0).values
            torch.testing.assert_close(top.values, vals, atol=1e-6, rtol=1e-5)
            # ties may pick other images: each chosen (image, position) must hold the value it is listed with
            rows = top.ids - 100
            units = torch.arange(flat.shape[1]).expand_as(rows)
            torch.testing.assert_close(flat[rows, units, top.positions], top.values, atol=1e-6, rtol=1e-5)
            assert all(len(set(c.tolist())) == 5 for c in top.ids.T), "k different images per unit"
        shared = []  # references are images with a positive value; none on either side: no overlap (NaN)
        for u in range(r.by_relevance.ids.shape[1]):
            by_rel = set(r.by_relevance.ids[:, u][r.by_relevance.values[:, u] > 0].tolist())
            by_act = set(r.by_activation.ids[:, u][r.by_activation.values[:, u] > 0].tolist())
            shared.append(len(by_rel & by_act) / len(by_rel) if by_rel and by_act else float("nan"))
        torch.testing.assert_close(r.overlap(), torch.tensor(shared, dtype=torch.float64), equal_nan=True)
    graph = trace_graph(model, x[:1])
    field = graph_receptive_fields(graph, ["relu3"])["relu3"]
    r = refs["relu3"]
    rows, cols = r.rows_cols(r.by_relevance)
    b = boxes(r, r.by_relevance, field)
    assert b[2, 7].tolist() == list(field.box(int(rows[2, 7]), int(cols[2, 7])))
    with pytest.raises(ConfigError, match="'relu5' has no spatial map"):
        boxes(refs["relu5"], refs["relu5"].by_relevance, field)
    heat = reference_heatmaps(model, x, r, r.by_relevance, ids)
    row = int((ids == r.by_relevance.ids[1, 4]).nonzero())
    torch.testing.assert_close(heat[1, 4], conditional_heatmaps(model, x[row : row + 1], "relu3", [4])[0])


# -- trust in optimised inputs ----------------------------------------------------------------------------------------
def test_spearman_equals_scipy_with_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 40), generator=gen).float()
    b = torch.randn(6, 40, generator=gen)
    b[0] = b[0].round()
    expect = [spearmanr(u, v)[0] for u, v in zip(a.numpy(), b.numpy(), strict=True)]
    torch.testing.assert_close(spearman(a, b), torch.tensor(expect, dtype=torch.float64))
    assert spearman(torch.ones(1, 5), torch.arange(5.0).view(1, 5)).item() == 0.0


class TwoRoads(nn.Module):
    """Unit 0 of ``relu2`` is reached two ways: channel 0 of ``relu1`` (bright pixels: what real images have) or
    channel 1 (dark-minus pixels, which no real image in [0, 1] has)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(2 * 8 * 8, 2)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([1.0, -1.0, 0.5]).view(3, 1, 1, 1))
            self.conv1.bias.copy_(torch.tensor([0.0, 0.0, 0.1]))
            self.conv2.weight.zero_()
            self.conv2.weight[0, 0] = 1.0
            self.conv2.weight[0, 1] = 1.0
            self.conv2.weight[1, 2] = 1.0
            self.conv2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.relu2(self.conv2(self.relu1(self.conv1(x)))), 1))


def test_path_check_flags_an_optimised_input_that_takes_another_road() -> None:
    torch.manual_seed(0)
    model = TwoRoads().eval()
    gen = torch.Generator().manual_seed(3)
    real = torch.rand(2, 4, 1, 8, 8, generator=gen) * 0.2
    real[:, :, :, 2:6, 2:6] += 0.8  # bright blobs excite unit 0 through channel 0
    arbitrary = torch.rand(6, 1, 8, 8, generator=gen) * 0.3
    pos = torch.full((2, 4, 2), 4)
    faithful = real[:, 0].clone()  # looks like the real ones
    fake = -real[:, 0].clone()  # the same shape, negative: excites unit 0 through channel 1 only
    with torch.no_grad():
        assert (model.relu2(model.conv2(model.relu1(model.conv1(fake))))[:, 0, 4, 4] > 1).all()
    graph = trace_graph(model, real[0, :1])
    assert lower_nodes(graph, "relu2") == ["input", "relu1"]
    units = torch.tensor([0, 0])
    good = path_check(model, graph, "relu2", units, faithful, pos[:, 0], real, pos, arbitrary, lower=["relu1"])
    bad = path_check(model, graph, "relu2", units, fake, pos[:, 0], real, pos, arbitrary, lower=["relu1"])
    assert not good.flagged.any() and bad.flagged.all()
    assert (good.optimised > good.arbitrary).all() and (bad.optimised < good.optimised).all()
    assert good.per_node.shape == (2, 1) and (good.real > good.arbitrary).all()
    # a fully connected unit is fed by whole maps: compare with Spearman by SciPy over every pair
    fc = path_check(model, graph, "fc", units, fake, pos[:, 0], real, pos, arbitrary, lower=["relu2"])
    with torch.no_grad():
        maps = {
            n: model.relu2(model.conv2(model.relu1(model.conv1(v)))).flatten(1)
            for n, v in (("real", real.flatten(0, 1)), ("fake", fake), ("arb", arbitrary))
        }
    real_maps = maps["real"].view(2, 4, -1)
    for u in range(2):
        opt = np.mean([spearmanr(maps["fake"][u], real_maps[u, j])[0] for j in range(4)])
        arb = np.mean([spearmanr(a, real_maps[u, j])[0] for j in range(4) for a in maps["arb"]])
        assert fc.optimised[u].item() == pytest.approx(opt, abs=1e-9)
        assert fc.arbitrary[u].item() == pytest.approx(arb, abs=1e-9)
    with pytest.raises(ConfigError, match="k >= 2 real images"):
        path_check(model, graph, "relu2", units, fake, pos[:, 0], real[:, :1], pos[:, :1], arbitrary)


def test_explain_takes_one_step_count_per_image_when_predictions_are_wrong() -> None:
    """``Explanation.ig_steps()`` gives one count per image; images whose prediction is wrong get a second
    (true-class) row, which must start from that image's count too."""
    from cnnfeat.attribution import explain, last_conv_stage
    from cnnfeat.graph import trace_graph
    from cnnfeat.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        predicted = model(x).argmax(1)
    labels = (predicted + torch.tensor([0, 1, 0, 2])) % 10  # images 1 and 3 are predicted wrongly
    node = last_conv_stage(trace_graph(model, x[:1]))
    scalar = explain(model, x, labels, node, ig_steps=32)
    per_image = explain(model, x, labels, node, ig_steps=torch.full((4,), 32))
    assert torch.equal(per_image.ig_true.attributions, scalar.ig_true.attributions)
    assert torch.equal(per_image.ig_predicted.attributions, scalar.ig_predicted.attributions)


def test_a_unit_without_references_has_no_overlap() -> None:
    """Tie-broken zeros are no references: a unit that never fires (or is never relevant) gets NaN, not 8/8 shared,
    and only positive-valued images count for a unit that fires on fewer than k images."""
    from cnnfeat.relevance import overlap
    from cnnfeat.topk import TopK

    ids = torch.tensor([[0, 0, 5, 7], [1, 1, 6, 8], [2, 2, 4, 9]])  # (k=3, 4 units), the same images for both sets
    pos = torch.zeros_like(ids)
    act = torch.tensor([[0.0, 2.0, 3.0, 1.0], [0.0, 1.0, 2.0, 0.5], [0.0, 0.5, 0.0, 0.2]])
    rel = torch.tensor([[0.0, -0.1, 1.0, 0.3], [0.0, -0.2, 0.5, 0.2], [0.0, -0.3, 0.2, 0.1]])
    got = overlap(TopK(rel, ids, pos), TopK(act, ids, pos))
    # unit 0 never fires, unit 1 is never relevant: NaN; unit 2: its 3 relevant images, of which 2 fire (4 is a tie
    # at 0 in the activation set): 2/3; unit 3: all 3 on both sides: 1
    torch.testing.assert_close(
        got, torch.tensor([float("nan"), float("nan"), 2 / 3, 1.0], dtype=torch.float64), equal_nan=True
    )
