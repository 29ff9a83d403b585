"""Per-epoch UMAP maps of feature vectors (``features()`` or any node), aligned across epochs, with cluster numbers."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from typing_extensions import override

from cnnfeat import embedding, tags, viz
from cnnfeat.callbacks.base import (
    DEFAULT_PROBE_SIZE,
    CallbackOptions,
    Pictures,
    VisualizationCallback,
    check_bool,
    check_number,
    device_of,
    follows_recorded,
    inference,
    nonfinite_rows,
    tensorboard_writer,
)
from cnnfeat.errors import ConfigError, check_int
from cnnfeat.graph import capture
from cnnfeat.probe import ProbeSet, batches
from cnnfeat.probe_pass import PassBatch, PassRequest
from cnnfeat.run import lightning_api as pl

log = logging.getLogger("cnnfeat")


def _pixel_title(probe: ProbeSet) -> str:
    return f"raw pixels ({probe.images[0].numel()}-d)"


class EmbeddingCallback(VisualizationCallback):
    """Maps feature vectors of a fixed, stratified probe set to 2-D with UMAP, every N epochs.

    The vectors are ``pl_module.features(x)`` by default (cnnfeat's models have it; for a DataModule whose
    batches are cached frozen-backbone features, those are passed), or, with ``layer=``, the output of any graph
    node (``fc1``, ``relu:2``, ``avgpool``), flattened to (N, D). A module with neither is refused before
    training by an error listing the node names.

    * ``umap/features``: the map coloured by class (step 0 = untrained network, then epochs trained).
      Each map after the first starts from the previous one, each point anchored to its old place as strongly as
      its feature-space neighbourhood stayed the same (``cnnfeat.embedding.fit_aligned``), and is rotated onto it;
      all frames share fixed axes, so points move where the network changed them and stay where it did not.
    * ``umap/pixels``: the same probe images as raw pixels (e.g. 784-d), once per run, as the baseline.
    * Scalars ``umap/knn_acc`` (k-NN accuracy on the features), ``umap/knn_acc_2d`` (on the map),
      ``umap/trustworthiness`` and ``umap/silhouette``, and the same under ``umap/pixels/`` once; ``umap/frame_shift``
      (how far points moved since the previous epoch's map) only when the previous epoch was mapped.
    * At the end of fit: ``umap_embedding.gif`` in the run directory (pixels beside every epoch) and the
      final features in TensorBoard's Projector tab with class labels and image thumbnails.

    ``deterministic=True`` (default) gives the same maps for the same seed; it runs UMAP single-threaded,
    which on a 2-core CPU is ~1.3x slower than ``deterministic=False``. The probe set, the maps so far and
    the warm start are part of the callback's ``state_dict``, so a resumed run continues its trajectory.
    The stratified probe is drawn from the probe's labels (the split's first ``cnnfeat.probe.MAX_IMAGES``).
    Feature vectors holding NaN or infinity get no map at that step (a warning names the layer).

    The vectors come from the shared probe pass (``cnnfeat.probe_pass``: one forward pass per step for the dead-ReLU,
    representation, atlas and UMAP callbacks, over the same stratified images): ``layer``'s output, or for
    ``features()`` the input of the network's last Linear layer, checked in ``setup`` to equal ``features(x)``
    bit for bit. Where it does not (a ``features`` that is not the head's input), and for a DataModule whose
    batches are cached backbone features, the callback calls ``features`` itself and says so once.
    """

    uses_probe_pass = True

    def __init__(
        self,
        probe_size: int = DEFAULT_PROBE_SIZE,
        split: str = "test",
        layer: str | None = None,
        n_neighbors: int = 15,
        min_dist: float = 0.1,
        warm_start: bool = True,
        full_epochs: int = 200,
        warm_epochs: int = 100,
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
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            CallbackOptions(
                every_n_epochs=every_n_epochs,
                log_untrained=log_untrained,
                save_png=save_png,
                during_training=True,
                split=split,
                mean=mean,
                std=std,
                class_names=class_names,
            )
        )
        for name, value, minimum in (
            ("probe_size", probe_size, 1),
            ("n_neighbors", n_neighbors, 2),
            ("knn_k", knn_k, 1),
            ("cv_folds", cv_folds, 2),
            ("full_epochs", full_epochs, 1),
            ("warm_epochs", warm_epochs, 1),
            ("gif_frame_ms", gif_frame_ms, 1),
            ("panel_size", panel_size, 1),
            ("batch_size", batch_size, 1),
            ("seed", seed, 0),
        ):
            check_int(name, value, minimum)
        check_number("min_dist", min_dist, 0)
        check_number("axis_limit", axis_limit, 0, above=True)
        for name, flag in (
            ("warm_start", warm_start),
            ("deterministic", deterministic),
            ("pixels", pixels),
            ("gif", gif),
            ("projector", projector),
        ):
            check_bool(name, flag)
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ConfigError(f"layer must be a node name or null, got {layer!r}")
        self._check_size(probe_size, n_neighbors, knn_k, cv_folds, "")
        self.probe_size, self.layer, self.seed = probe_size, layer, seed
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
        #: where the pass finds the vectors, set in ``check``: (node, "input" or "output"), or None: ``features()``
        self.source: tuple[str, str] | None = None

    @staticmethod
    def _check_size(size: int, n_neighbors: int, knn_k: int, cv_folds: int, where: str) -> None:
        """Refuse a probe too small for the map's neighbours and for k-NN across folds (the largest fold must leave
        ``knn_k`` neighbours in the others)."""
        need = next(n for n in range(n_neighbors + 1, 10**9) if n - math.ceil(n / cv_folds) >= knn_k and n >= cv_folds)
        if size < need:
            raise ConfigError(
                f"probe_size={size}{where} is too small for n_neighbors={n_neighbors} and {cv_folds}-fold {knn_k}-NN "
                f"(need at least {need}): lower them, or leave the UMAP out (~callbacks.umap)"
            )

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(split=self.split, layer=self.layer, probe_size=self.probe_size)

    # -- validation and probe set --------------------------------------------------------------------
    def check(self, pl_module: nn.Module, probe: ProbeSet | None) -> None:
        assert probe is not None
        self.probe_size = self.fit_probe_size(probe, self.probe_size, DEFAULT_PROBE_SIZE)
        self._check_size(self.probe_size, self.n_neighbors, self.knn_k, self.cv_folds, f" ({probe.describe()})")
        largest = int(torch.bincount(probe.labels[self.positions(probe)]).max())
        if largest < self.cv_folds:  # scikit-learn's stratified folds need one class that fills every fold
            raise ConfigError(
                f"no class has {self.cv_folds} of the {self.probe_size} probe images (at most {largest}), which "
                f"cv_folds={self.cv_folds} needs for the k-NN accuracy: lower cv_folds, or leave the UMAP out "
                "(~callbacks.umap)"
            )
        plan = self.layer_plan(pl_module)
        if self.layer is not None:
            plan.resolve([self.layer])  # an unknown name lists the valid ones
            self.source = (self.layer, "output")
        elif not callable(getattr(pl_module, "features", None)):
            raise ConfigError(
                f"{type(self).__name__} needs {type(pl_module).__name__}.features(x) -> (N, D) or a node to embed: "
                f"name one with layer=..., e.g. the penultimate layer; valid names: {list(plan.layers)}"
            )
        else:
            self.source = self._features_node(pl_module, probe)

    def _features_node(self, pl_module: nn.Module, probe: ProbeSet) -> tuple[str, str] | None:
        """The last Linear layer's input when it is ``features(x)`` bit for bit on probe images, else None (and why)."""
        linears = self.layer_plan(pl_module).of_kind("linear")
        why = ""
        if probe.batch_inputs is not None:
            why = "the DataModule's batches are cached backbone features, which the forward pass does not produce"
        elif not linears:
            why = "the network has no Linear layer whose input features() could be"
        else:
            x = probe.inputs[:8].to(device_of(pl_module))
            with inference(pl_module), capture(pl_module, linears[-1:], inputs=True) as got:
                want = pl_module.features(x)
                pl_module(x)
            head_in = got[linears[-1]]
            if head_in.shape[0] != want.shape[0] or not torch.equal(head_in.flatten(1), want.flatten(1)):
                why = f"features(x) is not the input of the last Linear layer {linears[-1]!r}"
        if why:
            log.info("%s: calls features() itself (not the shared probe pass): %s", type(self).__name__, why)
            return None
        return linears[-1], "input"

    def should_render(self, writer: object) -> bool:
        return True  # scalars go to any logger, the GIF to the run directory

    def positions(self, probe: ProbeSet) -> torch.Tensor:
        """Positions in ``probe`` of the stratified sample (drawn once, then kept: ``probe_ids`` are dataset IDs)."""
        if self.probe_ids is None:
            self.probe_ids = probe.ids[embedding.stratified_ids(probe.labels, self.probe_size, self.seed)]
        return probe.positions(self.probe_ids)

    def features(self, pl_module: nn.Module, probe: ProbeSet, positions: torch.Tensor) -> np.ndarray:
        """The vectors to map for probe ``positions``, batched, as float32 numpy (N, D), from a forward pass of its
        own (``render`` reads the shared pass instead where ``source`` is set)."""
        device, out = device_of(pl_module), []
        if self.layer is None:
            source = probe.batch_inputs if probe.batch_inputs is not None else probe.inputs
            for b in batches(positions, self.batch_size):
                out.append(pl_module.features(source[b].to(device)).float().cpu())
        else:
            with capture(pl_module, [self.layer]) as captured:
                for b in batches(positions, self.batch_size):
                    pl_module(probe.inputs[b].to(device))
                    out.append(captured[self.layer].float().cpu())
        return torch.cat(out).flatten(1).numpy()

    def pass_request(self, model: nn.Module, probe: ProbeSet, step: int) -> PassRequest | None:
        """The vectors' node on this callback's stratified selection (``cnnfeat.probe_pass``)."""
        if self.source is None:
            return None
        node, where = self.source
        acc = _Vectors(node, where)
        return PassRequest(self.positions(probe), self.batch_size, acc, **{f"{where}s": [node]})

    def _vectors(self, pl_module: nn.Module, probe: ProbeSet, positions: torch.Tensor, step: int) -> np.ndarray:
        if self.source is None:
            return self.features(pl_module, probe, positions)
        result = self.pass_result(pl_module, probe, step)
        assert result is not None and torch.equal(result.ids, probe.ids[positions])
        return result.accumulator.finish()

    # -- maps ----------------------------------------------------------------------------------------
    def _fit(self, x: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        """The first map: a full UMAP fit. Each later one (``warm_start``): ``cnnfeat.embedding.fit_aligned``, started
        from the previous map, each point pulled back toward its old place as strongly as its neighbourhood in the
        features stayed the same (so points move where the network changed them, and stay where it did not)."""
        seed = self.seed if self.deterministic else None
        if previous is not None and self.warm_start:
            return embedding.fit_aligned(
                x, previous, self._last_features, self.n_neighbors, self.min_dist, self.warm_epochs, seed
            )
        emb = embedding.fit_umap(x, self.n_neighbors, self.min_dist, n_epochs=self.full_epochs, random_state=seed)
        return embedding.normalize(emb, reference=previous)

    def _panel(
        self, emb: np.ndarray, labels: np.ndarray, names: list[str], title: str, legend: bool = True
    ) -> torch.Tensor:
        return viz.scatter_panel(emb, labels, names, title, size=self.panel_size, limit=self.axis_limit, legend=legend)

    @staticmethod
    def _title(step: int) -> str:
        return "features, untrained network" if step == 0 else f"features after epoch {step}"

    def render(self, pl_module: nn.Module, probe: ProbeSet | None, step: int = 0) -> Pictures:
        assert probe is not None
        positions = self.positions(probe)
        labels = probe.labels[positions].numpy()
        names = list(probe.class_names)
        pictures = Pictures()
        if self.pixels and self.pixel_embedding is None:
            raw = probe.images[positions].flatten(1).numpy()
            self.pixel_embedding = self._fit(raw, None)
            q = embedding.cluster_quality(raw, self.pixel_embedding, labels, self.knn_k, self.cv_folds)
            pictures.scalars.update(q.as_dict(tags.UMAP_PIXEL_QUALITY.prefix))
            panel = self._panel(self.pixel_embedding, labels, names, _pixel_title(probe))
            pictures.images[tags.UMAP_PIXELS.name] = panel
        feats = self._vectors(pl_module, probe, positions, step)
        bad = int(nonfinite_rows(torch.from_numpy(feats)).sum())
        if bad:  # no map of NaN: this step is left out of the trajectory
            self.skip_nonfinite(
                self.layer or "features()", "features", bad, len(feats), "probe images", "umap/features", step
            )
            return pictures
        before = max(self.embeddings, default=None)  # the map this one starts from and is aligned to
        previous = self.embeddings[before] if before is not None else None
        emb = self._fit(feats, previous)
        self.embeddings[step], self._last_features = emb, feats
        q = embedding.cluster_quality(feats, emb, labels, self.knn_k, self.cv_folds)
        self.quality[step] = q
        pictures.scalars.update(q.as_dict(tags.UMAP_QUALITY.prefix))
        if before is not None and follows_recorded(step, [before]):  # the previous epoch's map, not across a gap
            pictures.scalars[tags.UMAP_FRAME_SHIFT.name] = embedding.frame_shift(previous, emb)
        pictures.images[tags.UMAP_FEATURES.name] = self._panel(emb, labels, names, self._title(step))
        return pictures

    # -- end of fit: animation and projector ---------------------------------------------------------
    def animation_frames(self, probe: ProbeSet) -> list[torch.Tensor]:
        """One image per stored map: the raw-pixel map (if any) beside the feature map of that step."""
        labels = probe.labels[self.positions(probe)].numpy()
        names = list(probe.class_names)
        left = (
            []
            if self.pixel_embedding is None
            else [self._panel(self.pixel_embedding, labels, names, _pixel_title(probe), legend=False)]
        )
        return [
            viz.hstack([*left, self._panel(self.embeddings[s], labels, names, self._title(s))])
            for s in sorted(self.embeddings)
        ]

    def write_gif(self, probe: ProbeSet, path: Path) -> Path | None:
        """The animation of every stored map as a GIF at ``path`` (``None`` when there is none yet)."""
        frames = self.animation_frames(probe)
        if not frames:
            return None
        images = [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for f in frames]
        path.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(path, save_all=True, append_images=images[1:], duration=self.gif_frame_ms, loop=0)
        return path

    @override
    def finish(self, out_dir: Path | None) -> dict[int, Pictures]:
        """``umap_embedding.gif`` in ``out_dir``: the raw-pixel map beside every stored feature map."""
        if self.gif and out_dir is not None and self.embeddings and self.probe is not None:
            log.info("UMAP animation: %s", self.write_gif(self.probe, out_dir / "umap_embedding.gif"))
        return {}

    @override
    def end_of_fit(self, trainer: pl.Trainer) -> None:
        """The last map's feature vectors in TensorBoard's Projector tab (after ``finish``'s GIF)."""
        if not self.embeddings or self.probe is None:
            return
        writer = tensorboard_writer(trainer)
        if self.projector and writer is not None and self._last_features is not None:
            positions = self.positions(self.probe)
            writer.add_embedding(
                torch.from_numpy(self._last_features),
                metadata=[self.probe.class_name(i) for i in self.probe.labels[positions].tolist()],
                label_img=self.probe.images[positions],
                global_step=max(self.embeddings),
                tag=tags.UMAP_FEATURES.name,
            )

    # -- checkpointing -------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict:
        return {
            "probe_ids": self.probe_ids,
            "steps": sorted(self.embeddings),
            "embeddings": [torch.from_numpy(self.embeddings[s]) for s in sorted(self.embeddings)],
            "pixel_embedding": None if self.pixel_embedding is None else torch.from_numpy(self.pixel_embedding),
            # the last map's vectors: the next map's anchors compare neighbourhoods in them (fit_aligned)
            "last_features": None if self._last_features is None else torch.from_numpy(self._last_features),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the probe and the maps so far; a state from another probe size is ignored with a warning."""
        ids = state_dict.get("probe_ids")
        steps, maps = list(state_dict.get("steps", [])), list(state_dict.get("embeddings", []))
        if ids is not None and (len(ids) != self.probe_size or len(steps) != len(maps)):
            self.warn_once(
                "state", f"the saved state holds {len(ids)} probe images, not probe_size={self.probe_size}: ignored"
            )
            return
        self.probe_ids = ids
        self.embeddings = {int(s): e.numpy() for s, e in zip(steps, maps, strict=True)}
        pix = state_dict.get("pixel_embedding")
        self.pixel_embedding = None if pix is None else pix.numpy()
        last = state_dict.get("last_features")
        self._last_features = None if last is None or len(last) != self.probe_size else last.numpy()


class _Vectors:
    """One node's input or output rows over the pass, flattened to float32 (N, D)."""

    def __init__(self, node: str, where: str) -> None:
        self.node, self.where, self.rows = node, where, []

    def update(self, batch: PassBatch) -> None:
        tensors = batch.inputs if self.where == "input" else batch.outputs
        self.rows.append(tensors[self.node].float().cpu())

    def finish(self) -> np.ndarray:
        return torch.cat(self.rows).flatten(1).numpy()
