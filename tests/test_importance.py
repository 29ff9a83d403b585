"""Unit ablation (cnnfeat.importance) against a brute-force loop that removes each unit by hand, Captum's
LayerFeatureAblation, a network whose important and idle units are known by construction, and a unit killed at a
known epoch."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerFeatureAblation
from torch import nn

from cnnfeat.atlas import default_layers
from cnnfeat.errors import ConfigError
from cnnfeat.graph import trace_graph
from cnnfeat.importance import (
    DEFAULT_BUDGET,
    FiringRate,
    Route,
    UnitImportance,
    ablation_cost,
    ablation_importance,
    ablation_node,
    bounded_units,
    choose_units,
    classify,
    expands_at_node,
    firing_rate,
    forward_share,
    route,
)
from cnnfeat.models import SmallCNN
from cnnfeat.probe import probe_from_tensors
from cnnfeat.probe_pass import PassRequest, run_pass
from cnnfeat.units import fires


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These tensors are small: one thread is as fast as two, and many times faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_force(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, kill: HookKill | FlagKill
) -> dict[str, torch.Tensor]:
    """Per unit: the forward pass run once per unit with ``kill(u)`` active, then the drops, overall and per class."""
    with torch.no_grad():
        base = model(x)
        k = base.shape[1]
        out = {"logit": [], "acc": [], "class_logit": [], "class_acc": []}
        for u in range(kill.units):
            with kill(u):
                abl = model(x)
            d_logit = base.gather(1, y.view(-1, 1))[:, 0] - abl.gather(1, y.view(-1, 1))[:, 0]
            d_ok = (base.argmax(1) == y).double() - (abl.argmax(1) == y).double()
            out["logit"].append(d_logit.double().mean())
            out["acc"].append(d_ok.mean())
            out["class_logit"].append(torch.stack([d_logit[y == c].double().mean() for c in range(k)]))
            out["class_acc"].append(torch.stack([d_ok[y == c].mean() for c in range(k)]))
    return {key: torch.stack(v) for key, v in out.items()}


class HookKill:
    """Removes unit u of a module's output with a forward hook (the hand loop's way)."""

    def __init__(self, module: nn.Module, units: int) -> None:
        self.module, self.units = module, units

    @contextmanager
    def __call__(self, u: int) -> Iterator[None]:
        def hook(_m: nn.Module, _a: tuple, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[:, u] = 0
            return out

        handle = self.module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def assert_matches(imp: UnitImportance, ref: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(imp.logit_drop, ref["logit"], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(imp.acc_drop, ref["acc"], atol=1e-12, rtol=0)
    torch.testing.assert_close(imp.class_logit_drop, ref["class_logit"], atol=2e-6, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(imp.class_acc_drop, ref["class_acc"], atol=1e-12, rtol=0, equal_nan=True)


@functools.cache
def trained_ish_cnn() -> tuple[SmallCNN, torch.Tensor, torch.Tensor]:
    """SmallCNN after 30 SGD steps on a class-dependent synthetic set (65% right), so units differ in importance
    (built once; the tests only read it)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = SmallCNN()
    y = torch.randint(0, 10, (96,), generator=gen)
    x = torch.rand(96, 1, 28, 28, generator=gen) * 0.3
    for c in range(10):  # a bright bar whose row says the class
        x[y == c, :, 2 + 2 * c : 4 + 2 * c, 4:24] += 0.7
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def test_ablation_equals_a_brute_force_loop_on_every_small_cnn_layer() -> None:
    model, x, y = trained_ish_cnn()
    graph = trace_graph(model, x[:1])
    nodes = {ablation_node(graph, layer): None for layer in default_layers(graph)}
    assert list(nodes) == ["relu1", "relu2", "relu3", "relu5"]
    # exact shortcuts: zero after pooling a ReLU's output, copies start after the next conv / (flatten +) linear layer
    assert [(r.point, r.linear, r.expands) for r in map(lambda n: route(graph, n), nodes)] == [
        ("relu1", "conv2", True),
        ("pool1", "conv3", True),
        ("pool2", "fc1", True),
        ("relu5", "fc3", True),
    ]
    imp = ablation_importance(model, x, y, graph, nodes, batch_size=40, max_elements=40 * 6 * 28 * 28 * 2)
    modules = dict(model.named_modules())
    for node, r in imp.items():
        n = graph[node].output_shape[1]
        assert r.units.tolist() == list(range(n)) and r.images == 96
        assert_matches(r, brute_force(model, x, y, HookKill(modules[node], n)))
        with torch.no_grad():
            out = model(x)
        assert r.base_accuracy == pytest.approx(float((out.argmax(1) == y).double().mean()))
        acts: list[torch.Tensor] = []
        h = modules[node].register_forward_hook(lambda _m, _a, o, acts=acts: acts.append(o.clone()))
        with torch.no_grad():
            model(x)
        h.remove()
        torch.testing.assert_close(r.firing, (acts[0] > 0).double().mean(dim=(0, *range(2, acts[0].ndim))))
    assert imp["relu3"].logit_drop.abs().max() > 0.05, "some units matter in this network"
    assert 0.5 < imp["relu3"].base_accuracy < 0.8


def test_ablation_equals_captums_layer_feature_ablation() -> None:
    model, x, y = trained_ish_cnn()
    graph = trace_graph(model, x[:1])
    imp = ablation_importance(model, x, y, graph, {"relu2": None, "relu5": [3, 7, 50]})
    for node, units in (("relu2", range(6)), ("relu5", [3, 7, 50])):
        layer = dict(model.named_modules())[node]
        shape = graph[node].output_shape
        mask = torch.arange(shape[1]).view(1, -1, *([1] * (len(shape) - 2)))
        attr = LayerFeatureAblation(model, layer).attribute(x, target=y, layer_mask=mask)
        per_unit = attr.flatten(2)[:, :, 0] if attr.ndim > 2 else attr  # (N, C): each image's drop
        expect = per_unit[:, list(units)].double().mean(0)
        torch.testing.assert_close(imp[node].logit_drop, expect, atol=2e-6, rtol=1e-5)


class FunctionalNet(nn.Module):
    """``F.relu``, then a residual join around ``relu1`` and an in-place ``x.relu_()``; ``kill`` removes a unit by
    hand inside the forward pass (the brute force, no hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 3)
        self.kill: tuple[str, int] | None = None

    def _kill(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if self.kill is not None and self.kill[0] == name:
            t = t.clone()
            t[:, self.kill[1]] = 0
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self._kill("relu1", self.relu1(self.conv1(x)))
        b = self._kill("relu", F.relu(self.conv2(a)))
        c = self._kill("add", b + a)  # a goes around conv2: relu1 is no cut of the graph
        d = self.conv3(F.max_pool2d(c, 2))
        d.relu_()
        if self.kill is not None and self.kill[0] == "relu:1":
            d[:, self.kill[1]] = 0
        return self.fc(torch.flatten(F.max_pool2d(d * 0.5, 2), 1))


class FlagKill:
    """Removes unit u by the model's own ``kill`` flag."""

    def __init__(self, model: FunctionalNet, node: str, units: int) -> None:
        self.model, self.node, self.units = model, node, units

    @contextmanager
    def __call__(self, u: int) -> Iterator[None]:
        self.model.kill = (self.node, u)
        try:
            yield
        finally:
            self.model.kill = None


def test_ablation_of_functional_in_place_and_bypassed_nodes_equals_a_hand_loop() -> None:
    torch.manual_seed(0)
    model = FunctionalNet().eval()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(30, 1, 16, 16, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    graph = trace_graph(model, x[:1])
    # a (relu1's output) joins again after relu: relu is no cut of the graph, so the inputs are expanded there
    assert not expands_at_node(graph, "relu") and expands_at_node(graph, "relu1") and expands_at_node(graph, "add")
    assert forward_share(graph, "relu") == 1.0 and forward_share(graph, "relu:1") < forward_share(graph, "relu1")
    assert route(graph, "relu") == Route("relu", "relu", None, False)  # bypassed: the inputs are copied
    # copies would start at relu:1, computed in place: a trial pass finds that, and the inputs are copied instead
    assert route(graph, "relu:1") == Route("relu:1", "relu:1", None, True)
    nodes = {"relu1": None, "relu": None, "add": None, "relu:1": None}
    imp = ablation_importance(model, x, y, graph, nodes, batch_size=8, max_elements=8 * 4 * 16 * 16 * 2)
    for node, r in imp.items():
        assert_matches(r, brute_force(model, x, y, FlagKill(model, node, graph[node].output_shape[1])))


class SharedWeights(FunctionalNet):
    """One Conv2d and one Linear, each called twice: removing a unit after the first call must start the copies at
    the second call's output (a graph node "conv2:1" / "mid:1", not a module path), the unit's own contribution taken
    out; ``kill`` removes it by hand (``FunctionalNet._kill``)."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.mid = nn.Linear(16, 16)
        self.fc = nn.Linear(16, 3)
        self.kill: tuple[str, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.max_pool2d(F.relu(self.conv1(x)), 2)
        b = self._kill("relu:1", F.relu(self.conv2(a)))
        c = F.adaptive_avg_pool2d(F.relu(self.conv2(b)), 2).flatten(1)
        d = self._kill("relu:3", F.relu(self.mid(c)))
        return self.fc(F.relu(self.mid(d)))


def test_ablation_before_a_module_called_a_second_time_equals_a_hand_loop() -> None:
    torch.manual_seed(0)
    model = SharedWeights().eval()
    with torch.no_grad():  # larger logits: removing a unit moves them well past the tolerance
        model.fc.weight.mul_(20)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.rand(40, 1, 12, 12, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    graph = trace_graph(model, x[:1])
    assert route(graph, "relu:1").linear == "conv2:1" and route(graph, "relu:3").linear == "mid:1"
    imp = ablation_importance(model, x, y, graph, {"relu:1": None, "relu:3": None}, batch_size=8)
    for node, r in imp.items():
        ref = brute_force(model, x, y, FlagKill(model, node, graph[node].output_shape[1]))
        assert ref["logit"].abs().max() > 1e-3  # the units matter: a wrong unit removed would show
        assert_matches(r, ref)


def test_a_unit_that_can_be_negative_is_zeroed_before_max_pooling() -> None:
    """Max-pooling keeps a zeroed channel zero only for non-negative maps: a conv's raw output is zeroed in place."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).eval()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 1, 8, 8, generator=gen), torch.randint(0, 2, (20,), generator=gen)
    graph = trace_graph(model, x[:1])
    assert route(graph, "0") == Route("0", "0", None, True)
    imp = ablation_importance(model, x, y, graph, {"0": None})["0"]
    assert_matches(imp, brute_force(model, x, y, HookKill(model[0], 3)))


# -- known by construction ---------------------------------------------------------------------------------------------
class Known(nn.Module):
    """Four units after a 1x1 conv (input channels: signal s, rare spot r), averaged, then a linear read-out.

    unit 0 = s: the class-1 signal (4 x its mean feeds class 1); unit 1 = 1 everywhere (fires most) but feeds
    nothing; unit 2 = 10 r: fires at one pixel of class-2 images only, and class 2 needs it; unit 3 = s / 2, a weak
    helper of class 1. Class 0 wins by its bias when nothing else speaks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 0], [0, 0], [0, 10], [0.5, 0]]).view(4, 2, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))
            self.fc.weight.copy_(torch.tensor([[0.0, 0, 0, 0], [4, 0, 0, 1], [0, 0, 18, 0]]))
            self.fc.bias.copy_(torch.tensor([2.0, 0, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def known_data() -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.tensor([0] * 40 + [1] * 40 + [2] * 20)
    x = torch.zeros(100, 2, 6, 6)
    x[y == 1, 0] = 1.0
    x[y == 2, 1, 3, 2] = 1.0
    return x, y


def test_a_network_whose_units_are_known_is_ranked_and_called_out_correctly() -> None:
    model, (x, y) = Known().eval(), known_data()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).all()
    graph = trace_graph(model, x[:1])
    assert ablation_node(graph, "conv") == "relu"
    imp = ablation_importance(model, x, y, graph, {"relu": None})["relu"]
    assert imp.ranking().tolist() == [0, 2, 3, 1]
    torch.testing.assert_close(imp.logit_drop, torch.tensor([1.6, 0.0, 1.0, 0.2], dtype=torch.float64))
    torch.testing.assert_close(imp.acc_drop, torch.tensor([0.4, 0.0, 0.2, 0.0], dtype=torch.float64))
    assert imp.logit_drop[1] == 0 and imp.acc_drop[1] == 0, "a unit that feeds nothing matters exactly nothing"
    torch.testing.assert_close(imp.class_logit_drop[2], torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(imp.firing, torch.tensor([0.4, 1.0, 0.2 / 36, 0.4], dtype=torch.float64))
    roles = classify(imp)
    assert roles.busy_idle.tolist() == [False, True, False, False]
    assert roles.rare_vital.tolist() == [False, False, True, False]


def test_a_unit_that_dies_at_epoch_k_has_zero_importance_from_then_on() -> None:
    """Train a small CNN; at epoch KILL unit 2's bias drops far below zero, so it never fires again (its ReLU passes
    no gradient). Its importance is exactly zero from that epoch on, and it is dead by ``units.fires``."""
    kill, epochs = 2, 5
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (60,), generator=gen)
    x = torch.rand(60, 1, 12, 12, generator=gen) * 0.2
    for c in range(3):
        x[y == c, :, 4 * c : 4 * c + 4, 2:10] += 0.8
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    graph = trace_graph(model, x[:1])
    history = []
    for epoch in range(epochs):
        if epoch == kill:
            with torch.no_grad():
                model[0].bias[2] = -100.0
        model.train()
        for b in range(0, 60, 20):
            opt.zero_grad()
            F.cross_entropy(model(x[b : b + 20]), y[b : b + 20]).backward()
            opt.step()
        imp = ablation_importance(model, x, y, graph, {"1": None})["1"]
        with torch.no_grad():
            alive = fires(model[1](model[0](x))).flatten(2).any(2).any(0)
        history.append((imp, alive))
    for epoch, (imp, alive) in enumerate(history):
        if epoch < kill:
            assert alive[2] and imp.logit_drop[2] != 0
        else:
            assert not alive[2]
            assert imp.logit_drop[2] == 0 and imp.acc_drop[2] == 0 and imp.firing[2] == 0
            assert (imp.class_logit_drop[2] == 0).all() and (imp.class_acc_drop[2] == 0).all()
            assert (imp.logit_drop[[0, 1, 3]] != 0).all()
            assert classify(imp).busy_idle[2].item() is False, "a dead unit does not fire a lot"


# -- firing, cost, bounds, errors ----------------------------------------------------------------------------------
def test_firing_rate_from_the_shared_probe_pass_equals_a_direct_count() -> None:
    model, x, y = trained_ish_cnn()
    probe = probe_from_tensors(x, y)
    acc = FiringRate(["relu1", "relu5"])
    run_pass(model, probe, [PassRequest(torch.arange(96), 25, acc, outputs=["relu1", "relu5"])])
    rates = acc.finish()
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(model, n).register_forward_hook(lambda _m, _a, o, n=n: seen.__setitem__(n, o.clone()))
        for n in ("relu1", "relu5")
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    a1, a5 = seen["relu1"], seen["relu5"]
    torch.testing.assert_close(rates["relu1"], (a1 > 0).double().mean(dim=(0, 2, 3)))
    torch.testing.assert_close(rates["relu5"], (a5 > 0).double().mean(dim=0))
    assert math.isclose(float(firing_rate(torch.tensor([[float("nan"), 1.0, -1.0, 0.0]]).T)[0]), 0.25)


def test_cost_and_bounds_are_stated_before_running() -> None:
    model = SmallCNN()
    graph = trace_graph(model, torch.zeros(1, 1, 28, 28))
    per_out = {"conv1": 9, "conv2": 6 * 9, "conv3": 6 * 9, "fc1": 784, "fc2": 120, "fc3": 100}
    outputs = {"conv1": 6 * 784, "conv2": 6 * 784, "conv3": 16 * 196, "fc1": 120, "fc2": 100, "fc3": 10}
    macs = {k: per_out[k] * outputs[k] for k in per_out}
    total = sum(macs.values())
    # relu1's copies start after conv2 (each unit adds its share of conv2); relu3's after fc1, past pool2 and flatten
    assert forward_share(graph, "relu1") == pytest.approx(
        (macs["conv3"] + macs["fc1"] + macs["fc2"] + macs["fc3"] + macs["conv2"] / 6) / total
    )
    assert forward_share(graph, "relu3") == pytest.approx((macs["fc2"] + macs["fc3"] + macs["fc1"] / 16) / total)
    assert forward_share(graph, "relu5") == pytest.approx(macs["fc3"] / 100 / total)
    units = {"relu1": 6, "relu2": 6, "relu3": 16, "relu5": 100}
    cost = ablation_cost(graph, units, 2000)
    assert cost == pytest.approx(2000 * (1 + sum(u * forward_share(graph, n) for n, u in units.items())))
    assert choose_units(100).tolist() == list(range(100))
    sample = choose_units(4096, max_units=256, seed=1)
    assert len(sample) == 256 and sample.unique().numel() == 256 and (sample.diff() > 0).all()
    assert torch.equal(sample, choose_units(4096, max_units=256, seed=1))
    assert choose_units(4096, max_units=None).numel() == 4096
    # the bounded default: SmallCNN's 128 units fit the budget; a network 40x wider is sampled down to it
    assert {n: len(u) for n, u in bounded_units(graph, list(units)).items()} == units
    convs = [nn.Conv2d(1, 240, 3, padding=1), nn.ReLU(), nn.Conv2d(240, 240, 3, padding=1), nn.ReLU()]
    convs += [nn.Conv2d(240, 240, 3, padding=1), nn.ReLU()]
    wide = nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(240, 10))
    g = trace_graph(wide, torch.zeros(1, 1, 8, 8))
    every = {"1": 240, "3": 240}
    chosen = bounded_units(g, list(every), budget=DEFAULT_BUDGET)
    sizes = {n: len(u) for n, u in chosen.items()}
    assert ablation_cost(g, sizes, 1) <= DEFAULT_BUDGET < ablation_cost(g, every, 1)
    assert 1 <= sizes["1"] == sizes["3"] < 240, "the same share of each layer"
    assert {n: len(u) for n, u in bounded_units(g, list(every), budget=None).items()} == every
    with pytest.raises(ConfigError, match="budget must be > 1"):
        bounded_units(g, ["1"], budget=1)


def test_ablation_refusals_name_the_argument() -> None:
    model, (x, y) = Known().eval(), known_data()
    graph = trace_graph(model, x[:1])
    with pytest.raises(ConfigError, match=r"units \[4\] out of range for 'relu' \(4 units\)"):
        ablation_importance(model, x, y, graph, {"relu": [4]})
    with pytest.raises(ConfigError, match="100 inputs, 99 labels"):
        ablation_importance(model, x, y[:99], graph, {"relu": None})
    with pytest.raises(ConfigError, match="labels go up to 5 but the model has 3 classes"):
        ablation_importance(model, x, torch.full((100,), 5), graph, {"relu": None})
    with pytest.raises(ConfigError, match="max_units must be >= 1"):
        choose_units(10, max_units=0)
    seq = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Flatten(), nn.Linear(3 * 36, 3))
    xs = x.flatten(2)
    with pytest.raises(ConfigError, match=r"node '0' outputs shape \(1, 3, 36\): units need"):
        ablation_importance(seq, xs, y, trace_graph(seq, xs[:1]), {"0": None})
