"""Fashion-MNIST held in memory as uint8 tensors, behind a LightningDataModule.

The four IDX files are looked up in ``data_dir`` (config ``data.data_dir``, else ``$CNNFEAT_DATA``), as
torchvision's gzip files, Debian's re-gzipped copies or plain IDX files, and checked by the MD5 of their
*decoded* bytes (the same for all three). They are decoded once into a writable cache, so the data
directory itself is never written to; when they are absent they are downloaded into the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torchvision.datasets import FashionMNIST

from cnnfeat.data.common import (
    ENV_CACHE,
    ENV_DATA,
    IDX_STEMS,
    SPLITS,
    ImageDataModule,
    TensorImageDataset,
    check_cache_dir,
    check_data_dir,
    decompress,
    default_cache_dir,
    download,
    fingerprint,
    is_int,
    keep_batch,
    missing_message,
    parse_idx,
    read_cache,
    resolve_dirs,
    seeded_split,
    to_float,
    write_cache,
)
from cnnfeat.errors import ConfigError, DataError, check_bool

__all__ = [
    "CLASSES",
    "ENV_CACHE",
    "ENV_DATA",
    "IMAGE_SIZE",
    "SPLITS",
    "DataError",
    "FashionMNISTDataModule",
    "TensorImageDataset",
    "check_cache_dir",
    "default_cache_dir",
    "find_source_file",
    "keep_batch",
    "read_idx",
    "to_float",
    "write_cache",
]

log = logging.getLogger(__name__)

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES: tuple[str, ...] = tuple(FashionMNIST.classes)
IMAGE_SIZE = 28

# file stem -> (number of items, MD5 of the decoded IDX bytes). torchvision's `resources` list the MD5s of
# its gzip files, which Debian's re-compressed copies do not match; the decoded content is identical.
_IDX_FILES: dict[str, tuple[int, str]] = {
    "train-images-idx3-ubyte": (60_000, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": (60_000, "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": (10_000, "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": (10_000, "15d484375f8d13e6eb1aabb0c3f46965"),
}
_SOURCE_SPLITS = IDX_STEMS
_CACHE_VERSION = 1


def _candidate_dirs(root: Path) -> list[Path]:
    return [root, root / "FashionMNIST" / "raw", root / "raw", root / "fashion-mnist"]


def find_source_file(root: Path, stem: str) -> Path | None:
    """The gzip or plain IDX file for ``stem`` under ``root`` (torchvision, Debian or flat layout)."""
    for d in _candidate_dirs(root):
        for name in (f"{stem}.gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def read_idx(path: Path, verify: bool = True) -> torch.Tensor:
    """Decode one IDX file (gzip or plain) into a uint8 tensor, checking size, header and MD5."""
    stem = path.name.removesuffix(".gz")
    count, md5 = _IDX_FILES[stem]
    data = decompress(path)
    if verify and hashlib.md5(data).hexdigest() != md5:
        raise DataError(
            f"{path} does not hold the official Fashion-MNIST data: the MD5 of its decoded content is "
            f"{hashlib.md5(data).hexdigest()}, expected {md5}. Replace it with a fresh copy of the official "
            "file (or set data.verify=false to use modified data on purpose)."
        )
    is_images = "images" in stem
    return parse_idx(data, path, is_images, [count, IMAGE_SIZE, IMAGE_SIZE] if is_images else [count], "Fashion-MNIST")


def _download(stem: str, dest_dir: Path) -> Path:
    """Fetch one official gzip file into ``dest_dir`` (written to a temporary name, then renamed)."""
    gz_md5 = dict(FashionMNIST.resources)[f"{stem}.gz"]
    return download([f"{mirror}{stem}.gz" for mirror in FashionMNIST.mirrors], dest_dir / f"{stem}.gz", gz_md5)


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST (60k train / 10k test, 28x28, 10 classes) as in-memory uint8 tensors.

    Batches are ``(uint8 images, labels)`` on the host and become float32 in [0, 1] of shape (B,1,28,28)
    after the transfer to the device; models do their own normalisation. Test image IDs are the official
    test-set indices. ``val_on_test=True`` validates on the 10k test set, as the lecture does (its "valid"
    column is the test set); otherwise ``val_size`` training images, drawn with ``split_seed``, are held out.
    ``in_channels``, ``image_size`` and ``num_classes`` are facts of the data set, accepted (and checked) so that
    a model config can read them as ``${data.in_channels}`` etc.
    """

    classes: tuple[str, ...] = CLASSES
    num_classes: int = len(CLASSES)
    in_channels: int = 1
    image_size: int = IMAGE_SIZE

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        val_on_test: bool = False,
        split_seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        download: bool = True,
        verify: bool = True,
        in_channels: int = 1,
        image_size: int = IMAGE_SIZE,
        num_classes: int = len(CLASSES),
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        if not is_int(val_size) or not 0 <= val_size < 60_000:
            raise ConfigError(f"data.val_size must be an integer in [0, 60000), got {val_size!r}")
        if not is_int(split_seed):
            raise ConfigError(f"data.split_seed must be an integer, got {split_seed!r}")
        for name, flag in (("val_on_test", val_on_test), ("download", download), ("verify", verify)):
            check_bool(f"data.{name}", flag)
        for name, value in (("in_channels", in_channels), ("image_size", image_size), ("num_classes", num_classes)):
            if value != getattr(self, name):
                raise ConfigError(
                    f"data.{name}={value!r}, but Fashion-MNIST has {name}={getattr(self, name)} (a fact of the data "
                    "set, there for model configs to read; leave it as it is)"
                )
        self.save_hyperparameters()
        self.data_dir, self.cache_dir = resolve_dirs(data_dir, cache_dir)
        self.val_size, self.val_on_test, self.split_seed = val_size, val_on_test, split_seed
        self.download, self.verify = download, verify

    # -- files ---------------------------------------------------------------------------------------
    @property
    def download_dir(self) -> Path:
        """Where missing files are downloaded to (inside the cache, never the data directory)."""
        return self.cache_dir / "FashionMNIST" / "raw"

    def _cache_file(self, split: str) -> Path:
        return self.cache_dir / "decoded" / f"fashion_mnist_{split}.pt"

    def source_files(self) -> dict[str, Path]:
        """Locate the four files, downloading the missing ones when allowed; clear error otherwise."""
        check_data_dir(self.data_dir, "the Fashion-MNIST files")
        found = {s: find_source_file(self.data_dir, s) or find_source_file(self.download_dir, s) for s in _IDX_FILES}
        missing = [s for s, p in found.items() if p is None]
        if missing and self.download:
            try:
                self.download_dir.mkdir(parents=True, exist_ok=True)
                for s in missing:
                    found[s] = _download(s, self.download_dir)
                missing = []
            except OSError as e:
                raise DataError(self._missing_message(missing, f"Downloading them failed: {e}")) from e
        if missing:
            raise DataError(self._missing_message(missing, "Downloading is off (data.download=false)."))
        return found  # type: ignore[return-value]

    def _missing_message(self, missing: list[str], why: str) -> str:
        return missing_message(
            "Fashion-MNIST",
            missing,
            "looked for .gz and uncompressed",
            _candidate_dirs(self.data_dir),
            self.download_dir,
            why,
            "the four official files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)",
            [f"on Debian/Ubuntu: apt install dataset-fashion-mnist, then {ENV_DATA}={DEBIAN_DIR};"],
        )

    def prepare_data(self) -> None:
        """Verify the source files and decode them into the cache (only when the sources changed)."""
        check_cache_dir(self.cache_dir)
        sources = self.source_files()
        for split, stems in _SOURCE_SPLITS.items():
            paths = [sources[s] for s in stems]
            source = fingerprint(paths)
            cache = self._cache_file(split)
            if read_cache(cache, version=_CACHE_VERSION, source=source, verified=self.verify) is not None:
                continue
            log.info("Decoding %s into %s", ", ".join(p.name for p in paths), cache)
            images, labels = (read_idx(p, verify=self.verify) for p in paths)
            if len(images) != len(labels):
                raise DataError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
            if int(labels.max()) >= len(CLASSES):  # checked even with verify=false: labels index the classes
                bad = sorted({int(v) for v in labels[labels >= len(CLASSES)].unique()})
                raise DataError(
                    f"{paths[1]} holds labels {bad[:10]} outside 0..{len(CLASSES) - 1}: Fashion-MNIST has "
                    f"{len(CLASSES)} classes. Replace the file with the official one."
                )
            self._write_cache(
                cache,
                {
                    "version": _CACHE_VERSION,
                    "source": source,
                    "verified": self.verify,
                    "images": images,
                    "labels": labels.to(torch.int64),
                },
            )

    def _write_cache(self, path: Path, payload: dict) -> None:
        write_cache(path, payload, "decoded-data")

    # -- datasets ------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load the decoded tensors and build the train/val/test datasets (idempotent)."""
        if self._data:
            return
        loaded = {}
        for split in _SOURCE_SPLITS:
            path = self._cache_file(split)
            if not path.is_file():
                raise DataError(f"{path} is missing: call prepare_data() before setup() (Trainer does).")
            loaded[split] = torch.load(path, weights_only=True)
        train, test = loaded["train"], loaded["test"]
        self._data["test"] = TensorImageDataset(test["images"], test["labels"])
        if self.val_on_test:
            self._data["train"] = TensorImageDataset(train["images"], train["labels"])
            self._data["val"] = self._data["test"]
        else:
            train_ids, val_ids = seeded_split(len(train["labels"]), self.val_size, self.split_seed)
            self._data["train"] = TensorImageDataset(train["images"], train["labels"], train_ids)
            self._data["val"] = TensorImageDataset(train["images"], train["labels"], val_ids)

    def dataset(self, split: str) -> TensorImageDataset:
        """The ``train``, ``val`` or ``test`` dataset (after ``setup``)."""
        return super().dataset(split)

    def has_val(self) -> bool:
        return self.val_on_test or self.val_size > 0
