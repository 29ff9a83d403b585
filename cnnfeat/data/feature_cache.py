"""Frozen-backbone features computed once and kept on disk, so a transfer head trains without the backbone.

``FrozenFeatureDataModule`` wraps a ``FashionMNISTDataModule``: ``prepare_data`` runs every image of each split
through the frozen backbone it is given (a ``FrozenBackbone``, or a factory that makes one on first use: Hydra's
``_partial_`` node ``data.backbone``, which builds ``cnnfeat.models.FrozenAlexNet`` for ``experiment=transfer`` and
``cnnfeat.models.FrozenTorchvision``, any torchvision network up to its head, for ``experiment=transfer_torchvision``)
once (batched; a progress bar on a terminal, rate/ETA log lines elsewhere) and stores the (N, D) outputs as float16
under ``<cache_dir>/features/<name>-<fingerprint>/``, where the fingerprint hashes the backbone's weights and the
preprocessing; training then reads those vectors. The train/val/test split and the image IDs are the wrapped
datamodule's; its probe (``probe_set``) holds the images as pictures and model inputs and the cached vectors as
``batch_inputs``. Data never imports models: the backbone class lives with the models, and ``experiment=transfer``
gives the model and this DataModule their backbone values from one config node.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cnnfeat.data.fashion_mnist import FashionMNISTDataModule, keep_batch, to_float, write_cache
from cnnfeat.errors import ConfigError, DataError, check_int
from cnnfeat.probe import ProbeSet, ProbeSpec
from cnnfeat.run import lightning_api as pl
from cnnfeat.run.progress import task_progress

log = logging.getLogger("cnnfeat")


def _complete(path: Path) -> bool:
    """Whether a cache file exists and its zip directory (written last by ``torch.save``) is intact."""
    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
        return True
    except (OSError, zipfile.BadZipFile):
        log.warning("The frozen-feature cache %s is incomplete; rebuilding it", path)
        path.unlink(missing_ok=True)
        return False


@runtime_checkable
class FrozenBackbone(Protocol):
    """What the cache needs of a frozen backbone (an ``nn.Module``; the models provide ``FrozenAlexNet`` and
    ``FrozenTorchvision``, and any module with these members works).

    Called on images (N,1,H,W) in [0, 1] it returns their feature vectors (N, D); ``fingerprint()`` hashes its weights
    and preprocessing (the cache key); ``name`` names its cache folder (lower-cased) and its log lines.
    """

    name: str

    def fingerprint(self) -> str: ...

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def _is_backbone(value: Any) -> bool:
    return isinstance(value, nn.Module) and isinstance(value, FrozenBackbone)


def _images_datamodule(**kwargs: Any) -> FashionMNISTDataModule:
    """The wrapped images' DataModule, built outside ``FrozenFeatureDataModule.__init__`` so that its
    ``save_hyperparameters`` records its own arguments, not the backbone module it would find up the call stack."""
    return FashionMNISTDataModule(**kwargs)


class FeatureDataset(Dataset):
    """Rows of a feature matrix (N, D) with labels; batches are one indexing op."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> None:
        self.features, self.labels, self.rows = features, labels, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[self.rows[i]], self.labels[self.rows[i]]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.rows[torch.as_tensor(indices)]
        return self.features[r], self.labels[r]


class FrozenFeatureDataModule(pl.LightningDataModule):
    """Cached frozen-backbone features of Fashion-MNIST (see the module docstring).

    ``backbone``: the frozen backbone whose outputs are cached (a ``FrozenBackbone``), or a function of no arguments
    that builds it on first use (``conf/data/alexnet_features.yaml``'s ``backbone`` node, ``_partial_: true``). It
    must be the model's frozen part (``experiment=transfer`` and ``experiment=transfer_torchvision`` give both their
    values from one ``backbone`` node; the
    picture callbacks' probe refuses a model whose own forward disagrees with the cached vectors).
    The data arguments are ``FashionMNISTDataModule``'s (same names as ``conf/data/fashion_mnist.yaml``).
    ``max_images`` caps each split (the first N images) for quick runs and tests. ``device``: where the
    extraction runs (``auto``: CUDA when available).
    """

    def __init__(
        self,
        backbone: nn.Module | Callable[[], nn.Module],
        data_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        val_on_test: bool = False,
        split_seed: int = 0,
        download: bool = True,
        verify: bool = True,
        extract_batch_size: int = 128,
        max_images: int | None = None,
        device: str = "auto",
    ) -> None:
        super().__init__()
        check_int("data.max_images", max_images, allow_none=True)
        check_int("data.extract_batch_size", extract_batch_size)
        given = _is_backbone(backbone)
        if not (given or (callable(backbone) and not isinstance(backbone, nn.Module))):
            raise ConfigError(
                f"data.backbone must be a frozen backbone (an nn.Module with a name and fingerprint(), e.g. "
                "cnnfeat.models.FrozenAlexNet or cnnfeat.models.FrozenTorchvision) or a function that builds one, got "
                f"{type(backbone).__name__}"
            )
        images = _images_datamodule(
            data_dir=data_dir,
            cache_dir=cache_dir,
            val_size=val_size,
            val_on_test=val_on_test,
            split_seed=split_seed,
            download=download,
            verify=verify,
        )
        self.images_dm = images
        self._backbone: nn.Module | None = backbone if given else None
        self._make_backbone = None if given else backbone
        self.cache_root = images.cache_dir
        self.batch_size, self.eval_batch_size, self.extract_batch_size = batch_size, eval_batch_size, extract_batch_size
        self.max_images, self.device = max_images, device
        self.classes = images.classes
        self._fingerprint: str | None = None
        self._data: dict[str, FeatureDataset] = {}

    # -- the backbone and its cache key --------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        """The frozen backbone whose outputs are cached (built on first use when given as a factory)."""
        if self._backbone is None:
            assert self._make_backbone is not None
            made = self._make_backbone()
            if not _is_backbone(made):
                raise ConfigError(
                    f"data.backbone built a {type(made).__name__}, not a frozen backbone (an nn.Module with a name "
                    "and fingerprint())"
                )
            self._backbone = made
        return self._backbone

    @property
    def fingerprint(self) -> str:
        """Hash of the backbone's weights and the preprocessing: the cache key."""
        if self._fingerprint is None:
            self._fingerprint = self.backbone.fingerprint()
        return self._fingerprint

    def cache_file(self, split: str) -> Path:
        n = "all" if self.max_images is None else f"first{self.max_images}"
        folder = f"{self.backbone.name.lower()}-{self.fingerprint}"
        return self.cache_root / "features" / folder / f"{split}-{n}.pt"

    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    # -- Lightning hooks -----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Make sure the images are there, then extract every split not yet in the cache."""
        self.images_dm.prepare_data()
        todo = [s for s in ("train", "test") if not _complete(self.cache_file(s))]
        if not todo:
            return
        self.images_dm.setup()
        device = self._device()
        name = self.backbone.name
        model = self.backbone.to(device)
        if device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)  # ~1.7x faster convolutions on CPU
        for split in todo:
            ds = self.images_dm.dataset(split)
            n = len(ds.images) if self.max_images is None else min(self.max_images, len(ds.images))
            feats: torch.Tensor | None = None  # (n, D), allocated once the first batch shows D
            start_time = time.perf_counter()
            what = f"{name} features, {split} ({device.type})"
            with task_progress(what, n, "images") as advance, torch.no_grad():
                for start in range(0, n, self.extract_batch_size):
                    x = ds.images[start : min(start + self.extract_batch_size, n)].unsqueeze(1).to(device)
                    out = model(x.float() / 255)
                    if out.ndim != 2 or len(out) != len(x):
                        raise ConfigError(
                            f"data.backbone ({name}) must turn {len(x)} images into ({len(x)}, D) feature vectors, "
                            f"got shape {tuple(out.shape)}"
                        )
                    if feats is None:
                        feats = torch.empty(n, out.shape[1], dtype=torch.float16)
                    feats[start : start + len(x)] = out.half().cpu()
                    advance(len(x))
            assert feats is not None  # n >= 1: max_images is at least 1 and the splits are not empty
            path = self.cache_file(split)
            write_cache(path, {"features": feats, "labels": ds.labels[:n].clone()}, "frozen-feature")
            seconds = time.perf_counter() - start_time
            log.info(
                "Cached %d-d %s features of %d %s images in %.0f s (%.0f images/s): %s",
                feats.shape[1],
                name,
                n,
                split,
                seconds,
                n / seconds,
                path,
            )
        model.to("cpu")

    def setup(self, stage: str | None = None) -> None:
        if self._data:
            return
        self.images_dm.setup(stage)
        cached = {s: self._load(s) for s in ("train", "test")}
        for split in ("train", "val", "test"):
            source = "test" if split == "test" or (split == "val" and self.images_dm.val_on_test) else "train"
            c = cached[source]
            rows = self.images_dm.dataset(split).image_ids
            rows = rows[rows < len(c["labels"])]  # max_images keeps only the first rows
            self._data[split] = FeatureDataset(c["features"], c["labels"], rows)

    def _load(self, split: str, retry: bool = True) -> dict[str, torch.Tensor]:
        """Read a split's cached features; an unreadable file is named, removed and rebuilt once."""
        path = self.cache_file(split)
        try:
            return torch.load(path, weights_only=True)
        except Exception as e:
            if not retry:
                raise DataError(f"The frozen-feature cache {path} cannot be read even after rebuilding it ({e})") from e
            log.warning("The frozen-feature cache %s cannot be read (%s); removing and rebuilding it", path, e)
            path.unlink(missing_ok=True)
            self.prepare_data()
            return self._load(split, retry=False)

    # -- data for training and for the picture callbacks ---------------------------------------------
    def dataset(self, split: str) -> FeatureDataset:
        return self._data[split]

    def images(
        self, split: str = "test", ids: Sequence[int] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images of the split (only the cached ones when ``max_images`` is set), for the picture callbacks."""
        ds, source = self.dataset(split), self.images_dm.dataset(split)
        ids = torch.arange(len(ds)) if ids is None else torch.as_tensor(ids, dtype=torch.long)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(ds)):
            raise IndexError(f"Image IDs must be in [0, {len(ds) - 1}] for the cached {split} split")
        rows = ds.rows[ids]  # positions -> rows of the source images, as the cached features are indexed
        return to_float(source.images[rows]), source.labels[rows]

    def inputs(self, split: str, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The model's cached inputs (backbone features, float32) for image IDs of a split."""
        x, _ = self.dataset(split).__getitems__(torch.as_tensor(ids).tolist())
        return x.float()

    def probe_set(self, spec: ProbeSpec) -> ProbeSet:
        """The picture callbacks' probe: images (the model's inputs too) and the cached vectors as batch inputs."""
        n = min(len(self.dataset(spec.split)), spec.max_images)
        ids = torch.arange(n)
        images, labels = self.images(spec.split, ids)
        return ProbeSet(
            images,
            images,
            labels,
            tuple(self.classes),
            ids,
            spec.split,
            len(self.dataset(spec.split)),
            batch_inputs=self.inputs(spec.split, ids),
        )

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=batch_size, shuffle=shuffle, collate_fn=keep_batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", self.eval_batch_size, False) if len(self.dataset("val")) else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, tuple | list) and len(batch) == 2 and batch[0].dtype == torch.float16:
            return batch[0].float(), batch[1]
        return batch
