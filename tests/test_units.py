"""Unit history: a unit killed at a known epoch dies exactly then and revives when restored; state; raster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnfeat import plots
from cnnfeat.topk import TopK
from cnnfeat.units import EpochChange, FiringAccumulator, UnitHistory, nonfinite_rows

KILL, RESTORE, EPOCHS = 3, 6, 9


def probe_pass(epoch: int, gen: torch.Generator) -> FiringAccumulator:
    """One pass over 40 probe images in minibatches of 16, as a callback feeds it.

    conv: 4 channels; channel 1 is killed (all negative) from epoch KILL until RESTORE, channel 3 is dead from
    the start and fires, at one position of one image, from epoch 5 on. fc: 5 neurons; neuron 0 dies at 2.
    """
    conv = torch.randn(40, 4, 6, 6, generator=gen).abs() + 0.1
    fc = torch.randn(40, 5, generator=gen).abs() + 0.1
    conv[:, 3] = -1.0
    if epoch >= 5:
        conv[17, 3, 2, 4] = 0.3
    if KILL <= epoch < RESTORE:
        conv[:, 1] = -torch.rand(40, 6, 6, generator=gen) - 1e-3
    if epoch >= 2:
        fc[:, 0] = 0.0  # exactly zero never counts as firing
    acc = FiringAccumulator()
    for s in range(0, 40, 16):
        acc.update({"conv": conv[s : s + 16], "fc": fc[s : s + 16]})
    return acc


def record() -> UnitHistory:
    gen = torch.Generator().manual_seed(0)
    hist = UnitHistory()
    for e in range(EPOCHS):
        hist.add(e, probe_pass(e, gen).finish())
    return hist


def test_a_unit_killed_at_a_known_epoch_dies_then_and_revives_when_restored() -> None:
    hist = record()
    assert hist.first_death("conv").tolist() == [-1, KILL, -1, 0]
    assert hist.first_revival("conv").tolist() == [-1, RESTORE, -1, 5]
    assert hist.first_death("fc").tolist() == [2, -1, -1, -1, -1]
    assert hist.first_revival("fc").tolist() == [-1] * 5
    raster = hist.raster("conv")
    assert raster.shape == (4, EPOCHS)
    assert raster[1].tolist() == [not (KILL <= e < RESTORE) for e in range(EPOCHS)]
    changes = {(c.epoch, c.layer): c for c in hist.changes()}
    assert changes[(KILL, "conv")] == EpochChange(KILL, "conv", died=1, revived=0, dead=2, units=4)
    assert changes[(RESTORE, "conv")] == EpochChange(RESTORE, "conv", died=0, revived=1, dead=0, units=4)
    assert changes[(0, "conv")].died == 1, "a unit dead in the untrained network died at epoch 0"
    assert changes[(1, "conv")].died == changes[(1, "conv")].revived == 0
    table = hist.table()
    assert f"| {KILL} | conv | 1 | 0 | 2 / 4 |" in table and f"| {RESTORE} | conv | 0 | 1 | 0 / 4 |" in table


def test_add_returns_this_epochs_changes_and_state_survives_a_weights_only_load(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    hist = UnitHistory()
    got = [hist.add(e, probe_pass(e, gen).finish()) for e in range(KILL + 1)]
    assert [c.died for c in got[KILL] if c.layer == "conv"] == [1]
    torch.save(hist.state_dict(), tmp_path / "units.pt")
    resumed = UnitHistory()
    resumed.load_state_dict(torch.load(tmp_path / "units.pt", weights_only=True))
    for e in range(KILL + 1, EPOCHS):
        resumed.add(e, probe_pass(e, gen).finish())
    full = record()
    for layer in ("conv", "fc"):
        assert torch.equal(resumed.raster(layer), full.raster(layer))
    assert resumed.epochs == list(range(EPOCHS))


def test_nan_activations_count_as_not_firing_and_bad_records_fail() -> None:
    acc = FiringAccumulator()
    acc.update({"fc": torch.tensor([[float("nan"), 1.0, -1.0]])})
    assert acc.finish()["fc"].tolist() == [False, True, False]
    hist = UnitHistory()
    hist.add(0, {"fc": torch.tensor([True, False])})
    with pytest.raises(ValueError, match="epoch 0 is not after the last recorded epoch 0"):
        hist.add(0, {"fc": torch.tensor([True, True])})
    with pytest.raises(ValueError, match=r"layers \['conv'\] differ from the recorded \['fc'\]"):
        hist.add(1, {"conv": torch.tensor([True, True])})
    with pytest.raises(ValueError, match="layer 'fc': 3 units, recorded 2"):
        hist.add(1, {"fc": torch.tensor([True, True, False])})
    with pytest.raises(ValueError, match="layer 'fc': 2 units, earlier 3"):
        acc.update({"fc": torch.ones(1, 3)})
        acc.update({"fc": torch.ones(1, 2)})


def test_raster_picture() -> None:
    hist = record()
    for layer in ("conv", "fc"):
        img = plots.unit_raster(hist.raster(layer), hist.epochs, layer)
        assert img.shape[0] == 3 and img.shape[1] > 150 and img.shape[2] > 250
        assert float(img.std()) > 0.05
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(f"/tmp/cnnfeat_raster_{layer}.png")
    big = torch.rand(120, 16) > 0.2
    img = plots.unit_raster(big, list(range(16)), "relu4")
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save("/tmp/cnnfeat_raster_relu4.png")
    with pytest.raises(ValueError, match=r"alive must be \(units, 16 epochs\), got \(120, 15\)"):
        plots.unit_raster(big[:, :15], list(range(16)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_nonfinite_rows_and_per_image_maxima_equal_the_elementwise_definitions(dtype: torch.dtype) -> None:
    """The fast paths (a row sum; a plain max) give exactly the element-wise answers, overflowing sums included."""
    gen = torch.Generator().manual_seed(0)
    big = torch.finfo(dtype).max
    for trial in range(60):
        x = (torch.randn(6, 3, 4, 4, generator=gen) * 10.0 ** (trial % 5)).to(dtype)
        for value in (float("nan"), float("inf"), -float("inf"), big):  # big: finite, but rows of it overflow a sum
            x[torch.rand(x.shape, generator=gen) < 0.03 * (trial % 4)] = value
        want_rows = torch.tensor([not torch.isfinite(row).all() for row in x])
        assert torch.equal(nonfinite_rows(x), want_rows)
        top = TopK.empty(3, 3, x.device)
        best = top.update_from_maps(x, torch.arange(6))
        cleaned = x.flatten(2).float().nan_to_num(nan=-torch.inf)  # NaN never wins; +-inf: the extreme finite values
        want = TopK.empty(3, 3, x.device)
        values, positions = cleaned.max(dim=2)
        want.update(values, torch.arange(6).unsqueeze(1).expand(6, 3), positions)
        assert torch.equal(best, values)
        assert torch.equal(top.ids, want.ids) and torch.equal(top.positions, want.positions)
        assert torch.equal(nonfinite_rows(torch.full((2, 3), big, dtype=dtype)), torch.tensor([False, False]))
    assert torch.equal(nonfinite_rows(torch.arange(6).reshape(2, 3)), torch.tensor([False, False]))
    lowest = torch.finfo(torch.float32).min  # -inf ties with it, as it always did: the first position wins
    top = TopK.empty(1, 1, torch.device("cpu"))
    top.update_from_maps(torch.tensor([[[[-torch.inf, lowest]]]]), torch.tensor([0]))
    assert top.positions.item() == 0
