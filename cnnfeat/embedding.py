"""2-D UMAP maps of feature vectors that stay aligned from epoch to epoch, and how well classes separate.

Why the pieces are as they are (measured on a 2-core CPU, 2,000 x 100 points):
  * the k-NN graph is computed exactly with ``torch.cdist`` (~0.05 s) and handed to UMAP as
    ``precomputed_knn``, which skips pynndescent and its JIT;
  * the first map is a full fit (200 epochs, ~0.8 s after UMAP's one-off ~4 s numba JIT per process);
    later maps start from the previous one (``init=``) and run 50 epochs (~0.2 s), which also keeps
    them close to the previous frame;
  * each map is centred, scaled to unit RMS radius and rotated/reflected onto the previous one
    (orthogonal Procrustes), so frames can share fixed axes;
  * ``umap`` is imported on first use (importing it costs seconds), with numba's on-disk cache switched on
    for the functions a fit compiles: umap-learn compiles them anew in every process (~4 s here); with
    the cache only the first run on a machine pays that. pynndescent, which umap imports but a fit on a
    precomputed k-NN graph never uses, is replaced by stand-ins that import it on first use: in a fresh
    environment its import alone compiled for ~20 s.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F


def stratified_ids(labels: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """``size`` indices drawn (seeded) so that every class gets an equal share (as far as it can), sorted."""
    labels = torch.as_tensor(labels)
    if size > len(labels):
        raise ValueError(f"probe size {size} is larger than the split ({len(labels)} images)")
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [ids[torch.randperm(len(ids), generator=gen)] for ids in per_class]
    quota = [size // len(classes) + (i < size % len(classes)) for i in range(len(classes))]
    chosen, leftover = [], []
    for ids, q in zip(per_class, quota, strict=True):
        chosen.append(ids[:q])
        leftover.append(ids[q:])
    picked = torch.cat(chosen)
    if len(picked) < size:  # a class too small for its quota: fill from the rest
        rest = torch.cat(leftover)
        picked = torch.cat([picked, rest[torch.randperm(len(rest), generator=gen)[: size - len(picked)]]])
    return picked.sort().values


def knn_graph(x: np.ndarray, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours (the point itself first) by Euclidean distance, in row blocks."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    idx, dist = [], []
    for start in range(0, len(xt), block):
        d = torch.cdist(xt[start : start + block], xt)
        v, i = d.topk(k, dim=1, largest=False)
        idx.append(i)
        dist.append(v)
    return torch.cat(idx).numpy(), torch.cat(dist).numpy().astype(np.float32)


_UMAP_JIT = {  # module -> numba functions a UMAP fit compiles (umap-learn 0.5)
    "umap.umap_": ("compute_membership_strengths", "smooth_knn_dist"),
    "umap.layouts": ("_nb_optimize_layout_euclidean_single_epoch", "clip", "rdist", "tau_rand_int"),
    "umap.utils": ("tau_rand", "tau_rand_int"),
}


class _LazyMapping(Mapping):
    """A dict of pynndescent's that is read only when consulted (umap consults it for metrics of its own: never)."""

    def __init__(self, module: str, name: str) -> None:
        self._module, self._name = module, name

    def _real(self) -> Mapping:
        return getattr(_real_pynndescent(self._module), self._name)

    def __contains__(self, key: object) -> bool:
        if key in _EUCLIDEAN and _stubbed():  # what umap asks for a Euclidean fit: answered without importing
            return True
        return key in self._real()

    def __getitem__(self, key: str) -> object:
        return self._real()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._real())

    def __len__(self) -> int:
        return len(self._real())


class _LazyClassMeta(type):
    def __instancecheck__(cls, obj: object) -> bool:
        if _stubbed():  # no NNDescent can exist before the real package is imported
            return False
        return isinstance(obj, _real_pynndescent("pynndescent").NNDescent)


class _LazyNNDescent(metaclass=_LazyClassMeta):
    """Stands in for ``pynndescent.NNDescent``; constructing one imports the real class."""

    def __new__(cls, *args: object, **kwargs: object) -> object:
        return _real_pynndescent("pynndescent").NNDescent(*args, **kwargs)


_STUBS = ("pynndescent", "pynndescent.distances", "pynndescent.sparse")
_EUCLIDEAN = ("euclidean", "l2", "sqeuclidean")


def _stubbed() -> bool:
    """Whether the stand-ins (not the real pynndescent) are what ``import pynndescent`` gives now."""
    return bool(getattr(sys.modules.get("pynndescent"), "_cnnfeat_stub", False))


def _real_pynndescent(module: str) -> types.ModuleType:
    """Import the real pynndescent (module), replacing the stand-ins installed by :func:`_umap`."""
    for name in _STUBS:
        if getattr(sys.modules.get(name), "_cnnfeat_stub", False):
            del sys.modules[name]
    return importlib.import_module(module)


def _install_pynndescent_stubs() -> None:
    """Stand-ins for the three pynndescent names umap-learn imports at import time.

    Importing pynndescent compiles dozens of numba functions (about 20 s in a fresh environment, 2 s with a warm
    numba cache) that a fit with ``precomputed_knn`` and a Euclidean metric never calls. The stand-ins import the
    real package the moment anything actually uses it; ``CNNFEAT_LAZY_PYNNDESCENT=0`` turns this off.
    """
    if os.environ.get("CNNFEAT_LAZY_PYNNDESCENT") == "0" or "pynndescent" in sys.modules:
        return
    attrs = {
        "pynndescent": {"NNDescent": _LazyNNDescent, "__path__": []},
        "pynndescent.distances": {"named_distances": _LazyMapping("pynndescent.distances", "named_distances")},
        "pynndescent.sparse": {"sparse_named_distances": _LazyMapping("pynndescent.sparse", "sparse_named_distances")},
    }
    for name, values in attrs.items():
        stub = types.ModuleType(name, "cnnfeat's stand-in: the real module is imported on first use")
        stub.__dict__.update(values, _cnnfeat_stub=True)
        sys.modules[name] = stub


@cache
def _umap():
    """Import umap-learn once, with numba's on-disk cache enabled for the functions its fits compile."""
    _install_pynndescent_stubs()
    import umap

    for module, names in _UMAP_JIT.items():
        mod = importlib.import_module(module)
        for name in names:
            fn = getattr(mod, name, None)
            if hasattr(fn, "enable_caching"):  # a numba dispatcher; other umap versions simply skip this
                fn.enable_caching()
    return umap


def fit_umap(
    x: np.ndarray,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    init: np.ndarray | str = "spectral",
    n_epochs: int = 200,
    random_state: int | None = 0,
) -> np.ndarray:
    """A 2-D UMAP of ``x`` (N, D); ``init`` an (N, 2) array warm-starts from a previous map.

    ``random_state`` makes the result deterministic (umap then runs single-threaded); ``None`` is
    faster on many cores but not reproducible.
    """
    umap = _umap()
    knn = knn_graph(x, n_neighbors)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        warnings.filterwarnings("ignore", message=".*precomputed_knn.*")
        reducer = umap.UMAP(
            n_components=2,
            n_neighbors=n_neighbors,
            min_dist=min_dist,
            init=init,
            n_epochs=n_epochs,
            random_state=random_state,
            precomputed_knn=(*knn, None),
        )
        return reducer.fit_transform(x).astype(np.float32)


def normalize(embedding: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Centre, scale to unit RMS radius and, given a reference map of the same points, rotate/reflect onto it."""
    e = embedding - embedding.mean(axis=0)
    e = e / max(float(np.sqrt((e**2).sum(axis=1).mean())), 1e-12)
    if reference is not None:
        from scipy.linalg import orthogonal_procrustes  # imported on use: SciPy costs start-up time

        rotation, _ = orthogonal_procrustes(e, reference)
        e = e @ rotation
    return e.astype(np.float32)


def frame_shift(a: np.ndarray, b: np.ndarray) -> float:
    """Mean distance a point moves between two normalised maps of the same points (in RMS radii)."""
    return float(np.sqrt(((a - b) ** 2).sum(axis=1)).mean())


@dataclass(frozen=True)
class ClusterQuality:
    """How well the classes separate, in the feature space and in its 2-D map."""

    knn_acc: float  # k-NN accuracy (k-fold cross-validated) on the feature vectors
    knn_acc_2d: float  # the same on the 2-D map
    trustworthiness: float  # are the map's neighbours true neighbours? (1 = perfectly)
    silhouette: float  # class separation in the map (-1..1)

    def as_dict(self, prefix: str = "umap/") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in self.__dict__.items()}


def knn_cv_accuracy(x: torch.Tensor, labels: torch.Tensor, k: int = 5, folds: int = 5) -> float:
    """``folds``-fold (scikit-learn's unshuffled ``StratifiedKFold``) accuracy of a k-NN majority vote.

    Same folds and votes as ``cross_val_score(KNeighborsClassifier(k), x, labels, cv=StratifiedKFold(folds))``
    (ties go to the smallest label, as there), computed from one distance matrix.
    """
    d = torch.cdist(x, x)
    n_classes = int(labels.max()) + 1
    correct = 0
    from sklearn.model_selection import StratifiedKFold  # imported on use: scikit-learn costs start-up time

    for train, test in StratifiedKFold(folds).split(np.zeros(len(labels)), labels.numpy()):
        train_t, test_t = torch.from_numpy(train), torch.from_numpy(test)
        nbrs = d[test_t][:, train_t].topk(k, dim=1, largest=False).indices
        votes = F.one_hot(labels[train_t][nbrs], n_classes).sum(dim=1)
        correct += int((votes.argmax(dim=1) == labels[test_t]).sum())
    return correct / len(labels)


def trustworthiness_score(x: torch.Tensor, embedding: torch.Tensor, k: int = 5) -> float:
    """Trustworthiness of a map (as ``sklearn.manifold.trustworthiness``, Euclidean, k neighbours).

    Penalises map neighbours that are far apart in the original space:
    ``1 - 2 / (n k (2n - 3k - 1)) * sum_i sum_{j in N_k^map(i)} max(0, rank_i(j) - k)``. Only the ranks of
    the k map neighbours are needed, not a full sort of every row as scikit-learn does.
    """
    n = len(x)
    dx, de = torch.cdist(x, x), torch.cdist(embedding, embedding)
    de.fill_diagonal_(float("inf"))
    nbrs = de.topk(k, dim=1, largest=False).indices  # (n, k) map neighbours
    d_nbr = dx.gather(1, nbrs)
    penalty = 0
    for s in range(0, n, 512):  # rows in blocks: (block, k, n) comparisons stay small
        # rank of j for i = points closer to i than j is (i itself, at distance 0, included)
        ranks = (dx[s : s + 512].unsqueeze(1) < d_nbr[s : s + 512].unsqueeze(2)).sum(dim=2)
        penalty += int((ranks - k).clamp(min=0).sum())
    return 1.0 - penalty * 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0))


def silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette of the classes (as ``sklearn.metrics.silhouette_score``, Euclidean)."""
    d = torch.cdist(x, x).double()
    onehot = F.one_hot(labels).double()
    counts = onehot.sum(dim=0)
    sums = d @ onehot  # (n, classes): summed distance to every class
    own = onehot.bool()
    own_count = counts[labels]
    a = sums[own] / (own_count - 1).clamp(min=1)
    mean_other = (sums / counts).masked_fill(own, float("inf"))
    b = mean_other.min(dim=1).values
    s = (b - a) / torch.maximum(a, b)
    s = torch.where(own_count > 1, s, torch.zeros_like(s))  # singletons score 0, as in scikit-learn
    return float(s.mean())


def cluster_quality(
    features: np.ndarray, embedding: np.ndarray, labels: np.ndarray, k: int = 5, folds: int = 5
) -> ClusterQuality:
    """k-NN accuracy (``folds``-fold, stratified, unshuffled) in both spaces, trustworthiness, silhouette.

    Computed with torch (the same numbers as scikit-learn's functions, which the tests check): scikit-learn's
    OpenMP runtime and torch's spin-wait against each other on a small CPU, which made the scikit-learn
    versions 4x slower right after a forward pass.
    """
    f, e, y = torch.from_numpy(features).float(), torch.from_numpy(embedding).float(), torch.from_numpy(labels).long()
    return ClusterQuality(
        knn_acc=knn_cv_accuracy(f, y, k, folds),
        knn_acc_2d=knn_cv_accuracy(e, y, k, folds),
        trustworthiness=trustworthiness_score(f, e, k),
        silhouette=silhouette(e, y),
    )
