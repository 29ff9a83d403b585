"""2-D UMAP maps of feature vectors that stay aligned from epoch to epoch, and how well classes separate.

Why the pieces are as they are (measured on a 2-core CPU, 2,000 x 100 points):
  * the k-NN graph is computed exactly with ``torch.cdist`` (~0.05 s) and handed to UMAP as
    ``precomputed_knn``, which skips pynndescent and its JIT;
  * the first map is a full fit (200 epochs, ~0.8 s after UMAP's one-off ~4 s numba JIT per process);
    later maps start from the previous one (``init=``) and run 50 epochs (~0.2 s), which also keeps
    them close to the previous frame;
  * each map is centred, scaled to unit RMS radius and rotated/reflected onto the previous one
    (orthogonal Procrustes), so frames can share fixed axes;
  * ``umap`` is imported on first use: importing it costs seconds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import orthogonal_procrustes
from sklearn.manifold import trustworthiness
from sklearn.metrics import silhouette_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier


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
    import umap

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


def cluster_quality(
    features: np.ndarray, embedding: np.ndarray, labels: np.ndarray, k: int = 5, folds: int = 5
) -> ClusterQuality:
    """k-NN accuracy (``folds``-fold, stratified, unshuffled) in both spaces, trustworthiness, silhouette."""
    cv = StratifiedKFold(folds)
    knn = KNeighborsClassifier(k)
    return ClusterQuality(
        knn_acc=float(cross_val_score(knn, features, labels, cv=cv).mean()),
        knn_acc_2d=float(cross_val_score(knn, embedding, labels, cv=cv).mean()),
        trustworthiness=float(trustworthiness(features, embedding, n_neighbors=k)),
        silhouette=float(silhouette_score(embedding, labels)),
    )
