"""Linear CKA: published formulas, invariances, unbiasedness, minibatch and DDP accumulation, history, pictures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from cnnfeat import plots, units
from cnnfeat import similarity as sim
from cnnfeat.errors import ConfigError

# ---- the published formulas, written out plainly in float64 ---------------------------------------------------


def ref_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(len(x), -1).double()
    return x @ x.T


def ref_hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """Song et al. (2012), eq. 5, with K~, L~ the Gram matrices with zeroed diagonals."""
    n = len(k)
    kt, lt = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=torch.float64)
    term1 = torch.trace(kt @ lt)
    term2 = (one.T @ kt @ one) * (one.T @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2 / (n - 2) * (one.T @ kt @ lt @ one)
    return float(term1 + term2 - term3) / (n * (n - 3))


def ref_hsic_biased(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """tr(K H L H) / (n-1)² with the centring matrix H = I - 11ᵀ/n."""
    n = len(k)
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    return float(torch.trace(k @ h @ l @ h)) / (n - 1) ** 2


def ref_cka(x: torch.Tensor, y: torch.Tensor, unbiased: bool = True, blocks: list[slice] | None = None) -> float:
    """CKA; with ``blocks``, Nguyen et al.'s minibatch CKA: block HSICs summed in numerator and denominator."""
    hsic = ref_hsic_unbiased if unbiased else ref_hsic_biased
    blocks = blocks or [slice(0, len(x))]
    xy = xx = yy = 0.0
    for b in blocks:
        k, l = ref_gram(x[b]), ref_gram(y[b])  # noqa: E741
        xy, xx, yy = xy + hsic(k, l), xx + hsic(k, k), yy + hsic(l, l)
    return xy / (xx * yy) ** 0.5


def conv_like(n: int, c: int, hw: int, seed: int) -> torch.Tensor:
    """ReLU'd float32 maps with a large common offset, as real activations have (hard for a float32 Gram)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, hw, hw, generator=g)
    return torch.relu(base + 0.5 * torch.randn(1, c, 1, 1, generator=g) + 1.0)


# ---- values ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("n", [200, 201, 600])  # even n: two packed squares; odd n: a mask; >= 512: half-blocks
def test_cka_equals_the_published_formulas(unbiased: bool, n: int) -> None:
    x = conv_like(n, 6, 12, seed=1)
    y = torch.relu(x[:, :4].flatten(1) @ torch.randn(576, 50, generator=torch.Generator().manual_seed(2)))
    z = torch.randn(n, 30, generator=torch.Generator().manual_seed(3)) + 5.0
    for a, b in [(x, y), (x, z), (y, z), (x, x[:, :3])]:
        expected = ref_cka(a, b, unbiased)
        assert sim.cka(a, b, unbiased) == pytest.approx(expected, abs=1e-6)
        assert sim.cka(a.double(), b.double(), unbiased) == pytest.approx(expected, abs=1e-10)
    k, l = ref_gram(x), ref_gram(z)  # noqa: E741
    hsic = ref_hsic_unbiased if unbiased else ref_hsic_biased
    assert sim.hsic(k, l, unbiased) == pytest.approx(hsic(k, l), rel=1e-7)  # both lose digits to the offset
    assert abs(ref_cka(x, z, unbiased) - ref_cka(x, y, unbiased)) > 0.05, "the pairs differ, so a wrong CKA shows"


@pytest.mark.parametrize("unbiased", [True, False])
def test_block_cka_equals_nguyen_et_al_minibatch_cka(unbiased: bool) -> None:
    x, y = conv_like(600, 4, 8, seed=4), torch.randn(600, 40, generator=torch.Generator().manual_seed(5))
    y = y + x.flatten(1)[:, :40]
    blocks = [slice(0, 200), slice(200, 400), slice(400, 600)]
    expected = ref_cka(x, y, unbiased, blocks)
    assert sim.cka(x, y, unbiased, block_size=200) == pytest.approx(expected, abs=1e-6)
    assert abs(expected - ref_cka(x, y, unbiased)) > 1e-4, "the block estimator is a different number"
    assert sim.block_starts(1001, 250) == [0, 251, 501, 751, 1001], "n // 250 blocks, sizes differ by <= 1"


@pytest.mark.parametrize("unbiased", [True, False])
def test_cka_is_one_for_an_orthogonal_transform_and_scale(unbiased: bool) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 40, generator=g).double()
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    assert torch.allclose(q.T @ q, torch.eye(40, dtype=torch.float64), atol=1e-12)
    assert sim.cka(x, x @ q * 7.5, unbiased) == pytest.approx(1.0, abs=1e-6)
    assert sim.cka(x.float(), (x @ q * 0.01).float(), unbiased) == pytest.approx(1.0, abs=1e-6)
    assert sim.cka(x, x + 3.0, unbiased) == pytest.approx(1.0, abs=1e-6), "a shift of all features changes nothing"
    assert sim.cka(x, x * torch.linspace(0.1, 3, 40, dtype=torch.float64), unbiased) < 0.99, "anisotropic scale does"


def test_unbiased_estimator_is_near_zero_on_independent_features_and_biased_is_not() -> None:
    g = torch.Generator().manual_seed(7)
    n, d = 2000, 1000  # the biased CKA of independent features is about d / (n + d) here
    values = []
    for _ in range(2):
        x, y = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        unbiased, biased = sim.cka(x, y, unbiased=True), sim.cka(x, y, unbiased=False)
        values.append((unbiased, biased))
        assert abs(unbiased) < 0.02, values
        assert biased > 0.2, values


# ---- accumulation ---------------------------------------------------------------------------------------------


def layer_acts(n: int, seed: int) -> dict[str, torch.Tensor]:
    x = conv_like(n, 6, 10, seed)
    fc = torch.relu(x.flatten(1)[:, ::7] @ torch.randn(86, 20, generator=torch.Generator().manual_seed(seed)))
    return {"conv": x, "fc": fc, "logits": fc[:, :5] - fc[:, 5:10]}


@pytest.mark.parametrize("block_size", [None, 90])
def test_minibatch_accumulation_equals_the_full_batch(block_size: int | None) -> None:
    n = 450
    acts = layer_acts(n, seed=8)
    full = {k: sim.signature(v, block_size=block_size) for k, v in acts.items()}
    # in order, minibatches of 64 (ids implied)
    acc = sim.SignatureAccumulator(n, block_size=block_size)
    for s in range(0, n, 64):
        acc.update({k: v[s : s + 64] for k, v in acts.items()})
    in_order = acc.finish()
    # shuffled minibatches of 37, with repeated ids (as DistributedSampler padding makes)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(9))
    perm = torch.cat([perm, perm[:13]])
    acc = sim.SignatureAccumulator(n, block_size=block_size)
    for s in range(0, len(perm), 37):
        ids = perm[s : s + 37]
        acc.update({k: v[ids] for k, v in acts.items()}, ids)
    shuffled = acc.finish()
    for k in acts:
        assert torch.allclose(in_order[k], full[k], atol=1e-7), k
        assert torch.allclose(shuffled[k], full[k], atol=1e-7), k
    assert sim.similarity(in_order["conv"], in_order["fc"]) == pytest.approx(
        sim.cka(acts["conv"], acts["fc"], block_size=block_size), abs=1e-6
    )
    assert len(full["conv"]) == sim.signature_length(n, block_size)


def test_accumulator_keeps_the_smaller_of_features_and_gram_and_pools() -> None:
    n = 100
    acts = {"wide": torch.rand(n, 3, 8, 8), "narrow": torch.rand(n, 30)}
    acc = sim.SignatureAccumulator(n, keep=True)
    acc.update(acts)
    sigs = acc.finish()
    assert acc.kept["wide"].features is None and acc.kept["wide"].gram.shape == (n, n)
    assert torch.equal(acc.kept["narrow"].features, acts["narrow"])
    pooled = sim.SignatureAccumulator(n, pool=2)
    pooled.update(acts)
    expected = sim.signature(torch.nn.functional.avg_pool2d(acts["wide"], 2))
    assert torch.allclose(pooled.finish()["wide"], expected, atol=1e-7)
    assert not torch.allclose(sigs["wide"], expected, atol=1e-3)


def test_accumulator_and_similarity_errors_name_the_problem() -> None:
    acc = sim.SignatureAccumulator(10)
    acc.update({"a": torch.rand(6, 3)})
    with pytest.raises(ValueError, match=r"incomplete probe pass: rows missing per layer \{'a': 4\} \(of n=10\)"):
        acc.finish()
    with pytest.raises(IndexError, match=r"probe ids must be in \[0, 9\], got \[12\]"):
        sim.SignatureAccumulator(10).update({"a": torch.rand(2, 3)}, torch.tensor([3, 12]))
    with pytest.raises(ValueError, match="with all_gather, update\\(\\) needs the probe ids"):
        sim.SignatureAccumulator(10, all_gather=lambda t: t[None]).update({"a": torch.rand(2, 3)})
    with pytest.raises(ConfigError, match="block_size must be >= 4"):
        sim.SignatureAccumulator(10, block_size=2)
    with pytest.raises(ConfigError, match="pool must be an integer >= 1, got 0"):
        sim.SignatureAccumulator(10, pool=0)
    with pytest.raises(ConfigError, match="the probe set needs at least 4 images, got n=3"):
        sim.SignatureAccumulator(3)
    with pytest.raises(ValueError, match="same probe size, block_size and estimator"):
        sim.similarity(sim.signature(torch.rand(20, 3)), sim.signature(torch.rand(21, 3)))


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    """What ``trainer.strategy.all_gather`` does under DDP: (world, *shape), equal shapes required."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def _ddp_worker(rank: int, world: int, port: int, acts: dict, n: int, q: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # DistributedSampler's shard: every world-th id, padded by repeating ids to equal lengths
        ids = torch.arange(n)
        ids = torch.cat([ids, ids[: (-n) % world]])[rank::world]
        acc = sim.SignatureAccumulator(n, block_size=None)
        blocked = sim.SignatureAccumulator(n, block_size=50, all_gather=_all_gather)
        acc.all_gather = _all_gather
        fire = units.FiringAccumulator()
        chunks = torch.tensor_split(ids, 7 if rank == 0 else [10, 30, 45, 60, 80, 95])
        for mine in chunks:  # minibatches of unequal sizes on the two ranks, the same number of calls
            batch = {k: v[mine] for k, v in acts.items()}
            acc.update(batch, mine)
            blocked.update(batch, mine)
            fire.update(batch)
        sigs, bsigs = acc.finish(), blocked.finish()
        alive = fire.finish(all_gather=_all_gather)
        q.put(
            (
                rank,
                sim.cka_matrix(sigs).tolist(),
                sim.cka_matrix(bsigs).tolist(),
                {k: v.tolist() for k, v in alive.items()},
            )
        )
    finally:
        dist.destroy_process_group()


def test_two_ddp_processes_give_the_single_process_values() -> None:
    n = 201
    acts = layer_acts(n, seed=10)
    acts["conv"][:, 2] = -1.0  # a dead channel
    acts["conv"][5, 2, 3, 3] = 0.5  # ... that fires once, on a row only one rank holds
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29_500 + (os.getpid() + 500) % 1000
    mp.start_processes(_ddp_worker, args=(2, port, acts, n, q), nprocs=2, start_method="spawn")
    got = sorted(q.get(timeout=60) for _ in range(2))
    single = sim.cka_matrix({k: sim.signature(v) for k, v in acts.items()})
    blocked = sim.cka_matrix({k: sim.signature(v, block_size=50) for k, v in acts.items()})
    fire = units.FiringAccumulator()
    fire.update(acts)
    alive = fire.finish()
    assert alive["conv"][2], "the channel fires on one image"
    for _rank, matrix, bmatrix, ddp_alive in got:
        assert np.allclose(matrix, single.numpy(), atol=1e-6)
        assert np.allclose(bmatrix, blocked.numpy(), atol=1e-6)
        assert ddp_alive == {k: v.tolist() for k, v in alive.items()}
    assert got[0][1:] == got[1][1:], "both ranks hold the same state"


# ---- history over epochs, layer x layer, two models -----------------------------------------------------------


def drifting_epochs(n: int, epochs: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    base = {"early": torch.randn(n, 40, generator=g), "late": torch.randn(n, 25, generator=g)}
    out = []
    for e in range(epochs):  # "early" settles after epoch 1, "late" keeps moving
        early = base["early"] + (0.8 * torch.randn(n, 40, generator=g) if e <= 1 else 0.02 * torch.randn(n, 40))
        late = base["late"] + e * torch.randn(n, 25, generator=g)
        out.append({"early": early, "late": late})
        base = {"early": early, "late": late}
    return out


@pytest.mark.parametrize("spill", [False, True])
def test_history_fills_the_epoch_matrix_and_survives_a_checkpoint(tmp_path: Path, spill: bool) -> None:
    n, epochs = 120, 5
    data = drifting_epochs(n, epochs)
    hist = sim.CKAHistory(spill_dir=tmp_path / "cka" if spill else None)
    prev = []
    for e, acts in enumerate(data[:3]):
        prev.append(hist.add(e, {k: sim.signature(v) for k, v in acts.items()}))
    state = hist.state_dict()
    torch.save(state, tmp_path / "state.pt")
    hist = sim.CKAHistory(spill_dir=tmp_path / "cka" if spill else None)
    hist.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for e, acts in enumerate(data[3:], start=3):
        prev.append(hist.add(e, {k: sim.signature(v) for k, v in acts.items()}))
    assert prev[0] == {}, "nothing to compare the untrained network with"
    for layer in ("early", "late"):
        expected = torch.tensor([[ref_cka(a[layer], b[layer]) for b in data] for a in data])
        assert torch.allclose(hist.matrix(layer), expected.double(), atol=1e-6)
        assert hist.to_previous(layer) == [(e, pytest.approx(float(expected[e, e - 1]), abs=1e-6)) for e in range(1, 5)]
        assert [v for _, v in hist.to_final(layer)] == pytest.approx(expected[-1].tolist(), abs=1e-6)
        assert prev[4][layer] == pytest.approx(float(expected[4, 3]), abs=1e-6)
    assert hist.to_final("early")[2][1] > 0.99 > hist.to_final("late")[2][1], "the early layer settled first"
    assert (hist.nbytes == 0) == spill
    if spill:
        assert sorted(p.name for p in (tmp_path / "cka" / "late").iterdir()) == [f"epoch_{e}.pt" for e in range(5)]
    with pytest.raises(ValueError, match="epoch 4 of layer 'early' is not after the stored 4"):
        hist.add(4, {"early": sim.signature(data[0]["early"])})


def test_a_dead_layer_has_no_cka_instead_of_a_wrong_one() -> None:
    hist = sim.CKAHistory()
    hist.add(0, {"relu": sim.signature(torch.rand(50, 8))})
    hist.add(1, {"relu": sim.signature(torch.zeros(50, 8))})  # every unit dead: a constant representation
    assert hist.to_previous("relu") == [(1, pytest.approx(float("nan"), nan_ok=True))]
    assert torch.isnan(hist.matrix("relu")[1]).all() and hist.matrix("relu")[0, 0] == 1.0


def test_layer_by_layer_and_model_a_by_model_b() -> None:
    n = 150
    a = layer_acts(n, seed=12)
    b = {"big1": torch.relu(a["conv"].flatten(1) @ torch.randn(600, 300)), "big2": torch.randn(n, 64)}
    sa, sb = {k: sim.signature(v) for k, v in a.items()}, {k: sim.signature(v) for k, v in b.items()}
    square = sim.cka_matrix(sa)
    assert torch.allclose(square, square.T) and torch.allclose(square.diagonal(), torch.ones(3, dtype=torch.float64))
    cross = sim.cka_matrix(sa, sb)
    assert cross.shape == (3, 2)
    for i, ka in enumerate(a):
        for j, kb in enumerate(b):
            assert cross[i, j] == pytest.approx(ref_cka(a[ka], b[kb]), abs=1e-6)


def test_memory_per_layer_and_epoch_is_as_documented() -> None:
    assert sim.signature_length(2000) * 4 == 8_000_000  # exact mode, float32
    assert sim.signature_length(2000, 500) * 4 == 2_000_000
    assert sim.signature_length(2000, 250) * 4 == 1_000_000
    for n, block in [(10, None), (11, None), (23, 5), (40, 8)]:
        assert len(sim.signature(torch.rand(n, 3), block_size=block)) == sim.signature_length(n, block)
        assert len(sim.signature(torch.rand(n, 3), False, block)) == sim.signature_length(n, block, False)


# ---- pictures -------------------------------------------------------------------------------------------------


def test_heatmaps_have_labelled_axes_a_colour_bar_and_content() -> None:
    epochs = list(range(16))
    m = torch.tensor([[np.exp(-abs(i - j) / 4) for j in epochs] for i in epochs])
    img = plots.heatmap(m, epochs, epochs, title="relu3: CKA between epochs", xlabel="epoch", ylabel="epoch")
    layers = ["pixels", "relu1", "relu2", "relu3", "relu4", "relu5", "fc3"]
    lm = torch.rand(7, 7)
    lm = (lm + lm.T) / 2
    lm.fill_diagonal_(1.0)
    img2 = plots.heatmap(lm, layers, layers, title="layer x layer, epoch 15", xlabel="layer", ylabel="layer")
    alex = [f"alex relu{i}" for i in range(1, 6)]
    img3 = plots.heatmap(torch.rand(7, 5), layers, alex, xlabel="AlexNet layer", ylabel="SmallCNN layer")
    for name, im in [("epoch_by_epoch", img), ("layer_by_layer", img2), ("smallcnn_by_alexnet", img3)]:
        assert im.ndim == 3 and im.shape[0] == 3 and im.shape[1] > 200 and im.shape[2] > 200
        assert float(im.min()) >= 0.0 and float(im.max()) <= 1.0 and float(im.std()) > 0.1
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(f"/tmp/cnnfeat_{name}.png")
    with pytest.raises(ValueError, match=r"values \(7, 5\) do not match 7 row and 4 column labels"):
        plots.heatmap(torch.rand(7, 5), layers, ["a", "b", "c", "d"])
