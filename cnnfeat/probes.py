"""Linear probes: how linearly separable the classes are in one layer's activations on the probe set.

A probe is a multinomial logistic regression, fitted deterministically (full-batch L-BFGS in float64 from
zero, strong-Wolfe line search) on a fixed stratified split of the probe set, and scored on the rest:
  * split (``probe_split``): per class, a seeded permutation; the first ``round(train_fraction * count)`` go
    to training (default half: 1,000 / 1,000 of the default 2,000 probe images);
  * features are scaled by one number so that training rows, centred on their mean, have mean squared norm 1
    (so ``l2`` means the same for every layer width and scale); the unpenalised intercept makes any shift of
    the features irrelevant to the fit;
  * objective: mean cross-entropy over the training rows + ``l2 / 2 * ||W||²``, intercept not penalised. This is
    scikit-learn's ``LogisticRegression(C=1 / (l2 * n_train))`` on the same scaled features.

Wide layers (D > n_train) are fitted in the equivalent kernel form: by the representer theorem W = X_trᵀ A,
and with the Cholesky factor K_tr = L Lᵀ of the training Gram the problem becomes the same one on the
features L (n_train x n_train) with V = Lᵀ A, so each L-BFGS step costs n_train² C instead of n_train D C
multiply-adds; the optimum is the same (the tests check both against scikit-learn). A Gram
that ``SignatureAccumulator(keep=True)`` kept for CKA is reused; a singular training Gram (fewer
independent features than training rows, e.g. dead units, or float32 rounding of a wide layer's Gram) gets
a jitter of 1e-7 (then 1e-6) times its mean diagonal, and only then falls back to its eigendecomposition.
Non-finite activations (a diverged network) give NaN accuracies.

Defaults: ``l2=1e-3`` (higher test accuracy than 1e-2 on every SmallCNN layer we tried); ``tol=1e-4`` on the
largest gradient entry (accuracies within 0.1 point of ``tol=1e-6``, in ~30 instead of ~55 evaluations).
Measured on one CPU thread, n = 2,000: ~0.13 s for a conv layer from its kept Gram, ~0.03 s for an FC layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnfeat.errors import ConfigError
from cnnfeat.similarity import LayerData


@dataclass(frozen=True)
class ProbeSplit:
    """Probe positions for fitting (``train``) and scoring (``test``), both sorted."""

    train: torch.Tensor
    test: torch.Tensor


@dataclass(frozen=True)
class ProbeResult:
    """Accuracy of one fitted probe, and how the fit went."""

    test_acc: float
    train_acc: float
    iterations: int  # function evaluations of L-BFGS
    route: str  # "primal", "cholesky" or "eigh"


def probe_split(labels: torch.Tensor, train_fraction: float = 0.5, seed: int = 0) -> ProbeSplit:
    """A fixed stratified split of the probe positions 0..n-1: per class a seeded shuffle, the first part trains."""
    if not 0 < train_fraction < 1:
        raise ConfigError(f"train_fraction must be in (0, 1), got {train_fraction}")
    labels = torch.as_tensor(labels).long()
    gen = torch.Generator().manual_seed(seed)
    train = []
    for c in labels.unique():
        ids = torch.nonzero(labels == c).flatten()
        ids = ids[torch.randperm(len(ids), generator=gen)]
        train.append(ids[: round(train_fraction * len(ids))])
    is_train = torch.zeros(len(labels), dtype=torch.bool)
    is_train[torch.cat(train)] = True
    if is_train.all() or not is_train.any():
        raise ConfigError(
            f"train_fraction={train_fraction} leaves no test or no training rows for {len(labels)} labels"
        )
    return ProbeSplit(torch.nonzero(is_train).flatten(), torch.nonzero(~is_train).flatten())


def _fit(
    z: torch.Tensor, y: torch.Tensor, classes: int, l2: float, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Minimise mean CE(z W + b, y) + l2/2 ||W||² with full-batch L-BFGS from zero (float64, deterministic)."""
    w = torch.zeros(z.shape[1], classes, dtype=torch.float64)
    b = torch.zeros(classes, dtype=torch.float64)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    onehot = F.one_hot(y, classes).double()
    evals = 0

    def closure() -> torch.Tensor:  # loss and its gradient by hand: no autograd graph per evaluation
        nonlocal evals
        evals += 1
        logp = torch.log_softmax(z @ w + b, dim=1)
        loss = -(logp * onehot).sum() / len(z) + 0.5 * l2 * (w * w).sum()
        err = (logp.exp_() - onehot).div_(len(z))
        w.grad = torch.addmm(w, z.T, err, beta=l2)
        b.grad = err.sum(dim=0)
        return loss

    opt.step(closure)
    return w, b, evals


def _cholesky(k: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """Cholesky factor of a training Gram (mean diagonal 1), adding a jitter of 1e-7 or 1e-6 if rounding made
    it indefinite: a private feature of norm <= 1e-3 per image, which the L2 penalty keeps out of the fit."""
    for jitter in (0.0, 1e-7, 1e-6):
        chol, info = torch.linalg.cholesky_ex(k + jitter * torch.eye(len(k), dtype=k.dtype) if jitter else k)
        if int(info) == 0:
            return chol, jitter
    return None, 0.0


def linear_probe(
    data: torch.Tensor | LayerData,
    labels: torch.Tensor,
    split: ProbeSplit,
    l2: float = 1e-3,
    max_iter: int = 500,
    tol: float = 1e-4,
) -> ProbeResult:
    """Test accuracy of an L2-regularised multinomial logistic regression on one layer's probe activations.

    ``data``: features (n, ...) in probe order, or a ``LayerData`` holding them or their (n, n) Gram;
    ``labels`` (n,); ``tol``: stop when every gradient entry is below it.
    """
    if l2 <= 0:
        raise ConfigError(f"l2 must be > 0, got {l2}")
    if isinstance(data, torch.Tensor):
        data = LayerData(features=data)
    labels = torch.as_tensor(labels).long().cpu()
    classes = int(labels.max()) + 1
    tr, te = split.train, split.test
    y_tr, y_te = labels[tr], labels[te]
    x = data.features.flatten(1) if data.features is not None else None
    if x is not None and x.shape[1] <= len(tr):  # narrow: the features themselves
        x = x.double().cpu()
        if not bool(torch.isfinite(x).all()):
            return ProbeResult(float("nan"), float("nan"), 0, "nonfinite")
        x = x - x[tr].mean(dim=0)
        x = x / max(float((x[tr] ** 2).sum(dim=1).mean()) ** 0.5, 1e-300)
        w, b, evals = _fit(x[tr], y_tr, classes, l2, max_iter, tol)
        scores, route = x @ w + b, "primal"
    else:
        if data.gram is not None:
            k = data.gram[:, tr].double().cpu()  # (n, n_train)
        else:
            x = x.float() if not x.is_floating_point() else x
            x = x - x.mean(dim=0)
            k = (x @ x[tr].T).double().cpu()
        if not math.isfinite(float(k.sum())):  # a diverged network: no probe to fit
            return ProbeResult(float("nan"), float("nan"), 0, "nonfinite")
        # Scale so that training rows, centred on their mean, have mean squared norm 1. The Gram itself stays
        # centred on the whole probe's mean: the intercept absorbs any shift, and centring on the training
        # mean would make the training Gram exactly singular.
        k_tr = k[tr]
        m = k_tr.mean(dim=0)
        scale = max(float((k_tr.diagonal() - 2 * m).mean() + m.mean()), 1e-300)
        k.div_(scale)
        k_tr.div_(scale)
        chol, jitter = _cholesky(k_tr)
        if chol is not None:
            w, b, evals = _fit(chol, y_tr, classes, l2, max_iter, tol)
            a = torch.linalg.solve_triangular(chol.T, w, upper=True)  # A = L⁻ᵀ V
            route = "cholesky" if not jitter else f"cholesky+{jitter:g}"
        else:
            lam, u = torch.linalg.eigh(k_tr)
            keep = lam > lam.max() * len(lam) * torch.finfo(torch.float64).eps
            u, root = u[:, keep], lam[keep].sqrt()
            w, b, evals = _fit(u * root, y_tr, classes, l2, max_iter, tol)
            a = u @ (w / root[:, None])
            route = "eigh"
        scores = k @ a + b
    pred = scores.argmax(dim=1)
    return ProbeResult(
        test_acc=float((pred[te] == y_te).double().mean()),
        train_acc=float((pred[tr] == y_tr).double().mean()),
        iterations=evals,
        route=route,
    )
