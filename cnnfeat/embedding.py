"""2-D UMAP maps of feature vectors that stay aligned from epoch to epoch, and how well classes separate.

Why the pieces are as they are (measured on a 2-core CPU, 2,000 x 100 points):
  * the k-NN graph is computed exactly with ``torch.cdist`` (~0.05 s) and handed to UMAP as
    ``precomputed_knn``, which skips pynndescent and its JIT;
  * the first map is a full fit (200 epochs, ~0.8 s after UMAP's one-off ~4 s numba JIT per process);
    later maps (:func:`fit_aligned`) run UMAP's optimisation, in float32, from the previous map for 100 epochs
    (~0.25 s CPU) with each point pulled back toward its old position as strongly as its neighbourhood stayed the
    same (k-NN overlap between the two frames' vectors): on a real training trajectory frames then move 2-4x
    less than after a plain warm start and less than umap-learn's ``AlignedUMAP``'s, in 1/23 of its CPU time,
    with 2-D accuracy and trustworthiness within ~0.005 of independent fits (benchmarks/aligned_umap.py);
  * each map is centred, scaled to unit RMS radius and rotated/reflected onto the previous one
    (orthogonal Procrustes), so frames can share fixed axes;
  * the quality metrics visit distance matrices in row blocks, so 10,000 points need ~10 MB, not 1.2 GB;
  * ``umap`` is imported on first use (importing it costs seconds), with numba's on-disk cache switched on
    for the functions a fit compiles: umap-learn compiles them anew in every process (~4 s here); with
    the cache only the first run on a machine pays that. pynndescent, which umap imports but a fit on a
    precomputed k-NN graph never uses, is replaced by stand-ins that import it on first use: in a fresh
    environment its import alone compiled for ~20 s.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
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


# The aligned frames: how strongly a point is held where it was, and the optimiser's settings, chosen on a real
# SmallCNN trajectory against umap-learn's AlignedUMAP (benchmarks/aligned_umap.py): a pull of 6.5 * overlap^2 per
# unit of learning rate, which starts at 0.5 (a warm start needs no full-size first steps). Weaker pulls move
# more than AlignedUMAP from epoch 1 to 2 (5: 0.074-0.077 RMS radii against its 0.074); stronger ones cost 2-D
# accuracy where the classes rearrange (8: -0.009 at epoch 3 against independent fits).
ANCHOR = 6.5
_OVERLAP_POWER = 2.0
_LEARNING_RATE = 0.5
_NEGATIVE_RATE = 5.0  # umap-learn's negative samples per positive one


def _layout_epochs(
    y: np.ndarray,
    head: np.ndarray,
    tail: np.ndarray,
    epochs_per_sample: np.ndarray,
    a: float,
    b: float,
    n_epochs: int,
    learning_rate: float,
    target: np.ndarray,
    pull: np.ndarray,
    seed: int,
) -> None:
    """UMAP's SGD on a 2-D layout ``y`` (in place), each epoch followed by a pull toward ``target``.

    The edge loop is umap-learn's ``optimize_layout_euclidean``: attraction along the edges due this epoch (both
    ends move), repulsion from ``_NEGATIVE_RATE`` random points per positive sample, gradients clipped to 4, the
    learning rate falling linearly to 0. After each epoch point ``i`` moves ``min(1, rate * pull[i])`` of the way
    to ``target[i]`` placed at the layout's current centre and RMS radius (the target is a normalised map: the
    pull holds the shape, not the scale). The gradients are computed in float32, like the layout (umap-learn mixes
    in float64 ``a`` and ``b``, which makes every power a float64 one: 1.25x slower here), and a negative sample's
    index is the top 32 bits of a xorshift64 draw scaled to ``n`` (a multiply and a shift, not a 64-bit modulo).
    Compiled by numba on first use (:func:`_layout_kernel`).
    """
    n, n_edges = y.shape[0], head.shape[0]
    a32, b32, clip, one = np.float32(a), np.float32(b), np.float32(4.0), np.float32(1.0)
    n64, shift = np.uint64(n), np.uint64(32)
    next_sample = epochs_per_sample.copy()
    per_negative = epochs_per_sample / _NEGATIVE_RATE
    next_negative = per_negative.copy()
    state = np.uint64(seed) * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
    for epoch in range(n_epochs):
        rate = np.float32(learning_rate * (1.0 - epoch / n_epochs))
        for e in range(n_edges):
            if next_sample[e] > epoch:
                continue
            j, k = head[e], tail[e]
            dx, dy = y[j, 0] - y[k, 0], y[j, 1] - y[k, 1]
            d2 = dx * dx + dy * dy
            g = np.float32(0.0)
            if d2 > 0.0:
                p = d2**b32
                g = np.float32(-2.0) * a32 * b32 * p / d2 / (a32 * p + one)
            gx, gy = min(max(g * dx, -clip), clip) * rate, min(max(g * dy, -clip), clip) * rate
            y[j, 0] += gx
            y[j, 1] += gy
            y[k, 0] -= gx
            y[k, 1] -= gy
            next_sample[e] += epochs_per_sample[e]
            n_negative = int((epoch - next_negative[e]) / per_negative[e])
            for _ in range(n_negative):
                state ^= state << np.uint64(13)  # xorshift64
                state ^= state >> np.uint64(7)
                state ^= state << np.uint64(17)
                k = int(((state >> shift) * n64) >> shift)
                dx, dy = y[j, 0] - y[k, 0], y[j, 1] - y[k, 1]
                d2 = dx * dx + dy * dy
                if d2 <= 0.0:
                    continue
                g = np.float32(2.0) * b32 / ((np.float32(0.001) + d2) * (a32 * d2**b32 + one))
                y[j, 0] += min(max(g * dx, -clip), clip) * rate
                y[j, 1] += min(max(g * dy, -clip), clip) * rate
            next_negative[e] += n_negative * per_negative[e]
        cx, cy = y[:, 0].mean(), y[:, 1].mean()
        radius = np.sqrt(((y[:, 0] - cx) ** 2 + (y[:, 1] - cy) ** 2).mean())
        for i in range(n):
            step = min(one, rate * pull[i])
            y[i, 0] += step * (cx + radius * target[i, 0] - y[i, 0])
            y[i, 1] += step * (cy + radius * target[i, 1] - y[i, 1])


@cache
def _layout_kernel() -> Callable[..., None]:
    """:func:`_layout_epochs` compiled by numba (imported on use), cached on disk like umap-learn's functions."""
    import numba

    return numba.njit(_layout_epochs, fastmath=True, cache=True)


@cache
def _ab_params(min_dist: float) -> tuple[float, float]:
    """UMAP's curve ``1 / (1 + a d^(2b))`` for ``min_dist`` (spread 1), as umap-learn fits it."""
    _umap()
    from umap.umap_ import find_ab_params

    a, b = find_ab_params(1.0, min_dist)
    return float(a), float(b)


_KNN_MEMO: dict[tuple[bytes, int], tuple[np.ndarray, np.ndarray]] = {}


def _knn_memo(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn_graph`, remembering the last two answers: a frame's graph is the next frame's "previous" one."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    key = (hashlib.blake2b(x.tobytes(), digest_size=16).digest() + repr(x.shape).encode(), k)
    if key not in _KNN_MEMO:
        while len(_KNN_MEMO) >= 2:
            del _KNN_MEMO[next(iter(_KNN_MEMO))]
        _KNN_MEMO[key] = knn_graph(x, k)
    return _KNN_MEMO[key]


def neighbour_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the Jaccard overlap of two neighbour lists of the same points (N, k): 1 = the same neighbours."""
    shared = (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)
    return (shared / (a.shape[1] + b.shape[1] - shared)).astype(np.float32)


def fit_aligned(
    x: np.ndarray,
    previous: np.ndarray,
    previous_x: np.ndarray | None = None,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    n_epochs: int = 100,
    random_state: int | None = 0,
    anchor: float = ANCHOR,
) -> np.ndarray:
    """The next frame of an aligned sequence: a 2-D UMAP of ``x`` (N, D) that starts from ``previous``.

    ``previous`` is the last frame's map of the same N points (any scale; normalised here). UMAP's optimisation
    starts from it and, after every epoch, pulls each point back toward its old position with a strength
    ``anchor * overlap^2``, where ``overlap`` is the Jaccard overlap of the point's ``n_neighbors - 1`` nearest
    neighbours in ``previous_x`` (the last frame's vectors) and in ``x``: a point whose neighbourhood is the same
    stays put, one whose neighbourhood changed moves freely. Without ``previous_x`` the overlap is taken between
    the neighbours in ``x`` and the ``2 * n_neighbors`` nearest in the old map (does the old map already put the
    point among its new neighbours?). ``anchor=0`` is a plain warm start. Returns the map normalised and rotated
    onto ``previous`` (:func:`normalize`); a seed gives the same map every time, ``None`` a random one.
    """
    if previous.shape != (len(x), 2) or (previous_x is not None and len(previous_x) != len(x)):
        raise ValueError(
            f"previous map {previous.shape} and vectors {None if previous_x is None else previous_x.shape} "
            f"must hold the same {len(x)} points as x"
        )
    _umap()
    from umap.umap_ import fuzzy_simplicial_set

    knn_idx, knn_dist = _knn_memo(x, n_neighbors)
    graph, _, _ = fuzzy_simplicial_set(x, n_neighbors, None, "euclidean", knn_indices=knn_idx, knn_dists=knn_dist)
    graph = graph.tocoo()
    graph.sum_duplicates()
    keep = graph.data >= graph.data.max() / n_epochs  # as umap-learn: edges too weak to be sampled once are dropped
    head, tail, weight = graph.row[keep].astype(np.int32), graph.col[keep].astype(np.int32), graph.data[keep]
    prev = normalize(previous)
    if previous_x is not None:
        overlap = neighbour_overlap(_knn_memo(previous_x, n_neighbors)[0][:, 1:], knn_idx[:, 1:])
    else:
        overlap = neighbour_overlap(knn_graph(prev, 2 * n_neighbors + 1)[0][:, 1:], knn_idx[:, 1:])
    span = float((prev.max(axis=0) - prev.min(axis=0)).mean())
    y = np.ascontiguousarray(prev * (10.0 / span), dtype=np.float32)  # umap-learn's start spans 0..10 too
    seed = int(np.random.randint(2**31)) if random_state is None else random_state
    _layout_kernel()(
        y,
        head,
        tail,
        (weight.max() / weight).astype(np.float64),  # epochs per sample, as umap-learn's make_epochs_per_sample
        *_ab_params(min_dist),
        n_epochs,
        _LEARNING_RATE,
        prev,
        (anchor * overlap**_OVERLAP_POWER).astype(np.float32),
        seed,
    )
    return normalize(y, reference=prev)


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


_BLOCK = 256  # rows of a distance matrix held at once: (256, N) floats, 10 MB at N = 10,000; stays in cache
# while each metric reads it (1,024-row blocks took 1.7x as long at N = 10,000)


def _row_blocks(x: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """Row blocks of the distance matrix of ``x`` to itself: (rows, distances (rows, N)); never the whole matrix."""
    for start in range(0, len(x), _BLOCK):
        rows = slice(start, min(start + _BLOCK, len(x)))
        yield rows, torch.cdist(x[rows], x)


def _folds(labels: torch.Tensor, folds: int) -> torch.Tensor:
    """The test fold of every point under scikit-learn's unshuffled ``StratifiedKFold``."""
    from sklearn.model_selection import StratifiedKFold  # imported on use: scikit-learn costs start-up time

    fold = torch.empty(len(labels), dtype=torch.long)
    for f, (_, test) in enumerate(StratifiedKFold(folds).split(np.zeros(len(labels)), labels.numpy())):
        fold[torch.from_numpy(test)] = f
    return fold


class _KnnVotes:
    """Cross-validated k-NN votes, row block by row block: a point's neighbours come from the other folds only."""

    def __init__(self, labels: torch.Tensor, k: int, folds: int) -> None:
        self.labels, self.k, self.fold = labels, k, _folds(labels, folds)
        self.n_classes, self.correct = int(labels.max()) + 1, 0

    def add(self, rows: slice, d: torch.Tensor) -> None:
        same_fold = self.fold[rows, None] == self.fold[None, :]  # the own fold (the point itself included)
        nbrs = d.masked_fill(same_fold, float("inf")).topk(self.k, dim=1, largest=False).indices
        votes = F.one_hot(self.labels[nbrs], self.n_classes).sum(dim=1)
        self.correct += int((votes.argmax(dim=1) == self.labels[rows]).sum())

    def accuracy(self) -> float:
        return self.correct / len(self.labels)


def _map_neighbours(rows: slice, d: torch.Tensor, k: int) -> torch.Tensor:
    """The k nearest other points of each row of a block of map distances."""
    d = d.clone()
    d[torch.arange(d.shape[0]), torch.arange(rows.start, rows.stop)] = float("inf")
    return d.topk(k, dim=1, largest=False).indices


def _rank_penalty(rows: slice, dx: torch.Tensor, nbrs: torch.Tensor, k: int) -> int:
    """Trustworthiness's sum of ``max(0, rank - k)`` over a block's map neighbours (``nbrs``: (N, k), all rows)."""
    # rank of j for i = points closer to i than j is (i itself, at distance 0, included). Only distances below a
    # row's farthest map neighbour count toward any rank, and those are few: each is placed among the row's k sorted
    # neighbour distances and the ranks read off a histogram (3-4x faster than comparing every distance k times).
    thresholds = dx.gather(1, nbrs[rows]).sort(dim=1).values
    penalty = 0
    for s in range(0, dx.shape[0], 256):  # bounded memory when a bad map makes every distance count
        d, t = dx[s : s + 256], thresholds[s : s + 256]
        row, col = (d < t[:, -1:]).nonzero(as_tuple=True)
        below = (d[row, col].unsqueeze(1) >= t[row]).sum(dim=1)  # how many neighbour distances it is not below
        counts = torch.bincount(row * (k + 1) + below, minlength=len(t) * (k + 1)).view(len(t), k + 1)
        ranks = counts.cumsum(dim=1)[:, :k]  # points below the m-th smallest neighbour distance, m = 0..k-1
        penalty += int((ranks - k).clamp(min=0).sum())
    return penalty


def _trust(penalty: int, n: int, k: int) -> float:
    return 1.0 - penalty * 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0))


def knn_cv_accuracy(x: torch.Tensor, labels: torch.Tensor, k: int = 5, folds: int = 5) -> float:
    """``folds``-fold (scikit-learn's unshuffled ``StratifiedKFold``) accuracy of a k-NN majority vote.

    Same folds and votes as ``cross_val_score(KNeighborsClassifier(k), x, labels, cv=StratifiedKFold(folds))``
    (ties go to the smallest label, as there), from the distance matrix in row blocks (memory O(N), not O(N^2)).
    """
    votes = _KnnVotes(labels, k, folds)
    for rows, d in _row_blocks(x):
        votes.add(rows, d)
    return votes.accuracy()


def trustworthiness_score(x: torch.Tensor, embedding: torch.Tensor, k: int = 5) -> float:
    """Trustworthiness of a map (as ``sklearn.manifold.trustworthiness``, Euclidean, k neighbours).

    Penalises map neighbours that are far apart in the original space:
    ``1 - 2 / (n k (2n - 3k - 1)) * sum_i sum_{j in N_k^map(i)} max(0, rank_i(j) - k)``. Only the ranks of
    the k map neighbours are needed, not a full sort of every row as scikit-learn does; both distance
    matrices are visited in row blocks.
    """
    nbrs = torch.cat([_map_neighbours(rows, d, k) for rows, d in _row_blocks(embedding)])
    penalty = sum(_rank_penalty(rows, dx, nbrs, k) for rows, dx in _row_blocks(x))
    return _trust(penalty, len(x), k)


class _ClassDistances:
    """Per point, the summed distance to every class, for the silhouette, row block by row block."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels, self.onehot = labels, F.one_hot(labels).double()
        self.sums = torch.empty(len(labels), self.onehot.shape[1], dtype=torch.float64)

    def add(self, rows: slice, d: torch.Tensor) -> None:
        self.sums[rows] = d.double() @ self.onehot

    def silhouette(self) -> float:
        counts = self.onehot.sum(dim=0)
        own = self.onehot.bool()
        own_count = counts[self.labels]
        a = self.sums[own] / (own_count - 1).clamp(min=1)
        mean_other = (self.sums / counts).masked_fill(own, float("inf"))
        b = mean_other.min(dim=1).values
        s = (b - a) / torch.maximum(a, b)
        s = torch.where(own_count > 1, s, torch.zeros_like(s))  # singletons score 0, as in scikit-learn
        return float(s.mean())


def silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette of the classes (as ``sklearn.metrics.silhouette_score``, Euclidean)."""
    sums = _ClassDistances(labels)
    for rows, d in _row_blocks(x):
        sums.add(rows, d)
    return sums.silhouette()


def cluster_quality(
    features: np.ndarray, embedding: np.ndarray, labels: np.ndarray, k: int = 5, folds: int = 5
) -> ClusterQuality:
    """k-NN accuracy (``folds``-fold, stratified, unshuffled) in both spaces, trustworthiness, silhouette.

    Computed with torch (the same numbers as scikit-learn's functions, which the tests check): scikit-learn's
    OpenMP runtime and torch's spin-wait against each other on a small CPU, which made the scikit-learn
    versions 4x slower right after a forward pass.
    """
    f, e, y = torch.from_numpy(features).float(), torch.from_numpy(embedding).float(), torch.from_numpy(labels).long()
    votes_2d, votes, sums = _KnnVotes(y, k, folds), _KnnVotes(y, k, folds), _ClassDistances(y)
    nbrs = []
    for rows, d in _row_blocks(e):  # one pass over the map's distances ...
        votes_2d.add(rows, d)
        sums.add(rows, d)
        nbrs.append(_map_neighbours(rows, d, k))
    map_nbrs, penalty = torch.cat(nbrs), 0
    for rows, d in _row_blocks(f):  # ... and one over the features'
        votes.add(rows, d)
        penalty += _rank_penalty(rows, d, map_nbrs, k)
    return ClusterQuality(
        knn_acc=votes.accuracy(),
        knn_acc_2d=votes_2d.accuracy(),
        trustworthiness=_trust(penalty, len(f), k),
        silhouette=sums.silhouette(),
    )
