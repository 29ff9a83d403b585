"""Frozen-backbone features computed once and kept on disk, so a transfer head trains without the backbone.

``FrozenFeatureDataModule`` wraps a ``FashionMNISTDataModule``: ``prepare_data`` runs every image of each split
through the frozen AlexNet part (``cnnfeat.models.alexnet.FrozenAlexNet``, built from ``weights``, ``backbone_seed``
and ``input_size``) once (batched; a progress bar on a terminal, rate/ETA log lines elsewhere) and stores the (N,
9216) outputs as float16 under ``<cache_dir>/features/<key>/``, where the key hashes the backbone's weights and the
preprocessing; training then reads those vectors. The train/val/test split and the image IDs are the wrapped
datamodule's; its probe (``probe_set``) holds the images as pictures and model inputs and the cached vectors as
``batch_inputs``. The module knows no model class: ``experiment=transfer`` gives the model and this DataModule their
backbone values from one config node.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cnnfeat import lightning_api as pl
from cnnfeat.data import FashionMNISTDataModule, keep_batch, to_float, write_cache
from cnnfeat.errors import DataError, check_int
from cnnfeat.models.alexnet import FrozenAlexNet
from cnnfeat.probe import ProbeSet, ProbeSpec
from cnnfeat.progress import task_progress

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
    """Cached frozen-AlexNet features of Fashion-MNIST (see the module docstring).

    The data arguments are ``FashionMNISTDataModule``'s (same names as ``conf/data/fashion_mnist.yaml``).
    ``weights``, ``backbone_seed`` and ``input_size`` build the frozen backbone; they must be the model's
    (``experiment=transfer`` takes both from its ``backbone`` node; the picture callbacks' probe refuses a
    model whose own forward disagrees with the cached vectors).
    ``max_images`` caps each split (the first N images) for quick runs and tests. ``device``: where the
    extraction runs (``auto``: CUDA when available).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        val_on_test: bool = False,
        split_seed: int = 0,
        download: bool = True,
        verify: bool = True,
        weights: str | None = "imagenet",
        backbone_seed: int = 0,
        input_size: int = 224,
        extract_batch_size: int = 128,
        max_images: int | None = None,
        device: str = "auto",
    ) -> None:
        super().__init__()
        check_int("data.max_images", max_images, allow_none=True)
        check_int("data.extract_batch_size", extract_batch_size)
        check_int("data.input_size", input_size)
        images = FashionMNISTDataModule(
            data_dir=data_dir,
            cache_dir=cache_dir,
            val_size=val_size,
            val_on_test=val_on_test,
            split_seed=split_seed,
            download=download,
            verify=verify,
        )
        self.images_dm = images
        self.weights, self.backbone_seed, self.input_size = weights, backbone_seed, input_size
        self.cache_root = images.cache_dir
        self.batch_size, self.eval_batch_size, self.extract_batch_size = batch_size, eval_batch_size, extract_batch_size
        self.max_images, self.device = max_images, device
        self.classes = images.classes
        self._extractor: FrozenAlexNet | None = None
        self._fingerprint: str | None = None
        self._data: dict[str, FeatureDataset] = {}

    # -- the backbone and its cache key --------------------------------------------------------------
    @property
    def extractor(self) -> FrozenAlexNet:
        """The frozen backbone whose outputs are cached (built on first use)."""
        if self._extractor is None:
            self._extractor = FrozenAlexNet(self.weights, self.backbone_seed, self.input_size)
        return self._extractor

    @property
    def fingerprint(self) -> str:
        """Hash of the backbone's weights and the preprocessing: the cache key."""
        if self._fingerprint is None:
            self._fingerprint = self.extractor.fingerprint()
        return self._fingerprint

    def cache_file(self, split: str) -> Path:
        n = "all" if self.max_images is None else f"first{self.max_images}"
        return self.cache_root / "features" / f"alexnet-{self.fingerprint}" / f"{split}-{n}.pt"

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
        model = self.extractor.to(device)
        if device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)  # ~1.7x faster convolutions on CPU
        for split in todo:
            ds = self.images_dm.dataset(split)
            n = len(ds.images) if self.max_images is None else min(self.max_images, len(ds.images))
            feats = torch.empty(n, 256 * 6 * 6, dtype=torch.float16)
            start_time = time.perf_counter()
            what = f"AlexNet features, {split} ({device.type})"
            with task_progress(what, n, "images") as advance, torch.no_grad():
                for start in range(0, n, self.extract_batch_size):
                    x = ds.images[start : min(start + self.extract_batch_size, n)].unsqueeze(1).to(device)
                    feats[start : start + len(x)] = model(x.float() / 255).half().cpu()
                    advance(len(x))
            path = self.cache_file(split)
            write_cache(path, {"features": feats, "labels": ds.labels[:n].clone()}, "frozen-feature")
            seconds = time.perf_counter() - start_time
            log.info(
                "Cached %d-d AlexNet features of %d %s images in %.0f s (%.0f images/s): %s",
                feats.shape[1],
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
