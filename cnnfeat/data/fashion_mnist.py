"""Fashion-MNIST held in memory as uint8 tensors, behind a LightningDataModule.

The four IDX files are looked up in ``data_dir`` (config ``data.data_dir``, else ``$CNNFEAT_DATA``), as
torchvision's gzip files, Debian's re-gzipped copies or plain IDX files, and checked by the MD5 of their
*decoded* bytes (the same for all three). They are decoded once into a writable cache, so the data
directory itself is never written to; when they are absent they are downloaded into the cache.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import FashionMNIST

from cnnfeat.errors import ConfigError, DataError, check_bool, check_int
from cnnfeat.run import lightning_api as pl
from cnnfeat.run.atomic import atomic_write, is_disk_full, remove_orphans

log = logging.getLogger(__name__)

ENV_DATA = "CNNFEAT_DATA"
ENV_CACHE = "CNNFEAT_CACHE"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES: tuple[str, ...] = tuple(FashionMNIST.classes)
IMAGE_SIZE = 28
SPLITS = ("train", "val", "test")

# file stem -> (number of items, MD5 of the decoded IDX bytes). torchvision's `resources` list the MD5s of
# its gzip files, which Debian's re-compressed copies do not match; the decoded content is identical.
_IDX_FILES: dict[str, tuple[int, str]] = {
    "train-images-idx3-ubyte": (60_000, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": (60_000, "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": (10_000, "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": (10_000, "15d484375f8d13e6eb1aabb0c3f46965"),
}
_SOURCE_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CACHE_VERSION = 1
_DOWNLOAD_TIMEOUT_S = 30


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_cache_dir(path: Path) -> Path:
    """``path`` if it is (or can become) a writable directory; a message naming it and the variable otherwise."""
    if path.exists() and not path.is_dir():
        raise DataError(
            f"The cache directory {path} is a file, not a directory. Point data.cache_dir or {ENV_CACHE} at a "
            "writable directory."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"Cannot create the cache directory {path} ({e.strerror or e}). Point data.cache_dir or {ENV_CACHE} at "
            "a writable directory."
        ) from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"The cache directory {path} is not writable. Point data.cache_dir or {ENV_CACHE} elsewhere.")
    return path


def default_cache_dir() -> Path:
    """``$CNNFEAT_CACHE``, else ``$XDG_CACHE_HOME/cnnfeat``, else ``~/.cache/cnnfeat``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cnnfeat"


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N,H,W) or (N,1,H,W) -> float32 (N,1,H,W) in [0, 1], as ``ToTensor`` would give."""
    if images.ndim == 3:
        images = images.unsqueeze(1)
    return images.to(torch.float32).div_(255.0)


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
    try:
        raw = path.read_bytes()
    except PermissionError as e:
        raise DataError(f"{path} cannot be read (permission denied): give this user read access to it.") from e
    try:
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(
            f"{path} could not be read or decompressed ({type(e).__name__}: {e}). The file is probably "
            "truncated or corrupt: replace it with a fresh copy of the official file."
        ) from e
    if verify and hashlib.md5(data).hexdigest() != md5:
        raise DataError(
            f"{path} does not hold the official Fashion-MNIST data: the MD5 of its decoded content is "
            f"{hashlib.md5(data).hexdigest()}, expected {md5}. Replace it with a fresh copy of the official "
            "file (or set data.verify=false to use modified data on purpose)."
        )
    is_images = "images" in stem
    ndim = 3 if is_images else 1
    expected_magic = 0x0800 + ndim  # 0x08 = unsigned byte, then the number of dimensions
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise DataError(f"{path} is too short to be an IDX file ({len(data)} bytes).")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"{path} has IDX magic number {magic:#010x}, expected {expected_magic:#010x} "
            f"(uint8, {ndim}-d {'images' if is_images else 'labels'}). Is it the right file?"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected_dims = [count, IMAGE_SIZE, IMAGE_SIZE] if is_images else [count]
    if dims != expected_dims or len(data) != header + count * (IMAGE_SIZE**2 if is_images else 1):
        raise DataError(
            f"{path} holds an array of shape {tuple(dims)} in {len(data) - header} bytes; Fashion-MNIST "
            f"needs shape {tuple(expected_dims)}. The file is truncated or not Fashion-MNIST."
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims).clone()


def _download(stem: str, dest_dir: Path) -> Path:
    """Fetch one official gzip file into ``dest_dir`` (written to a temporary name, then renamed)."""
    gz_md5 = dict(FashionMNIST.resources)[f"{stem}.gz"]
    dest = dest_dir / f"{stem}.gz"
    errors = []
    for mirror in FashionMNIST.mirrors:
        url = f"{mirror}{stem}.gz"
        part = dest.with_suffix(".gz.part")
        try:
            log.info("Downloading %s", url)
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as r, part.open("wb") as f:
                shutil.copyfileobj(r, f)
            got = hashlib.md5(part.read_bytes()).hexdigest()
            if got != gz_md5:
                raise OSError(f"MD5 {got} != {gz_md5}")
            part.replace(dest)
            return dest
        except (OSError, urllib.error.URLError) as e:
            errors.append(f"{url}: {e}")
            part.unlink(missing_ok=True)
    raise OSError("; ".join(errors))


def write_cache(path: Path, payload: dict, what: str) -> None:
    """``torch.save`` a cache file atomically; any failure (a full disk included) is a message naming the directory.

    Temporary files of interrupted writes in that directory are removed first.
    """
    check_cache_dir(path.parent)
    remove_orphans(path.parent)
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write (e.g. ENOSPC) as RuntimeError
        why = "the disk is full" if is_disk_full(e) else f"{type(e).__name__}: {e}"
        raise DataError(
            f"Cannot write the {what} cache {path} ({why}). Free space there, or point data.cache_dir or {ENV_CACHE} "
            "at another writable directory."
        ) from e


class TensorImageDataset(Dataset):
    """uint8 images (N,H,W) and int64 labels in memory; a batch is one indexing op, not N PIL conversions.

    ``indices`` maps dataset positions to rows of ``images`` so that a split keeps the original image IDs
    (``image_ids``).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor | None = None):
        self.images, self.labels = images, labels
        self.image_ids = torch.arange(len(images)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.image_ids[i]
        return self.images[j].unsqueeze(0), self.labels[j]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.image_ids[torch.as_tensor(indices)]
        return self.images[rows].unsqueeze(1), self.labels[rows]


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``collate_fn`` for ``__getitems__`` datasets: the batch is already stacked."""
    return batch


class FashionMNISTDataModule(pl.LightningDataModule):
    """Fashion-MNIST (60k train / 10k test, 28x28, 10 classes) as in-memory uint8 tensors.

    Batches are ``(uint8 images, labels)`` on the host and become float32 in [0, 1] of shape (B,1,28,28)
    after the transfer to the device; models do their own normalisation. Test image IDs are the official
    test-set indices. ``val_on_test=True`` validates on the 10k test set, as the lecture does (its "valid"
    column is the test set); otherwise ``val_size`` training images, drawn with ``split_seed``, are held out.
    """

    classes: tuple[str, ...] = CLASSES
    num_classes: int = len(CLASSES)

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
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            check_int(f"data.{name}", value)
        if not _is_int(val_size) or not 0 <= val_size < 60_000:
            raise ConfigError(f"data.val_size must be an integer in [0, 60000), got {val_size!r}")
        if not _is_int(split_seed):
            raise ConfigError(f"data.split_seed must be an integer, got {split_seed!r}")
        check_int("data.num_workers", num_workers, minimum=0)
        for name, flag in (
            ("val_on_test", val_on_test),
            ("pin_memory", pin_memory),
            ("download", download),
            ("verify", verify),
        ):
            check_bool(f"data.{name}", flag)
        self.save_hyperparameters()
        env_dir = os.environ.get(ENV_DATA)
        self.data_dir = Path(data_dir or env_dir or default_cache_dir()).expanduser()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.val_on_test, self.split_seed = val_size, val_on_test, split_seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.download, self.verify = download, verify
        self._data: dict[str, TensorImageDataset] = {}

    # -- files ---------------------------------------------------------------------------------------
    @property
    def download_dir(self) -> Path:
        """Where missing files are downloaded to (inside the cache, never the data directory)."""
        return self.cache_dir / "FashionMNIST" / "raw"

    def _cache_file(self, split: str) -> Path:
        return self.cache_dir / "decoded" / f"fashion_mnist_{split}.pt"

    def source_files(self) -> dict[str, Path]:
        """Locate the four files, downloading the missing ones when allowed; clear error otherwise."""
        if self.data_dir.exists() and not (self.data_dir.is_dir() and os.access(self.data_dir, os.R_OK | os.X_OK)):
            raise DataError(
                f"The data directory {self.data_dir} (data.data_dir or {ENV_DATA}) is "
                f"{'not a directory' if not self.data_dir.is_dir() else 'not readable by this user'}: point it at "
                "the readable directory that holds the Fashion-MNIST files."
            )
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
        searched = ", ".join(str(d) for d in _candidate_dirs(self.data_dir))
        return (
            f"Fashion-MNIST files not found: {', '.join(missing)} (looked for .gz and uncompressed in "
            f"{searched} and {self.download_dir}). {why}\n"
            "Provide the data in one of these ways:\n"
            "  1. put the four official files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in a directory and set "
            f"data.data_dir=DIR or the environment variable {ENV_DATA}=DIR;\n"
            f"  2. on Debian/Ubuntu: apt install dataset-fashion-mnist, then {ENV_DATA}={DEBIAN_DIR};\n"
            f"  3. run once with internet access to download them into {self.download_dir}."
        )

    def prepare_data(self) -> None:
        """Verify the source files and decode them into the cache (only when the sources changed)."""
        check_cache_dir(self.cache_dir)
        sources = self.source_files()
        for split, stems in _SOURCE_SPLITS.items():
            paths = [sources[s] for s in stems]
            fingerprint = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
            cache = self._cache_file(split)
            if cache.is_file():
                try:
                    cached = torch.load(cache, weights_only=True)
                    if (
                        cached.get("version") == _CACHE_VERSION
                        and cached.get("source") == fingerprint
                        and cached.get("verified", False) >= self.verify
                    ):
                        continue
                except Exception:
                    log.warning("Rebuilding unreadable cache file %s", cache)
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
                    "source": fingerprint,
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
            perm = torch.randperm(len(train["labels"]), generator=torch.Generator().manual_seed(self.split_seed))
            val_ids, train_ids = perm[: self.val_size].sort().values, perm[self.val_size :].sort().values
            self._data["train"] = TensorImageDataset(train["images"], train["labels"], train_ids)
            self._data["val"] = TensorImageDataset(train["images"], train["labels"], val_ids)

    def dataset(self, split: str) -> TensorImageDataset:
        """The ``train``, ``val`` or ``test`` dataset (after ``setup``)."""
        if split not in SPLITS:
            raise ConfigError(f"Unknown split {split!r}; choose one of {SPLITS}")
        if not self._data:
            raise RuntimeError("FashionMNISTDataModule.setup() has not run yet")
        return self._data[split]

    def images(
        self, split: str = "test", ids: Sequence[int] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images (N,1,28,28) in [0,1] and labels for image IDs of a split (all when ``ids`` is None).

        IDs are the split's own positions; for ``test`` they are the official test-set indices.
        """
        ds = self.dataset(split)
        if ids is None:
            ids = torch.arange(len(ds))
        ids = torch.as_tensor(ids, dtype=torch.long)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(ds)):
            raise IndexError(
                f"Image IDs must be in [0, {len(ds) - 1}] for the {split} split, got "
                f"{ids[(ids < 0) | (ids >= len(ds))].tolist()}"
            )
        x, y = ds.__getitems__(ids.tolist())
        return to_float(x), y

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_on_test and self.val_size == 0:
            return []
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 images -> float in [0,1] on the device, so the host moves a quarter of the bytes.

        Anything else (e.g. the model summary's float ``example_input_array``) passes through unchanged.
        """
        if isinstance(batch, tuple | list) and len(batch) == 2 and batch[0].dtype == torch.uint8:
            return to_float(batch[0]), batch[1]
        return batch
