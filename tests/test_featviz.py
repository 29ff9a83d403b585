"""Feature visualisation by optimisation: known optima, determinism, fidelity on a trained SmallCNN, speed."""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnfeat import featviz, viz
from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.models import SmallCNN, TransferClassifier
from cnnfeat.models.alexnet import IMAGENET_MEAN, IMAGENET_STD

SMALL = (1, 28, 28)
CONV_LAYERS = ("conv1", "conv2", "conv3")
NEURON = featviz.FeatVizSettings(objective="neuron")


@contextmanager
def one_thread() -> Iterator[None]:
    """Train on one CPU thread: as fast here, and far faster than two when other jobs share the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1])


def coords(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    return torch.meshgrid(r, r, indexing="ij")


def fixed_conv(weight: torch.Tensor, bias: float = 0.0) -> nn.Conv2d:
    conv = nn.Conv2d(1, 1, weight.shape[-1])
    with torch.no_grad():
        conv.weight.copy_(weight.view(1, 1, *weight.shape))
        conv.bias.fill_(bias)
    return conv.eval()


class Standardise(nn.Module):
    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def test_oriented_edge_neuron_optimum_correlates_with_the_filter() -> None:
    """A 7x7 step edge at 30 degrees (+1 on one side, -1 on the other): over [0, 1] inputs the centre unit is
    largest for the patch that is 1 where the weight is +1 and 0 where it is -1, i.e. a copy of the filter."""
    i, j = coords(7)
    side = j * math.cos(math.radians(30)) + i * math.sin(math.radians(30)) + 0.25  # no pixel on the edge line
    w = torch.where(side > 0, 1.0, -1.0)
    conv = fixed_conv(w)
    res = featviz.visualise(conv, 1, (1, 21, 21), NEURON)
    patch = res.images[0, 0, 7:14, 7:14]  # the receptive field of the centre unit (7, 7) of the 15x15 output
    assert pearson(patch, w) > 0.9
    assert float(res.activation[0]) >= 0.95 * float(w.clamp(min=0).sum())
    assert res.images.shape == (1, 1, 21, 21) and res.images.min() >= 0 and res.images.max() <= 1
    assert res.targets.tolist() == [[7, 7]] and res.positions.tolist() == [[7, 7]]
    # Read at another position, the same optimum appears under that unit's receptive field.
    off = featviz.visualise(conv, 1, (1, 21, 21), NEURON, positions=torch.tensor([[2, 10]]))
    assert pearson(off.images[0, 0, 2:9, 10:17], w) > 0.9 and off.targets.tolist() == [[2, 10]]


def test_blob_detector_behind_standardisation_and_relu_reaches_its_analytic_maximum() -> None:
    """A centre-surround (difference of Gaussians) filter after input standardisation, read after its ReLU by
    name: the optimum is bright where the weight is positive and dark where it is negative."""
    i, j = coords(7)
    g1, g2 = torch.exp(-(i**2 + j**2) / 2), torch.exp(-(i**2 + j**2) / (2 * 2.5**2))
    w = g1 / g1.sum() - g2 / g2.sum()
    w = w / w.abs().max()
    mean, std, bias = 0.3, 0.35, 0.1
    model = nn.Sequential(
        OrderedDict(norm=Standardise(mean, std), conv=fixed_conv(w, bias), relu=nn.ReLU(inplace=True))
    )
    res = featviz.visualise(featviz.module_output(model, "relu"), [0], (1, 21, 21), NEURON)
    patch = res.images[0, 0, 7:14, 7:14]
    best = float(w.clamp(min=0).sum() / std - mean * w.sum() / std + bias)  # max over [0, 1] pixels
    assert float(res.activation[0]) >= 0.97 * best
    strong = w.abs() > 0.1
    assert ((patch[strong] > 0.5) == (w[strong] > 0)).float().mean() >= 0.95
    assert pearson(patch, w) > 0.8


def test_fully_connected_unit_reaches_its_analytic_maximum() -> None:
    torch.manual_seed(0)
    fc = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    res = featviz.visualise(fc, [0, 2], (1, 8, 8), NEURON)
    w, b = fc[1].weight.detach(), fc[1].bias.detach()
    best = w.clamp(min=0).sum(dim=1) + b
    assert torch.all(res.activation >= 0.97 * best[[0, 2]])
    assert res.units.tolist() == [0, 2] and res.images.shape == (2, 1, 8, 8)


def test_redirected_relu_gradient_revives_a_dead_start() -> None:
    """conv1 (3x3 of ones, bias -6) is below zero on the grey start (4.5 - 6) but fires on white (9 - 6 = 3): a plain
    ReLU passes no gradient to conv2 at the start, the redirected one does, and the optimum (3) is found."""
    model = nn.Sequential(
        OrderedDict(conv1=fixed_conv(torch.ones(3, 3), -6.0), relu=nn.ReLU(), conv2=fixed_conv(torch.ones(1, 1)))
    )
    fn = featviz.module_output(model, "conv2")
    revived = featviz.visualise(fn, 1, (1, 9, 9), featviz.FeatVizSettings())
    stuck = featviz.visualise(fn, 1, (1, 9, 9), featviz.FeatVizSettings(redirect_relu=False))
    assert float(revived.objective_value[0]) > 2.9
    assert float(stuck.objective_value[0]) == 0.0


def random_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1)).eval()


def test_same_seed_gives_identical_images_and_another_seed_different_ones() -> None:
    fn = random_net()
    s = featviz.FeatVizSettings(steps=40, settle=0.25)
    a = featviz.visualise(fn, 5, SMALL, s)
    b = featviz.visualise(fn, 5, SMALL, s)
    c = featviz.visualise(fn, 5, SMALL, featviz.FeatVizSettings(steps=40, settle=0.25, seed=1))
    assert torch.equal(a.images, b.images) and torch.equal(a.activation, b.activation)
    assert (a.images - c.images).abs().amax(dim=(1, 2, 3)).min() > 0.05  # every unit's image differs
    # A unit's start and transforms depend on (seed, unit) only, not on the other units in the batch.
    alone = featviz.visualise(fn, [3], SMALL, s)
    assert torch.allclose(alone.images[0], a.images[3], atol=1e-3)


def test_fidelity_and_flags_follow_the_reference() -> None:
    net = random_net()

    def fn(x: torch.Tensor) -> torch.Tensor:
        return net(x) + 10.0  # every activation positive

    s = featviz.FeatVizSettings(steps=20, settle=0.25)
    reached = featviz.visualise(fn, 5, SMALL, s).activation
    ref = torch.stack([reached[0] / 2, reached[1] * 2, torch.tensor(0.0), torch.tensor(-1.0), reached[4]])
    res = featviz.visualise(fn, 5, SMALL, s, reference=ref)
    assert torch.equal(res.activation, reached)
    assert res.fidelity[:2].tolist() == pytest.approx([2.0, 0.5]) and res.fidelity[4] == pytest.approx(1.0)
    assert res.fidelity[2:4].isnan().all()  # no positive real activation: undefined, and flagged
    assert res.flagged.tolist() == [False, True, True, True, False]
    assert res.share_reaching_real == pytest.approx(0.4)
    no_ref = featviz.visualise(fn, [0], SMALL, s)
    assert no_ref.reference is None and no_ref.flagged.all()


def test_runs_under_no_grad_and_inference_mode_without_touching_model_grads() -> None:
    net = random_net()
    s = featviz.FeatVizSettings(steps=5, settle=0.2)
    with torch.no_grad():
        a = featviz.visualise(net, 2, SMALL, s)
    with torch.inference_mode():
        b = featviz.visualise(net, 2, SMALL, s)
    assert torch.equal(a.images, b.images)
    assert all(p.grad is None for p in net.parameters())


def test_threads_are_restored_after_the_optimisation() -> None:
    before = torch.get_num_threads()
    seen = []
    net = random_net()

    def layer_fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return net(x)

    featviz.visualise(layer_fn, 1, SMALL, featviz.FeatVizSettings(steps=2, threads=1))
    assert seen[0] == 1 and torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objective": "unit"}, "objective must be one of ('channel', 'neuron'), got 'unit'"),
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"lr": 0.0}, "lr must be > 0, got 0.0"),
        ({"parametrization": "cppn"}, "parametrization must be one of ('fft', 'pixel'), got 'cppn'"),
        ({"squash": "tanh"}, "squash must be one of ('sigmoid', 'clamp'), got 'tanh'"),
        ({"settle": 1.5}, "settle must be in [0, 1], got 1.5"),
        ({"scales": ()}, "scales must be non-empty and > 0, got ()"),
        ({"threads": 0}, "threads must be >= 1 or None, got 0"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(kwargs: dict, message: str) -> None:
    with pytest.raises(featviz.FeatVizError) as e:
        featviz.FeatVizSettings(**kwargs)
    assert message in str(e.value)


def test_bad_layer_units_and_reference_are_refused_with_the_reason() -> None:
    net = random_net()
    with pytest.raises(featviz.FeatVizError, match=r"Unknown layer name 'conv9' for Sequential; valid names: \['0'"):
        featviz.module_output(net, "conv9")
    with pytest.raises(featviz.FeatVizError, match=r"image_shape must be \(C, H, W\), got \(28, 28\)"):
        featviz.visualise(net, 2, (28, 28))
    with pytest.raises(featviz.FeatVizError, match=r"units must be non-empty and >= 0, got \[-1\]"):
        featviz.visualise(net, [-1], SMALL)
    with pytest.raises(featviz.FeatVizError, match=r"reference must be a vector .* shape \(3,\) for units up to 4"):
        featviz.visualise(net, 5, SMALL, reference=torch.ones(3))
    with pytest.raises(featviz.FeatVizError, match=r"positions must be \(K, 2\) .* got shape \(5,\)"):
        featviz.visualise(net, 5, SMALL, positions=torch.zeros(5, dtype=torch.long))


def test_best_of_keeps_per_unit_the_run_that_reaches_more() -> None:
    fn = random_net()
    runs = [featviz.visualise(fn, 5, SMALL, featviz.FeatVizSettings(steps=10, seed=k)) for k in (0, 1)]
    best = featviz.best_of(runs)
    both = torch.stack([r.activation for r in runs])
    assert torch.equal(best.activation, both.amax(dim=0))
    for u in range(5):
        winner = runs[int(both[:, u].argmax())]
        assert torch.equal(best.images[u], winner.images[u])
    assert best.seconds == pytest.approx(runs[0].seconds + runs[1].seconds)
    with pytest.raises(featviz.FeatVizError, match="same units of the same layer"):
        featviz.best_of([runs[0], featviz.visualise(fn, [0], SMALL, featviz.FeatVizSettings(steps=2))])


# ---- a briefly trained SmallCNN on the real Fashion-MNIST files -------------------------------------------------


@pytest.fixture(scope="module")
def trained(datamodule: FashionMNISTDataModule) -> tuple[SmallCNN, torch.Tensor]:
    """SmallCNN after 300 steps of ``experiment=seed``'s recipe (inputs in [0, 1], SGD lr 0.2, batch 128, seed 0)
    on the training split, and the 10k test images."""
    x, y = datamodule.images("train", torch.arange(30_000))
    torch.manual_seed(0)
    model = SmallCNN(input_mean=None, input_std=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(0)
    with one_thread():
        for _ in range(300):
            idx = torch.randint(len(x), (128,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval().requires_grad_(False)
    test_images, test_labels = datamodule.images("test")
    with torch.no_grad():
        assert (model(test_images).argmax(1) == test_labels).float().mean() > 0.7  # it has learned something
    return model, test_images


def brute_force_maps(model: SmallCNN, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """conv1..conv3 outputs computed by hand from the modules (no hooks)."""
    with torch.no_grad():
        c1 = model.conv1(images)
        c2 = model.conv2(F.relu(c1))
        c3 = model.conv3(F.max_pool2d(F.relu(c2), 2))
    return dict(zip(CONV_LAYERS, (c1, c2, c3), strict=True))


def test_real_best_finds_the_top_activation_and_where_it_is(trained: tuple[SmallCNN, torch.Tensor]) -> None:
    model, images = trained
    maps = brute_force_maps(model, images[:3000])
    for name in CONV_LAYERS:
        best = featviz.real_best(featviz.module_output(model, name), images[:3000], batch_size=700)
        assert torch.allclose(best.values, maps[name].amax(dim=(0, 2, 3)), atol=1e-5)
        channels = torch.arange(len(best.values))
        at = maps[name][best.image_ids, channels, best.positions[:, 0], best.positions[:, 1]]
        assert torch.allclose(at, best.values, atol=1e-5)


def test_trained_smallcnn_neuron_inputs_reach_the_best_real_patch(
    trained: tuple[SmallCNN, torch.Tensor], tmp_path: Path, record_property
) -> None:
    model, images = trained
    results = featviz.fidelity_report(model, CONV_LAYERS, images, NEURON)
    maps = brute_force_maps(model, images)
    for name, res in results.items():
        assert torch.allclose(res.reference, maps[name].amax(dim=(0, 2, 3)), atol=1e-4)
        assert torch.equal(res.flagged, ~(res.fidelity >= 1))
        assert res.images.shape == (len(res.reference), *SMALL)
        with torch.no_grad():  # the reported activation is the image's own, read independently
            own = brute_force_maps(model, res.images)[name]
        assert torch.allclose(res.activation, own[res.units, res.units].amax(dim=(1, 2)), atol=1e-4)
    flags = torch.cat([r.flagged for r in results.values()])
    undefined = int(torch.cat([r.fidelity.isnan() for r in results.values()]).sum())
    share = 1 - flags.float().mean().item()
    record_property("neuron_share", f"{share:.3f} ({int((~flags).sum())}/{len(flags)}, {undefined} undefined)")
    assert share >= 0.9
    # Not noise: far smoother than uniform noise (mean |neighbour difference| 2/3); not blank: contrast.
    imgs = torch.cat([r.images for r in results.values()])
    assert featviz.total_variation(imgs).max() < 0.35
    assert imgs.flatten(1).std(dim=1).min() > 0.05
    rows = [viz.grid(viz.grey(r.images), nrow=16, min_cell=84) for r in results.values()]
    width = max(r.shape[-1] for r in rows)
    picture = torch.cat([F.pad(r, (0, width - r.shape[-1]), value=1.0) for r in rows], dim=1)
    assert viz.save_png(picture, tmp_path / "featviz_neuron.png").stat().st_size > 0


def test_trained_smallcnn_each_objective_wins_its_own_statistic(
    trained: tuple[SmallCNN, torch.Tensor], record_property
) -> None:
    """The channel objective's images have the higher mean activation, the neuron objective's the higher centre
    value; the channel images (textures) rarely reach the best real *patch* (max over positions)."""
    model, images = trained
    layers = ("conv2", "conv3")
    chan = featviz.fidelity_report(model, layers, images, featviz.FeatVizSettings(objective="channel"))
    for name in layers:
        fn = featviz.module_output(model, name)
        neur = featviz.visualise(fn, chan[name].units, SMALL, NEURON)
        with torch.no_grad():
            out_c, out_n = fn(chan[name].images), fn(neur.images)
        units = chan[name].units
        mean_c, mean_n = (featviz.unit_statistic(o, units, "mean") for o in (out_c, out_n))
        centre_c, centre_n = (featviz.unit_statistic(o, units, "at") for o in (out_c, out_n))
        assert (mean_c > mean_n).float().mean() >= 0.9
        assert (centre_n > centre_c).float().mean() >= 0.9
        assert torch.allclose(chan[name].objective_value, mean_c)
    flags = torch.cat([r.flagged for r in chan.values()])
    record_property("channel_share_conv2_conv3", f"{int((~flags).sum())}/{len(flags)}")


def test_smallcnn_visualisation_takes_under_2_s_per_channel(trained: tuple[SmallCNN, torch.Tensor]) -> None:
    """All 16 conv3 channels in one batch, default 256 steps; median of 3 (the machine is shared, so noisy)."""
    model, _ = trained
    fn = featviz.module_output(model, "conv3")
    times = [featviz.visualise(fn, 16, SMALL, NEURON).seconds_per_unit for _ in range(3)]
    assert statistics.median(times) < 2.0, times


def test_alexnet_rgb_224_inputs_are_valid_and_excite_their_channels() -> None:
    """Random-weight AlexNet backbone behind ImageNet normalisation; a few steps on two channels per layer."""
    backbone = TransferClassifier(weights="none").backbone
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    model = nn.Sequential(OrderedDict(norm=Standardise(mean, std), backbone=backbone)).eval()
    s = featviz.FeatVizSettings(objective="neuron", steps=12, settle=0.25)
    grey = torch.full((2, 3, 224, 224), 0.5)
    for layer in ("backbone.conv1", "backbone.conv2"):
        fn = featviz.module_output(model, layer)
        res = featviz.visualise(fn, [0, 5], (3, 224, 224), s, layer=layer)
        assert res.images.shape == (2, 3, 224, 224) and res.images.min() >= 0 and res.images.max() <= 1
        with torch.no_grad():
            start = featviz.unit_statistic(fn(grey), res.units, "at")
        assert torch.all(res.objective_value > start)
        assert res.settings.jitter_for(224) == 8
