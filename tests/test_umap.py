"""The UMAP embedding callback: tags and steps, animation, projector, numbers, alignment, determinism, errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from cnnfeat import embedding
from cnnfeat.callbacks import EmbeddingCallback
from cnnfeat.callbacks.base import inference
from cnnfeat.callbacks.session import build_probe
from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.errors import ConfigError
from cnnfeat.graph import LayerError
from cnnfeat.models import SmallCNN
from cnnfeat.run.train import train
from tests.conftest import read_events

MakeCfg = Callable[..., DictConfig]
ONLY_UMAP = [
    "~callbacks.filters",
    "~callbacks.feature_maps",
    "~callbacks.dead_relu",
    "~callbacks.top_patches",
    "callbacks.umap.probe_size=300",
]


def test_training_logs_maps_numbers_gif_and_projector(make_cfg: MakeCfg, tmp_path: Path) -> None:
    train(make_cfg(*ONLY_UMAP, "trainer.max_epochs=2", "trainer.limit_train_batches=30"))
    ev = read_events(tmp_path)
    assert [e.step for e in ev["images"]["umap/features"]] == [0, 1, 2]
    assert [e.step for e in ev["images"]["umap/pixels"]] == [0], "the raw-pixel baseline is drawn once"
    sizes = {(e.width, e.height) for e in ev["images"]["umap/features"]}
    assert len(sizes) == 1 and next(iter(sizes))[1] == 400 + 24
    sc = ev["scalars"]
    for name in ("knn_acc", "knn_acc_2d", "trustworthiness"):
        assert len(sc[f"umap/{name}"]) == 3 and all(0.0 <= v <= 1.0 for _, v in sc[f"umap/{name}"])
        assert len(sc[f"umap/pixels/{name}"]) == 1
    assert all(-1.0 <= v <= 1.0 for _, v in sc["umap/silhouette"])
    assert [s for s, _ in sc["umap/frame_shift"]] == [1, 2] and [s for s, _ in sc["umap/knn_acc"]] == [0, 1, 2]

    gif = Image.open(tmp_path / "umap_embedding.gif")
    assert gif.n_frames == 3
    frame = np.asarray(gif.convert("RGB"), dtype=float)
    assert frame.std() > 10, "frames must not be blank"
    assert (tmp_path / "projector_config.pbtxt").is_file()
    assert "umap/features" in (tmp_path / "projector_config.pbtxt").read_text()


def test_knn_accuracy_rises_with_training(datamodule: FashionMNISTDataModule) -> None:
    import pytorch_lightning as pl

    torch.manual_seed(0)
    cb = EmbeddingCallback(probe_size=500, pixels=False, gif=False, projector=False)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=150,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.fit(SmallCNN(), datamodule=datamodule)
    untrained, trained = cb.quality[0], cb.quality[1]
    assert trained.knn_acc > untrained.knn_acc + 0.02, (untrained, trained)
    assert trained.silhouette > untrained.silhouette


def test_same_seed_same_map_and_warm_frames_stay_aligned(datamodule: FashionMNISTDataModule) -> None:
    model = SmallCNN()

    def maps(seed: int, steps: int) -> list[np.ndarray]:
        cb = EmbeddingCallback(probe_size=400, pixels=False, seed=seed)
        with inference(model):
            cb.prepare(model, build_probe(datamodule, cb.probe_spec))
            for s in range(steps):
                cb.render(model, cb.probe, s)
        return [cb.embeddings[s] for s in range(steps)]

    a, b = maps(0, 2), maps(0, 1)
    assert np.array_equal(a[0], b[0]), "deterministic: the same seed gives the same map"
    # re-fitting the same features from the previous map barely moves the points ...
    warm_shift = embedding.frame_shift(a[0], a[1])
    # ... while an independent fit (another seed, no alignment) lands somewhere else
    cold = maps(1, 1)[0]
    assert warm_shift < 0.5 * embedding.frame_shift(a[0], cold), (warm_shift, embedding.frame_shift(a[0], cold))


def test_state_dict_round_trip_keeps_the_trajectory(datamodule: FashionMNISTDataModule) -> None:
    model = SmallCNN()
    cb = EmbeddingCallback(probe_size=300)
    with inference(model):
        cb.prepare(model, build_probe(datamodule, cb.probe_spec))
        cb.render(model, cb.probe, 0)
    state = cb.state_dict()
    restored = EmbeddingCallback(probe_size=300)
    restored.load_state_dict(state)
    assert torch.equal(restored.probe_ids, cb.probe_ids)
    assert np.array_equal(restored.embeddings[0], cb.embeddings[0])
    assert np.array_equal(restored.pixel_embedding, cb.pixel_embedding)
    # a resumed fit draws the next map as an uninterrupted one does: it is anchored where the last map's vectors
    # kept their neighbourhoods, and the state keeps those vectors (set up first, then restored, as Lightning does)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.2)
    resumed = EmbeddingCallback(probe_size=300)
    with inference(model):
        resumed.prepare(model, cb.probe)
        resumed.load_state_dict(state)
        assert resumed.render(model, cb.probe, 1).scalars == cb.render(model, cb.probe, 1).scalars
    assert np.array_equal(resumed.embeddings[1], cb.embeddings[1])


def test_stratified_probe_is_balanced_and_seeded(datamodule: FashionMNISTDataModule) -> None:
    labels = datamodule.dataset("test").labels
    ids = embedding.stratified_ids(labels, 1000, seed=3)
    assert torch.equal(ids, embedding.stratified_ids(labels, 1000, seed=3))
    assert not torch.equal(ids, embedding.stratified_ids(labels, 1000, seed=4))
    assert torch.bincount(labels[ids]).tolist() == [100] * 10
    assert len(ids.unique()) == 1000


def test_cluster_quality_of_a_perfect_and_a_random_map() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    centres = rng.normal(size=(4, 10)) * 20
    feats = centres[labels] + rng.normal(size=(200, 10))
    good = embedding.cluster_quality(feats, centres[labels][:, :2] + rng.normal(size=(200, 2)), labels)
    bad = embedding.cluster_quality(feats, rng.normal(size=(200, 2)), labels)
    assert good.knn_acc == 1.0 and good.knn_acc_2d > 0.95 and good.silhouette > 0.5
    assert bad.knn_acc_2d < 0.5 and bad.silhouette < 0.1 and bad.trustworthiness < good.trustworthiness


class _NoFeatures(SmallCNN):
    """A module without the public ``features()`` method (its forward still works)."""

    features = None  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(SmallCNN.features(self, x))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["callbacks.umap.probe_size=20000"], r"probe_size=20000 is larger than the test split \(10000 images\)"),
        (["callbacks.umap.every_n_epochs=0"], r"every_n_epochs must be an integer >= 1, got 0"),
        (["callbacks.umap.probe_size=10"], r"probe_size=10 is too small"),
    ],
)
def test_bad_arguments_fail_before_training(
    make_cfg: MakeCfg, tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(Exception, match=message):
        train(make_cfg(*ONLY_UMAP, *overrides))
    assert not (tmp_path / "checkpoints").exists()


def test_module_without_features_is_refused(datamodule: FashionMNISTDataModule) -> None:
    import pytorch_lightning as pl

    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_progress_bar=False,
        callbacks=[EmbeddingCallback(probe_size=100)],
    )
    message = r"needs _NoFeatures.features\(x\) -> \(N, D\) or a node to embed: name one with layer=.*\['sub', 'div'"
    with pytest.raises(ConfigError, match=message):
        trainer.fit(_NoFeatures(), datamodule=datamodule)


def test_layer_embeds_any_node_flattened(datamodule: FashionMNISTDataModule) -> None:
    """``layer=`` maps a node's output (here conv3's maps, 784-d once flattened) instead of ``features()``."""
    model = _NoFeatures()
    cb = EmbeddingCallback(probe_size=100, layer="pool2", pixels=False)
    with inference(model):
        cb.prepare(model, build_probe(datamodule, cb.probe_spec))
        cb.render(model, cb.probe, 0)
        x, _ = datamodule.images("test", cb.probe_ids)
        pooled = model.pool2(
            model.relu3(
                model.conv3(
                    model.pool1(
                        model.relu2(model.conv2(model.relu1(model.conv1((x - model.input_mean) / model.input_std))))
                    )
                )
            )
        )
    assert cb._last_features.shape == (100, 16 * 7 * 7)
    assert np.allclose(cb._last_features, pooled.flatten(1).numpy(), atol=1e-6)
    with pytest.raises(LayerError, match=r"Unknown layer name\(s\) \['pool7'\] for _NoFeatures; valid names: \["):
        EmbeddingCallback(probe_size=100, layer="pool7").prepare(model, cb.probe)


def test_torch_metrics_equal_scikit_learn() -> None:
    from sklearn.manifold import trustworthiness
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 6, 700)
    x = (rng.normal(size=(700, 20)) + labels[:, None] * 0.4).astype(np.float32)
    e = (x[:, :2] + rng.normal(size=(700, 2))).astype(np.float32)
    xt, et, yt = torch.from_numpy(x), torch.from_numpy(e), torch.from_numpy(labels)
    for data, t in ((x, xt), (e, et)):
        ref = cross_val_score(KNeighborsClassifier(5), data, labels, cv=StratifiedKFold(5)).mean()
        assert embedding.knn_cv_accuracy(t, yt, 5, 5) == pytest.approx(ref, abs=1e-9)
    assert embedding.trustworthiness_score(xt, et, 5) == pytest.approx(trustworthiness(x, e, n_neighbors=5), abs=1e-6)
    assert embedding.silhouette(et, yt) == pytest.approx(silhouette_score(e, labels), abs=1e-5)


LAZY_CHECK = """
import sys
import numpy as np
from cnnfeat.embedding import fit_umap
x = np.random.RandomState(0).randn(300, 20).astype("float32")
e = fit_umap(x, n_neighbors=10, n_epochs=20, random_state=0)
np.save(sys.argv[1], e)
print("stand-in kept:", getattr(sys.modules["pynndescent"], "_cnnfeat_stub", False))
import umap.umap_ as u
print("real on use:", type(u.NNDescent(x, n_neighbors=5, random_state=0)).__module__)
"""


@pytest.mark.slow
def test_pynndescent_is_imported_only_when_used(tmp_path: Path) -> None:
    """Its import compiles for ~20 s in a fresh environment; a fit on a precomputed k-NN graph never needs it.

    Slow: two fresh processes, each compiling umap-learn's functions when the numba cache is cold (45 s in CI)."""
    import os
    import subprocess
    import sys

    maps = {}
    for lazy in ("1", "0"):
        out = tmp_path / f"map{lazy}.npy"
        r = subprocess.run(
            [sys.executable, "-c", LAZY_CHECK, str(out)],
            env={**os.environ, "CNNFEAT_LAZY_PYNNDESCENT": lazy},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"stand-in kept: {lazy == '1'}" in r.stdout, r.stdout
        assert "real on use: pynndescent.pynndescent_" in r.stdout, "anything that needs it gets the real class"
        maps[lazy] = np.load(out)
    assert np.array_equal(maps["1"], maps["0"]), "the same map with and without the stand-ins"


def test_a_split_too_small_for_the_default_probe_is_refused_before_training_or_mapped() -> None:
    """The default probe size shrinks to a small split; below what the map's 15 neighbours and 5-fold 5-NN need, the
    callback says so in check (it crashed inside topk at the first render); at that size it maps every image."""
    from cnnfeat.probe import probe_from_tensors

    model = SmallCNN().eval()
    g = torch.Generator().manual_seed(0)
    tiny = probe_from_tensors(torch.rand(6, 1, 28, 28, generator=g), torch.arange(6) % 3)
    with pytest.raises(
        ConfigError, match=r"probe_size=6 \(the test split \(6 images\)\) is too small .*need at least 16"
    ):
        EmbeddingCallback().prepare(model, tiny)
    four_each = probe_from_tensors(torch.rand(16, 1, 28, 28, generator=g), torch.arange(16) % 4)
    with pytest.raises(ConfigError, match=r"no class has 5 of the 16 probe images \(at most 4\)"):
        EmbeddingCallback().prepare(model, four_each)
    small = probe_from_tensors(torch.rand(16, 1, 28, 28, generator=g), torch.arange(16) % 3)
    cb = EmbeddingCallback()
    with inference(model):
        cb.prepare(model, small)
        pictures = cb.render(model, small, 0)
    assert cb.embeddings[0].shape == (16, 2) and "umap/features" in pictures.images
    assert all(np.isfinite(v) for v in pictures.scalars.values())
