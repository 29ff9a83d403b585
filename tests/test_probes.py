"""Linear probes: separable data, shuffled labels, scikit-learn's answer, the kernel forms, the split, pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from cnnfeat import plots
from cnnfeat import probes as pr
from cnnfeat import similarity as sim
from cnnfeat.errors import ConfigError


def scaled(x: torch.Tensor, train: torch.Tensor) -> np.ndarray:
    """The probe's preprocessing: centre on the training mean, training rows of mean squared norm 1."""
    x = x.double()
    x = x - x[train].mean(dim=0)
    return (x / (x[train] ** 2).sum(dim=1).mean().sqrt()).numpy()


def sklearn_accuracy(x: torch.Tensor, y: torch.Tensor, split: pr.ProbeSplit, l2: float) -> float:
    """scikit-learn's multinomial logistic regression with the same objective (C = 1 / (l2 n_train))."""
    z, tr, te = scaled(x, split.train), split.train.numpy(), split.test.numpy()
    clf = LogisticRegression(C=1 / (l2 * len(tr)), tol=1e-10, max_iter=20_000).fit(z[tr], y.numpy()[tr])
    return float(clf.score(z[te], y.numpy()[te]))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()  # 1,797 real 8x8 images shipped with scikit-learn
    return torch.from_numpy(d.data).float(), torch.from_numpy(d.target).long()


def test_split_is_stratified_disjoint_and_fixed() -> None:
    y = torch.arange(10).repeat_interleave(200)[torch.randperm(2000, generator=torch.Generator().manual_seed(0))]
    split = pr.probe_split(y)
    assert len(split.train) == len(split.test) == 1000
    assert set(split.train.tolist()).isdisjoint(split.test.tolist())
    assert sorted(split.train.tolist() + split.test.tolist()) == list(range(2000))
    assert torch.bincount(y[split.train]).tolist() == [100] * 10
    again = pr.probe_split(y)
    assert torch.equal(again.train, split.train)
    assert not torch.equal(pr.probe_split(y, seed=1).train, split.train)
    with pytest.raises(ConfigError, match=r"train_fraction must be in \(0, 1\), got 1.0"):
        pr.probe_split(y, 1.0)


@pytest.mark.parametrize("dim", [20, 3000])  # the primal form, and the kernel form (D > n_train)
def test_linearly_separable_data_is_probed_perfectly(dim: int) -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(10).repeat(60)
    centres = 4 * torch.randn(10, dim, generator=g)
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    split = pr.probe_split(y)
    res = pr.linear_probe(x, y, split)
    assert res.route == ("primal" if dim < len(split.train) else "cholesky")
    assert res.test_acc == 1.0 and res.train_acc == 1.0


def test_shuffled_labels_give_chance_accuracy() -> None:
    g = torch.Generator().manual_seed(2)
    y = torch.arange(10).repeat(200)
    x = torch.randn(2000, 10, generator=g) + 4 * torch.nn.functional.one_hot(y).float()  # real signal ...
    split = pr.probe_split(y)
    assert pr.linear_probe(x, y, split).test_acc > 0.9
    shuffled = y[torch.randperm(2000, generator=g)]  # ... which shuffled labels no longer follow
    acc = pr.linear_probe(x, shuffled, pr.probe_split(shuffled)).test_acc
    assert abs(acc - 0.1) < 0.04, acc  # 1,000 test images: chance 0.1, standard deviation 0.0095


def test_matches_scikit_learn_on_real_digits() -> None:
    x, y = digits()
    split = pr.probe_split(y)
    for l2 in (1e-3, 1e-2):
        ours = pr.linear_probe(x, y, split, l2=l2, tol=1e-8)
        assert ours.route == "primal"
        assert ours.test_acc == pytest.approx(sklearn_accuracy(x, y, split, l2), abs=2 / len(split.test))
        assert 0.9 < ours.test_acc < 1.0


def test_kernel_forms_equal_the_primal_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = digits()
    x, y = x[:800], y[:800]
    split = pr.probe_split(y)
    wide = torch.relu(x @ torch.randn(64, 500, generator=torch.Generator().manual_seed(3)))  # D > n_train = 400
    expected = sklearn_accuracy(wide, y, split, 1e-3)
    from_features = pr.linear_probe(wide, y, split, tol=1e-8)
    from_gram = pr.linear_probe(sim.LayerData(gram=sim.centred_gram(wide.double())), y, split, tol=1e-8)
    assert from_features.route == from_gram.route == "cholesky"
    assert from_features.test_acc == pytest.approx(expected, abs=2 / len(split.test))
    assert from_gram.test_acc == pytest.approx(expected, abs=2 / len(split.test))
    # wide but of rank 64 < n_train: the training Gram is singular. After scaling it is the digits' own Gram,
    # so the answer is the primal probe's on the digits, whether a tiny jitter or the eigendecomposition fits it.
    repeated = torch.cat([x] * 8, dim=1)
    expected = sklearn_accuracy(x, y, split, 1e-3)
    jittered = pr.linear_probe(repeated.double(), y, split, tol=1e-8)
    assert jittered.route.startswith("cholesky+")
    assert jittered.test_acc == pytest.approx(expected, abs=2 / len(split.test))
    monkeypatch.setattr(pr, "_cholesky", lambda k: (None, 0.0))
    eigh = pr.linear_probe(repeated.double(), y, split, tol=1e-8)
    assert eigh.route == "eigh"
    assert eigh.test_acc == pytest.approx(expected, abs=2 / len(split.test))


def test_accumulator_keeps_what_the_probe_needs() -> None:
    x, y = digits()
    x, y = x[:1000], y[:1000]
    acts = {"narrow": x, "wide": torch.relu(x @ torch.randn(64, 1200, generator=torch.Generator().manual_seed(4)))}
    acc = sim.SignatureAccumulator(len(y), keep=True)
    for s in range(0, len(y), 128):
        acc.update({k: v[s : s + 128] for k, v in acts.items()})
    acc.finish()
    split = pr.probe_split(y)
    for layer, data in acc.kept.items():
        assert pr.linear_probe(data, y, split).test_acc == pr.linear_probe(acts[layer], y, split).test_acc


def test_diverged_activations_give_nan_and_bad_l2_fails() -> None:
    x, y = torch.randn(100, 5), torch.arange(10).repeat(10)
    x[3, 1] = float("nan")
    res = pr.linear_probe(x, y, pr.probe_split(y))
    assert np.isnan(res.test_acc) and res.route == "nonfinite"
    with pytest.raises(ConfigError, match="l2 must be > 0, got 0"):
        pr.linear_probe(torch.randn(100, 5), y, pr.probe_split(y), l2=0)


def test_accuracy_vs_depth_picture() -> None:
    layers = ["pixels", "relu1", "relu2", "relu3", "relu4", "relu5", "fc3"]
    slope = torch.tensor([0.0, 0.002, 0.004, 0.006, 0.01, 0.013, 0.03])
    start = torch.tensor([0.77, 0.77, 0.78, 0.77, 0.73, 0.68, 0.44])
    acc = {e: (start + slope * e).tolist() for e in range(16)}
    img = plots.accuracy_vs_depth(acc, layers, chance=0.1)
    assert img.shape[0] == 3 and img.shape[1] > 300 and img.shape[2] > 500
    assert float(img.std()) > 0.05
    Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save("/tmp/cnnfeat_accuracy_vs_depth.png")
