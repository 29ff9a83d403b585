"""One definition of a dead unit: the dead-ReLU callback, the unit history and the atlas agree, NaN and inf included.

Ground truth is brute force over the captured tensor, one Python float at a time: a unit is alive when some value
is a number > 0 (NaN never fires, +inf does). For finite activations the shared definition gives, bit for bit, what
each place computed before with its own formula (kept below as ``old_*``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnfeat import units
from cnnfeat.atlas import Atlas
from cnnfeat.callbacks import AtlasCallback, DeadReluCallback
from cnnfeat.callbacks.base import Pictures, inference
from cnnfeat.graph import capture
from cnnfeat.models import SmallCNN
from cnnfeat.probe import ProbeSet, probe_from_tensors

NAN, INF = float("nan"), float("inf")
N, H = 12, 5  # probe images, and their height and width

#: one channel per case: its ReLU input on the probe, and whether the unit fires somewhere (alive)
CASES: dict[str, bool] = {
    "fires": True,
    "zero": False,  # exactly 0 everywhere
    "negative": False,  # the ReLU outputs 0 everywhere
    "nan": False,  # NaN everywhere
    "nan_or_negative": False,
    "nan_or_positive": True,  # fires where it is a number
    "posinf_once": True,  # +inf at one position of one image, negative elsewhere
    "neginf_or_zero": False,
}


def case_inputs() -> torch.Tensor:
    """(N, len(CASES), H, H): the ReLU input each case's channel gets (the model's conv is an exact identity)."""
    g = torch.Generator().manual_seed(0)
    x = torch.empty(N, len(CASES), H, H)
    rand = lambda: torch.rand(N, H, H, generator=g)  # noqa: E731
    half = rand() < 0.5
    x[:, 0] = rand() - 0.5
    x[:, 1] = 0.0
    x[:, 2] = -rand() - 1e-3
    x[:, 3] = NAN
    x[:, 4] = torch.where(half, NAN, -rand() - 1e-3)
    x[:, 5] = torch.where(half, NAN, rand() + 1e-3)
    x[:, 6] = -rand() - 1e-3
    x[7, 6, 2, 3] = INF
    x[:, 7] = torch.where(half, -INF, 0.0)
    return x


class Cases(nn.Module):
    """conv (1x1 depthwise, weight 1, bias 0: output = input, NaN and inf kept) -> ReLU -> mean -> logits."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, groups=channels)
        self.relu = nn.ReLU()
        self.head = nn.Linear(channels, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(x)).mean(dim=(2, 3)))


def probe_of(x: torch.Tensor) -> ProbeSet:
    return probe_from_tensors(torch.zeros(len(x), 1, H, H), torch.arange(len(x)) % 2, inputs=x)


def brute_alive(acts: torch.Tensor) -> list[bool]:
    """Per unit (dim 1): some value is a number > 0."""
    per_unit = acts.transpose(0, 1).reshape(acts.shape[1], -1).tolist()
    return [any(not math.isnan(v) and v > 0 for v in values) for values in per_unit]


def relu_input_and_output(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), capture(model, ["relu"], inputs=True) as pre, capture(model, ["relu"]) as out:
        model(x)
        return pre["relu"], out["relu"]


def dead_relu_dead(model: nn.Module, x: torch.Tensor, batch_size: int = 5) -> Pictures:
    cb = DeadReluCallback(probe_size=len(x), batch_size=batch_size, hist_samples=50)
    probe = probe_of(x)
    with inference(model):
        cb.prepare(model, probe)
        return cb.render(model, probe, 0)


def history_dead(model: nn.Module, x: torch.Tensor, inputs: bool) -> list[bool]:
    """The unit history's dead units (epoch 0), fed ReLU inputs or outputs in minibatches of 5."""
    acc = units.FiringAccumulator()
    with torch.no_grad(), capture(model, ["relu"], inputs=inputs) as acts:
        for s in range(0, len(x), 5):
            model(x[s : s + 5])
            acc.update({"relu": acts["relu"]})
    hist = units.UnitHistory()
    hist.add(0, acc.finish())
    return (hist.first_death("relu") == 0).tolist()


def atlas_dead(model: nn.Module, x: torch.Tensor, tmp: Path) -> list[bool]:
    """The atlas's dead units at step 1, as the report reads them (alive = stored unit_max > 0)."""
    cb = AtlasCallback(
        layers=["conv"],
        featviz=False,
        top_k=1,
        class_top=1,
        alive_probe_size=len(x),
        batch_size=5,
        atlas_dir=str(tmp),
    )
    probe = probe_of(x)
    with inference(model):
        cb.prepare(model, probe)
        cb.render(model, probe, 1)
    atlas = Atlas.load(tmp)
    assert atlas is not None and atlas.layers[0].activation == "relu", "alive/dead read after the ReLU"
    _, data = atlas.step_data(atlas.layers[0])
    return (~(data[1]["unit_max"] > 0)).tolist()


def test_the_three_counts_agree_with_brute_force_on_nan_and_inf(tmp_path: Path) -> None:
    x = case_inputs()
    model = Cases(len(CASES))
    pre, post = relu_input_and_output(model, x)
    expected_dead = [not alive for alive in CASES.values()]
    assert [not a for a in brute_alive(pre)] == expected_dead, "the conv is an exact identity"
    assert brute_alive(post) == brute_alive(pre), "the ReLU's input and output say the same"
    assert history_dead(model, x, inputs=True) == expected_dead
    assert history_dead(model, x, inputs=False) == expected_dead
    assert atlas_dead(model, x, tmp_path / "atlas") == expected_dead
    # the dead-ReLU callback logs fractions: one single-channel model per case gives 0.0 (alive) or 1.0 (dead)
    per_case = []
    for c, name in enumerate(CASES):
        s = dead_relu_dead(Cases(1), x[:, c : c + 1]).scalars
        per_case.append(s["relu/dead_fraction/relu"] == 1.0)
        assert s["relu/dead_fraction/relu"] in (0.0, 1.0), name
    assert dict(zip(CASES, per_case, strict=True)) == dict(zip(CASES, expected_dead, strict=True))


def test_a_nan_unit_counts_as_dead_in_the_dead_fraction_and_the_rest_stays_honest() -> None:
    x = case_inputs()
    model = Cases(len(CASES))
    pre, _ = relu_input_and_output(model, x)
    values = pre.flatten().tolist()
    p = dead_relu_dead(model, x)
    s = p.scalars
    dead = [not a for a in brute_alive(pre)]
    assert s["relu/dead_fraction/relu"] == pytest.approx(sum(dead) / len(dead)) == 5 / 8
    assert s["relu/dead_fraction/all"] == pytest.approx(5 / 8)
    assert s["relu/zero_fraction/relu"] == pytest.approx(sum(not v > 0 for v in values) / len(values))
    assert s["relu/nonfinite_fraction/relu"] == pytest.approx(sum(not math.isfinite(v) for v in values) / len(values))
    assert bool(torch.isfinite(p.histograms["relu/preact/relu"]).all()), "the histogram keeps the finite values"


# -- finite activations: bit for bit what each place computed before ---------------------------------------
def old_dead_relu(batches: list[torch.Tensor]) -> tuple[float, int, int]:
    """``DeadReluCallback.render`` before: (dead fraction, dead units, activations that are not > 0)."""
    m, zeros = None, 0
    for a in batches:
        b = a.amax(dim=(0, *range(2, a.ndim)))
        m = b if m is None else torch.maximum(m, b)
        zeros += a.numel() - int(torch.count_nonzero(a > 0))
    dead = m <= 0
    return float(dead.float().mean()), int(dead.sum()), zeros


def old_unit_max(a: torch.Tensor) -> torch.Tensor:
    """``cnnfeat.units.unit_max`` before (the unit history's and the atlas's reduction)."""
    a = a.detach()
    return a.nan_to_num(nan=float("-inf")).amax(dim=(0, *range(2, a.ndim))).float().cpu()


def old_running_max(batches: list[torch.Tensor]) -> torch.Tensor:
    """The atlas callback's and ``FiringAccumulator``'s running maximum before."""
    out = None
    for a in batches:
        m = old_unit_max(a)
        out = m if out is None else torch.maximum(out, m)
    assert out is not None
    return out


def activations(seed: int, nonfinite: bool = False) -> list[tuple[str, torch.dtype, list[torch.Tensor]]]:
    """Conv (N, C, H, W) and fc (N, F) activations in unequal minibatches: pre-activations with exact zeros and -0.0,
    ReLU outputs, dead units (all negative, all zero), units that fire once; every float dtype."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for shape in ((37, 9, 6, 5), (37, 11)):
            a = torch.randn(shape, generator=g) - 0.5
            a[torch.rand(shape, generator=g) < 0.2] = 0.0
            a[torch.rand(shape, generator=g) < 0.05] = -0.0
            a[:, 1] = -a[:, 1].abs() - 1e-3  # dead: negative
            a[:, 2] = 0.0  # dead: zero
            a[:, 3] = -0.0
            a[:, 4] = -1.0
            a[29, 4] = 1e-3  # fires once
            a[:, 5] = torch.where(a[:, 5] > 0, -a[:, 5], a[:, 5])  # max exactly 0 or -0.0
            if nonfinite:
                a[torch.rand(shape, generator=g) < 0.1] = NAN
                a[torch.rand(shape, generator=g) < 0.03] = INF
                a[torch.rand(shape, generator=g) < 0.03] = -INF
                a[:, 6] = NAN
            a = a.to(dtype)
            for kind, t in (("pre", a), ("relu", torch.relu(a))):
                out.append((f"{kind} {dtype} {tuple(shape)}", dtype, list(torch.split(t, [16, 5, 16]))))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finite_activations_give_bit_for_bit_the_old_numbers(seed: int) -> None:
    for what, _, batches in activations(seed):
        whole = torch.cat(batches)
        assert bool(torch.isfinite(whole).all())
        acc = units.FiringAccumulator()
        for b in batches:
            acc.update({"layer": b})
        maxima = acc.maxima()["layer"]
        alive = acc.finish()["layer"]
        # the atlas: the stored float32 unit_max, byte for byte (the sign of a zero maximum included)
        assert maxima.float().numpy().tobytes() == old_running_max(batches).numpy().tobytes(), what
        # the unit history
        assert torch.equal(alive, old_running_max(batches) > 0), what
        # the dead-ReLU callback: dead fraction, dead units and the zero count
        dead = ~alive
        fraction, n_dead, zeros = old_dead_relu(batches)
        assert float(dead.float().mean()) == fraction and int(dead.sum()) == n_dead, what
        assert sum(b.numel() - int(torch.count_nonzero(units.fires(b))) for b in batches) == zeros, what
        assert alive.tolist() == brute_alive(whole), what


@pytest.mark.parametrize("seed", [0, 1])
def test_nonfinite_activations_change_only_the_dead_relu_callback(seed: int) -> None:
    """With NaN and inf the atlas's stored maxima and the unit history stay as they were (they already skipped NaN);
    only the dead-ReLU callback, which counted a unit with a NaN anywhere as alive, now agrees with them."""
    changed = 0
    for what, _, batches in activations(seed, nonfinite=True):
        acc = units.FiringAccumulator()
        for b in batches:
            acc.update({"layer": b})
        maxima = acc.maxima()["layer"]
        alive = acc.finish()["layer"]
        assert maxima.float().numpy().tobytes() == old_running_max(batches).numpy().tobytes(), what
        assert alive.tolist() == brute_alive(torch.cat(batches)), what
        assert torch.equal(units.fires(units.unit_max(torch.cat(batches))), alive), what
        assert alive[6].item() is False, "a unit that only outputs NaN is dead"
        old_fraction, _, zeros = old_dead_relu(batches)
        assert sum(b.numel() - int(torch.count_nonzero(units.fires(b))) for b in batches) == zeros, what
        changed += float((~alive).float().mean()) != old_fraction
    assert changed, "the old dead-ReLU formula counted NaN units as alive"


def test_dead_relu_callback_on_a_real_network_matches_the_old_formula() -> None:
    """SmallCNN with a negative conv bias (some units dead, others not) on random images, through the callback."""
    torch.manual_seed(0)
    model = SmallCNN(conv_bias_init=-0.3)
    x = torch.rand(60, 1, 28, 28)
    cb = DeadReluCallback(probe_size=60, batch_size=25, hist_samples=0)
    probe = probe_from_tensors(x, torch.arange(60) % 10)
    with inference(model):
        cb.prepare(model, probe)
        s = cb.render(model, probe, 0).scalars
        with capture(model, cb.names, inputs=True) as pre:
            per_layer: dict[str, list[torch.Tensor]] = {n: [] for n in cb.names}
            for start in range(0, 60, 25):
                model(x[start : start + 25])
                for n in cb.names:
                    per_layer[n].append(pre[n])
    fractions = set()
    for n, batches in per_layer.items():
        fraction, _, zeros = old_dead_relu(batches)
        assert s[f"relu/dead_fraction/{n}"] == fraction, n
        assert s[f"relu/zero_fraction/{n}"] == zeros / sum(b.numel() for b in batches), n
        fractions.add(fraction)
    assert len(fractions) > 1, "the check covers dead and alive units"
