"""Per-epoch UMAP maps of the last-layer feature vectors, aligned across epochs, with cluster-quality numbers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from typing_extensions import override

from cnnfeat import embedding, viz
from cnnfeat.callbacks.base import (
    Pictures,
    VisualizationCallback,
    class_names,
    model_inputs,
    probe_images,
    split_size,
    tensorboard_writer,
)

log = logging.getLogger("cnnfeat")


class EmbeddingCallback(VisualizationCallback):
    """Maps ``pl_module.features(x)`` of a fixed, stratified probe set to 2-D with UMAP, every N epochs.

    * ``umap/features``: the map coloured by class (step 0 = untrained network, then epochs trained).
      Each map after the first starts from the previous one and is rotated onto it, and all frames share
      fixed axes, so consecutive frames are comparable (see ``cnnfeat.embedding``).
    * ``umap/pixels``: the same probe images as raw pixels (784-d), once per run, as the baseline.
    * Scalars ``umap/knn_acc`` (k-NN accuracy on the features), ``umap/knn_acc_2d`` (on the map),
      ``umap/trustworthiness`` and ``umap/silhouette``, and the same under ``umap/pixels/`` once.
    * At the end of fit: ``umap_embedding.gif`` in the run directory (pixels beside every epoch) and the
      final features in TensorBoard's Projector tab with class labels and image thumbnails.

    ``deterministic=True`` (default) gives the same maps for the same seed; it runs UMAP single-threaded,
    which on a 2-core CPU is ~1.3x slower than ``deterministic=False``. The probe set, the maps so far and
    the warm start are part of the callback's ``state_dict``, so a resumed run continues its trajectory.
    """

    rank_zero_render = True  # UMAP needs no other process; under DDP only rank 0 fits the maps

    def __init__(
        self,
        probe_size: int = 2000,
        split: str = "test",
        n_neighbors: int = 15,
        min_dist: float = 0.1,
        warm_start: bool = True,
        full_epochs: int = 200,
        warm_epochs: int = 50,
        deterministic: bool = True,
        seed: int = 0,
        knn_k: int = 5,
        cv_folds: int = 5,
        pixels: bool = True,
        gif: bool = True,
        gif_frame_ms: int = 700,
        projector: bool = True,
        panel_size: int = 400,
        axis_limit: float = 2.2,
        batch_size: int = 256,
        every_n_epochs: int = 1,
        log_untrained: bool = True,
        save_png: bool = False,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, log_untrained=log_untrained, save_png=save_png)
        if probe_size < max(n_neighbors + 1, cv_folds * (knn_k + 1)):
            raise ValueError(
                f"probe_size={probe_size} is too small for n_neighbors={n_neighbors} and "
                f"{cv_folds}-fold {knn_k}-NN (need at least {max(n_neighbors + 1, cv_folds * (knn_k + 1))})"
            )
        if min(full_epochs, warm_epochs, batch_size, panel_size) < 1 or axis_limit <= 0:
            raise ValueError("full_epochs, warm_epochs, batch_size, panel_size and axis_limit must be positive")
        self.probe_size, self.split, self.seed = probe_size, split, seed
        self.n_neighbors, self.min_dist = n_neighbors, min_dist
        self.warm_start, self.full_epochs, self.warm_epochs = warm_start, full_epochs, warm_epochs
        self.deterministic, self.knn_k, self.cv_folds = deterministic, knn_k, cv_folds
        self.pixels, self.gif, self.gif_frame_ms, self.projector = pixels, gif, gif_frame_ms, projector
        self.panel_size, self.axis_limit, self.batch_size = panel_size, axis_limit, batch_size
        self.probe_ids: torch.Tensor | None = None
        self.embeddings: dict[int, np.ndarray] = {}  # step -> normalised, aligned (N, 2) map
        self.pixel_embedding: np.ndarray | None = None
        self.quality: dict[int, embedding.ClusterQuality] = {}
        self._last_features: np.ndarray | None = None

    # -- validation and probe set --------------------------------------------------------------------
    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not callable(getattr(pl_module, "features", None)):
            raise ValueError(
                f"{type(self).__name__} needs {type(pl_module).__name__}.features(x) -> (N, D), the "
                "last-layer feature vector; add that method to the module"
            )
        self.check_probe_size(trainer, self.split, self.probe_size)

    def should_render(self, trainer: pl.Trainer) -> bool:
        return True  # scalars go to any logger, the GIF to the run directory

    def _probe(self, datamodule: pl.LightningDataModule) -> tuple[torch.Tensor, torch.Tensor]:
        if self.probe_ids is None:
            _, labels = probe_images(datamodule, self.split, range(split_size(datamodule, self.split)))
            self.probe_ids = embedding.stratified_ids(labels, self.probe_size, self.seed)
        return probe_images(datamodule, self.split, self.probe_ids)

    def features(self, pl_module: pl.LightningModule, x: torch.Tensor) -> np.ndarray:
        """``pl_module.features`` of the probe inputs, batched, as float32 numpy (N, D)."""
        out = [
            pl_module.features(x[i : i + self.batch_size].to(pl_module.device)).float().cpu()
            for i in range(0, len(x), self.batch_size)
        ]
        return torch.cat(out).flatten(1).numpy()

    # -- maps ----------------------------------------------------------------------------------------
    def _fit(self, x: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        warm = previous is not None and self.warm_start
        emb = embedding.fit_umap(
            x,
            self.n_neighbors,
            self.min_dist,
            init=previous if warm else "spectral",
            n_epochs=self.warm_epochs if warm else self.full_epochs,
            random_state=self.seed if self.deterministic else None,
        )
        return embedding.normalize(emb, reference=previous)

    def _panel(
        self, emb: np.ndarray, labels: np.ndarray, names: list[str], title: str, legend: bool = True
    ) -> torch.Tensor:
        return viz.scatter_panel(emb, labels, names, title, size=self.panel_size, limit=self.axis_limit, legend=legend)

    @staticmethod
    def _title(step: int) -> str:
        return "features, untrained network" if step == 0 else f"features after epoch {step}"

    def render(
        self, pl_module: pl.LightningModule, datamodule: pl.LightningDataModule | None, step: int = 0
    ) -> Pictures:
        x, y = self._probe(datamodule)
        labels = y.numpy()
        names = class_names(datamodule, int(labels.max()) + 1)
        pictures = Pictures()
        if self.pixels and self.pixel_embedding is None:
            raw = x.flatten(1).numpy()
            self.pixel_embedding = self._fit(raw, None)
            q = embedding.cluster_quality(raw, self.pixel_embedding, labels, self.knn_k, self.cv_folds)
            pictures.scalars.update(q.as_dict("umap/pixels/"))
            pictures.images["umap/pixels"] = self._panel(self.pixel_embedding, labels, names, "raw pixels (784-d)")
        feats = self.features(pl_module, model_inputs(datamodule, self.split, self.probe_ids))
        previous = self.embeddings[max(self.embeddings)] if self.embeddings else None
        emb = self._fit(feats, previous)
        self.embeddings[step], self._last_features = emb, feats
        q = embedding.cluster_quality(feats, emb, labels, self.knn_k, self.cv_folds)
        self.quality[step] = q
        pictures.scalars.update(q.as_dict())
        if previous is not None:
            pictures.scalars["umap/frame_shift"] = embedding.frame_shift(previous, emb)
        pictures.images["umap/features"] = self._panel(emb, labels, names, self._title(step))
        return pictures

    # -- end of fit: animation and projector ---------------------------------------------------------
    def animation_frames(self, datamodule: pl.LightningDataModule) -> list[torch.Tensor]:
        """One image per stored map: the raw-pixel map (if any) beside the feature map of that step."""
        _, y = self._probe(datamodule)
        labels = y.numpy()
        names = class_names(datamodule, int(labels.max()) + 1)
        left = (
            []
            if self.pixel_embedding is None
            else [self._panel(self.pixel_embedding, labels, names, "raw pixels (784-d)", legend=False)]
        )
        return [
            viz.hstack([*left, self._panel(self.embeddings[s], labels, names, self._title(s))])
            for s in sorted(self.embeddings)
        ]

    def write_gif(self, datamodule: pl.LightningDataModule, path: Path) -> Path | None:
        frames = self.animation_frames(datamodule)
        if not frames:
            return None
        images = [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for f in frames]
        path.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(path, save_all=True, append_images=images[1:], duration=self.gif_frame_ms, loop=0)
        return path

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast under DDP: all ranks ask
        if not trainer.is_global_zero or not self.embeddings:
            return
        if self.gif:
            path = self.write_gif(trainer.datamodule, run_dir / "umap_embedding.gif")
            log.info("UMAP animation: %s", path)
        writer = tensorboard_writer(trainer)
        if self.projector and writer is not None and self._last_features is not None:
            x, y = self._probe(trainer.datamodule)
            names = class_names(trainer.datamodule, int(y.max()) + 1)
            writer.add_embedding(
                torch.from_numpy(self._last_features),
                metadata=[names[i] for i in y.tolist()],
                label_img=x,
                global_step=max(self.embeddings),
                tag="umap/features",
            )

    # -- checkpointing -------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict:
        return {
            "probe_ids": self.probe_ids,
            "steps": sorted(self.embeddings),
            "embeddings": [torch.from_numpy(self.embeddings[s]) for s in sorted(self.embeddings)],
            "pixel_embedding": None if self.pixel_embedding is None else torch.from_numpy(self.pixel_embedding),
        }

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.probe_ids = state_dict.get("probe_ids")
        self.embeddings = {
            int(s): e.numpy()
            for s, e in zip(state_dict.get("steps", []), state_dict.get("embeddings", []), strict=True)
        }
        pix = state_dict.get("pixel_embedding")
        self.pixel_embedding = None if pix is None else pix.numpy()
