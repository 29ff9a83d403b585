"""The common benchmark sets, each read from its official files: CIFAR-10, CIFAR-100, MNIST, KMNIST, SVHN.

Files are looked up in ``data_dir`` (config ``data.data_dir``, else ``$CNNFEAT_DATA``) in torchvision's layout or
flat, and in the cache's download folder; missing ones are downloaded there (never into ``data_dir``, which may
be read-only), with torchvision's URLs and MD5s. Each split is decoded once into the cache as uint8 tensors
(N, C, H, W) with per-image pixel sums (for exact normalisation statistics of any split), and re-decoded only when
a source file changes. Readers:

- CIFAR-10/100: the python pickles, from the extracted folder (``cifar-10-batches-py/``, ``cifar-100-python/``)
  or straight from the ``.tar.gz`` without extracting it. A pickle is unpickled in full only once its MD5 proved
  it official; otherwise (``verify=false``) through an unpickler that admits nothing but NumPy arrays.
- MNIST, KMNIST: the IDX files (gzip or plain) with the reader Fashion-MNIST uses; the MD5s torchvision lists are
  of the gzip files, so plain IDX files are checked for shape only.
- SVHN: ``train_32x32.mat`` / ``test_32x32.mat`` (MATLAB, read with SciPy); label 10 is the digit 0.

Validation images are ``val_size`` training images drawn with ``split_seed`` (or the test set, ``val_on_test``);
the official test set is the test split.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100, KMNIST, MNIST, SVHN

from cnnfeat.data.common import (
    IDX_STEMS,
    StandardizedImageDataModule,
    TensorImageDataset,
    check_augment,
    check_cache_dir,
    check_data_dir,
    decompress,
    download,
    file_md5,
    fingerprint,
    is_int,
    missing_message,
    parse_idx,
    pixel_sums,
    plain,
    read_bytes,
    read_cache,
    resolve_dirs,
    seeded_split,
    stats_from_sums,
    write_cache,
)
from cnnfeat.errors import ConfigError, DataError, check_bool

log = logging.getLogger(__name__)

_CACHE_VERSION = 1
SOURCE_SPLITS = ("train", "test")


class OfficialDataModule(StandardizedImageDataModule):
    """A benchmark set from its official files (subclasses say which files and how to read them).

    Batches are ``(uint8 images (B,C,H,W), labels)`` on the host and float32 in [0, 1] on the device (standardised
    there with the training images' mean/std when ``normalize=true``). ``in_channels``, ``image_size`` and
    ``num_classes`` are facts of the set, accepted (and checked) so that model configs can read ``${data.<name>}``.
    """

    #: how messages name the set, the stem of its cache files, its torchvision folder under ``data_dir``
    title: str
    key: str
    folder: str
    train_size: int
    in_channels: int
    image_size: int
    num_classes: int

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
        normalize: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: Mapping[str, Any] | None = None,
        in_channels: int | None = None,
        image_size: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        mean, std, augment = plain(mean), plain(std), plain(augment)  # recorded by save_hyperparameters below
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, normalize, mean, std, augment)
        if not is_int(val_size) or not 0 <= val_size < self.train_size:
            raise ConfigError(f"data.val_size must be an integer in [0, {self.train_size}), got {val_size!r}")
        if not is_int(split_seed):
            raise ConfigError(f"data.split_seed must be an integer, got {split_seed!r}")
        for name, flag in (("val_on_test", val_on_test), ("download", download), ("verify", verify)):
            check_bool(f"data.{name}", flag)
        for name, value in (("in_channels", in_channels), ("image_size", image_size), ("num_classes", num_classes)):
            if value is not None and value != getattr(self, name):
                raise ConfigError(
                    f"data.{name}={value!r}, but {self.title} has {name}={getattr(self, name)}"
                    f"{self._fact_hint(name)} (a fact of the data set, there for model configs to read)"
                )
        self._check_given_stats()
        self.save_hyperparameters()
        self.data_dir, self.cache_dir = resolve_dirs(data_dir, cache_dir)
        self.val_size, self.val_on_test, self.split_seed = val_size, val_on_test, split_seed
        self.download, self.verify = download, verify

    def _fact_hint(self, name: str) -> str:
        return ""

    # -- files ---------------------------------------------------------------------------------------
    @property
    def download_dir(self) -> Path:
        """Where missing files are downloaded to (inside the cache, never the data directory)."""
        return self.cache_dir / self.folder / "raw"

    def search_dirs(self) -> list[Path]:
        """Where the official files are looked for, in order (the download folder last)."""
        d = self.data_dir
        return [d / self.folder / "raw", d / self.folder, d / self.folder.lower(), d / "raw", d]

    def _cache_file(self, split: str) -> Path:
        return self.cache_dir / "decoded" / f"{self.key}_{split}.pt"

    def resources(self) -> list[str]:
        """The official files (names as downloaded) this set needs."""
        raise NotImplementedError

    def find(self, resource: str) -> Path | None:
        """The file (or extracted folder) for ``resource`` in the search dirs or the download folder."""
        for d in [*self.search_dirs(), self.download_dir]:
            if (d / resource).is_file():
                return d / resource
        return None

    def fetch(self, resource: str) -> Path:
        """Download ``resource`` into the download folder (``OSError`` when that fails)."""
        raise NotImplementedError

    def files_wanted(self) -> str:
        """The files, as the offline message names them."""
        return ", ".join(self.resources())

    def source_files(self) -> dict[str, Path]:
        """Locate every resource, downloading the missing ones when allowed; a clear message otherwise."""
        check_data_dir(self.data_dir, f"the {self.title} files")
        found = {r: self.find(r) for r in self.resources()}
        missing = [r for r, p in found.items() if p is None]
        if missing and self.download:
            try:
                for r in missing:
                    found[r] = self.fetch(r)
                missing = []
            except OSError as e:
                raise DataError(self._missing_message(missing, f"Downloading them failed: {e}")) from e
        if missing:
            raise DataError(self._missing_message(missing, "Downloading is off (data.download=false)."))
        return found  # type: ignore[return-value]

    def _missing_message(self, missing: list[str], why: str) -> str:
        return missing_message(
            self.title, missing, "looked", self.search_dirs(), self.download_dir, why, self.files_wanted()
        )

    def split_sources(self, found: dict[str, Path], split: str) -> list[Path]:
        """The files whose content makes a split (their sizes and times key its cache)."""
        raise NotImplementedError

    def read_split(self, found: dict[str, Path], split: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
        """uint8 images (N, C, H, W), int64 labels and the class names of a split, from the official files."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Verify the source files and decode each split into the cache (only when its sources changed)."""
        check_cache_dir(self.cache_dir)
        found = self.source_files()
        for split in SOURCE_SPLITS:
            sources = self.split_sources(found, split)
            source = fingerprint(sources)
            cache = self._cache_file(split)
            if read_cache(cache, version=_CACHE_VERSION, source=source, verified=self.verify) is not None:
                continue
            log.info("Decoding %s %s (%s) into %s", self.title, split, ", ".join(p.name for p in sources), cache)
            images, labels, classes = self.read_split(found, split)
            self._check_decoded(images, labels, classes, sources)
            payload = {
                "version": _CACHE_VERSION,
                "source": source,
                "verified": self.verify,
                "images": images,
                "labels": labels,
                "classes": list(classes),
                "sums": pixel_sums(images),
            }
            write_cache(cache, payload, f"decoded {self.title}")

    def _check_decoded(
        self, images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], sources: list[Path]
    ) -> None:
        where = ", ".join(str(p) for p in sources)
        shape = (self.in_channels, self.image_size, self.image_size)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise DataError(
                f"{where}: images of {images.dtype} {tuple(images.shape)}, {self.title} has uint8 (N, {shape[0]}, "
                f"{shape[1]}, {shape[2]}). Replace the files with the official ones."
            )
        if len(images) != len(labels):
            raise DataError(f"{where}: {len(images)} images but {len(labels)} labels. Replace the files.")
        if len(classes) != self.num_classes:
            raise DataError(f"{where}: {len(classes)} class names, {self.title} has {self.num_classes}.")
        bad = sorted({int(v) for v in labels[(labels < 0) | (labels >= self.num_classes)].unique()})
        if bad:  # checked even with verify=false: labels index the classes
            raise DataError(
                f"{where} holds labels {bad[:10]} outside 0..{self.num_classes - 1}: {self.title} has "
                f"{self.num_classes} classes. Replace the files with the official ones."
            )

    def _not_official(self, what: str, got: str, expected: str) -> DataError:
        return DataError(
            f"{what} does not hold the official {self.title} data: its MD5 is {got}, expected {expected}. Replace it "
            "with a fresh copy of the official file (or set data.verify=false to use modified data on purpose)."
        )

    # -- datasets ------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load the decoded tensors, build the train/val/test datasets and the statistics (idempotent)."""
        if self._data:
            return
        loaded = {}
        for split in SOURCE_SPLITS:
            path = self._cache_file(split)
            if not path.is_file():
                raise DataError(f"{path} is missing: call prepare_data() before setup() (Trainer does).")
            loaded[split] = torch.load(path, weights_only=True)
        train, test = loaded["train"], loaded["test"]
        self.classes = tuple(train["classes"])
        self._data["test"] = TensorImageDataset(test["images"], test["labels"])
        if self.val_on_test:
            train_ids = torch.arange(len(train["labels"]))
            self._data["val"] = self._data["test"]
        else:
            train_ids, val_ids = seeded_split(len(train["labels"]), self.val_size, self.split_seed)
            self._data["val"] = TensorImageDataset(train["images"], train["labels"], val_ids)
        self._data["train"] = TensorImageDataset(train["images"], train["labels"], train_ids, self.augment)
        if self.augment is not None:
            check_augment(self.augment, train["images"][0])
        self.set_stats(lambda: stats_from_sums(train["sums"][train_ids], self.image_size**2))

    def has_val(self) -> bool:
        return self.val_on_test or self.val_size > 0

    def loader_workers(self, split: str) -> int:
        """Batches are one indexing op: workers help only when per-image augmentation runs (training)."""
        return self.num_workers if split == "train" and self.augment is not None else 0


# -- CIFAR ------------------------------------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what a pickled NumPy array needs: a file that is not an official batch cannot run code."""

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR batch")


class _CIFAR(OfficialDataModule):
    """CIFAR from the python version: the extracted folder or the ``.tar.gz`` itself."""

    tv: type[CIFAR10]
    image_size, in_channels, train_size = 32, 3, 50_000
    label_key: str = "labels"
    names_key: str = "label_names"

    def search_dirs(self) -> list[Path]:
        d = self.data_dir
        return [d, d / self.folder, d / self.folder / "raw", d / self.folder.lower()]

    def resources(self) -> list[str]:
        return [self.tv.filename]

    def files_wanted(self) -> str:
        return f"{self.tv.filename} (or the folder {self.tv.base_folder}/ extracted from it)"

    def _members(self) -> list[tuple[str, str]]:
        return [*self.tv.train_list, *self.tv.test_list, (self.tv.meta["filename"], self.tv.meta["md5"])]

    def find(self, resource: str) -> Path | None:
        for d in [*self.search_dirs(), self.download_dir]:
            folder = d / self.tv.base_folder
            if all((folder / name).is_file() for name, _ in self._members()):
                return folder
            if (d / resource).is_file():
                return d / resource
        return None

    def fetch(self, resource: str) -> Path:
        return download([self.tv.url], self.download_dir / self.tv.filename, self.tv.tgz_md5)

    def _split_members(self, split: str) -> list[tuple[str, str]]:
        return [*(self.tv.train_list if split == "train" else self.tv.test_list), (self.tv.meta["filename"], "")]

    def split_sources(self, found: dict[str, Path], split: str) -> list[Path]:
        src = found[self.tv.filename]
        return [src / name for name, _ in self._split_members(split)] if src.is_dir() else [src]

    def _read_members(self, src: Path, names: list[str]) -> dict[str, bytes]:
        if src.is_dir():
            return {n: read_bytes(src / n) for n in names}
        out = {}
        try:
            with tarfile.open(src, "r:*") as tar:
                for n in names:
                    f = tar.extractfile(f"{self.tv.base_folder}/{n}")
                    if f is None:
                        raise KeyError(n)
                    out[n] = f.read()
        except (tarfile.TarError, OSError, EOFError, KeyError) as e:
            raise DataError(
                f"{src} could not be read as the {self.title} archive ({type(e).__name__}: {e}): it should hold "
                f"{self.tv.base_folder}/ with {', '.join(names)}. The file is probably truncated or corrupt: replace "
                "it with a fresh copy of the official file."
            ) from e
        return out

    def _unpickle(self, data: bytes, where: str, official: bool) -> Mapping[str, Any]:
        try:
            if official:  # the MD5 matched the official file: plain pickle, as torchvision reads it
                obj = pickle.loads(data, encoding="latin1")
            else:
                obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
        except Exception as e:  # any unpickling failure is a bad file, never cnnfeat's bug
            raise DataError(
                f"{where} is not a readable {self.title} batch ({type(e).__name__}: {e}). Replace it with the "
                "official file."
            ) from e
        if not isinstance(obj, Mapping):
            raise DataError(f"{where} holds a {type(obj).__name__}, not a {self.title} batch (a dict).")
        return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}

    def read_split(self, found: dict[str, Path], split: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
        src = found[self.tv.filename]
        members = self._split_members(split)
        raw = self._read_members(src, [n for n, _ in members])
        meta_md5 = self.tv.meta["md5"]
        images, labels = [], []
        names: tuple[str, ...] = ()
        for name, md5 in members:
            data, where = raw[name], (str(src / name) if src.is_dir() else f"{src}:{self.tv.base_folder}/{name}")
            expected = md5 or meta_md5
            got = hashlib.md5(data).hexdigest()
            if self.verify and got != expected:
                raise self._not_official(where, got, expected)
            batch = self._unpickle(data, where, official=got == expected)
            if name == self.tv.meta["filename"]:
                names = self._names(batch, where)
                continue
            x, y = batch.get("data"), batch.get(self.label_key)
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
                got_x = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
                raise DataError(
                    f"{where}: 'data' is {got_x}, expected uint8 (N, 3072). Replace it with the official file."
                )
            if not isinstance(y, Sequence | np.ndarray) or len(y) != len(x):
                raise DataError(f"{where}: '{self.label_key}' does not give one label per image ({len(x)}).")
            images.append(torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()))
            labels.append(torch.as_tensor(np.asarray(y, dtype=np.int64)))
        return torch.cat(images), torch.cat(labels), names

    def _names(self, meta: Mapping[str, Any], where: str) -> tuple[str, ...]:
        names = meta.get(self.names_key)
        if not isinstance(names, Sequence) or not all(isinstance(n, str | bytes) for n in names):
            raise DataError(f"{where}: no class names under '{self.names_key}'. Replace it with the official file.")
        return tuple(n.decode("latin1") if isinstance(n, bytes) else n for n in names)


class CIFAR10DataModule(_CIFAR):
    """CIFAR-10: 50k train / 10k test RGB 32x32 images in 10 classes (the python version's pickles)."""

    title, key, folder, tv = "CIFAR-10", "cifar10", "CIFAR10", CIFAR10
    num_classes = 10
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class CIFAR100DataModule(_CIFAR):
    """CIFAR-100: 50k train / 10k test RGB 32x32 images; ``labels="fine"`` (100 classes) or ``"coarse"`` (20)."""

    title, key, folder, tv = "CIFAR-100", "cifar100", "CIFAR100", CIFAR100
    num_classes = 100

    def __init__(self, *args: Any, labels: str = "fine", **kwargs: Any) -> None:
        if labels not in ("fine", "coarse"):
            raise ConfigError(f"data.labels must be 'fine' (100 classes) or 'coarse' (20), got {labels!r}")
        self.labels = labels
        self.num_classes = 100 if labels == "fine" else 20
        self.key = f"cifar100_{labels}"
        self.label_key, self.names_key = f"{labels}_labels", f"{labels}_label_names"
        super().__init__(*args, **kwargs)

    def _fact_hint(self, name: str) -> str:
        return f" with data.labels={self.labels}" if name == "num_classes" else ""


# -- MNIST and KMNIST: IDX files --------------------------------------------------------------------------
class _IDX(OfficialDataModule):
    """A set in MNIST's four IDX files (gzip or plain)."""

    tv: type[MNIST]
    image_size, in_channels, train_size, num_classes = 28, 1, 60_000, 10

    def resources(self) -> list[str]:
        return [name for name, _ in self.tv.resources]

    def find(self, resource: str) -> Path | None:
        for d in [*self.search_dirs(), self.download_dir]:
            for name in (resource, resource.removesuffix(".gz")):
                if (d / name).is_file():
                    return d / name
        return None

    def fetch(self, resource: str) -> Path:
        md5 = dict(self.tv.resources)[resource]
        return download([f"{m}{resource}" for m in self.tv.mirrors], self.download_dir / resource, md5)

    def files_wanted(self) -> str:
        return f"the four official files ({', '.join(self.resources())}; gzip or uncompressed)"

    def split_sources(self, found: dict[str, Path], split: str) -> list[Path]:
        return [found[f"{stem}.gz"] for stem in IDX_STEMS[split]]

    def _read(self, path: Path, images: bool) -> torch.Tensor:
        data = decompress(path)
        if path.suffix == ".gz" and self.verify:
            got, expected = hashlib.md5(read_bytes(path)).hexdigest(), dict(self.tv.resources)[path.name]
            if got != expected:
                raise self._not_official(str(path), got, expected)
        elif self.verify:
            log.info("%s: no official MD5 is known for the uncompressed file; its shape is checked", path)
        return parse_idx(data, path, images, [None, 28, 28] if images else [None], self.title)

    def read_split(self, found: dict[str, Path], split: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
        image_file, label_file = self.split_sources(found, split)
        images, labels = self._read(image_file, True), self._read(label_file, False)
        if len(images) != len(labels):
            raise DataError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
        return images.unsqueeze(1), labels.to(torch.int64), tuple(self.tv.classes)


class MNISTDataModule(_IDX):
    """MNIST: 60k train / 10k test grey 28x28 handwritten digits (the four IDX files)."""

    title, key, folder, tv = "MNIST", "mnist", "MNIST", MNIST
    classes = tuple(MNIST.classes)


class KMNISTDataModule(_IDX):
    """Kuzushiji-MNIST: 60k train / 10k test grey 28x28 cursive Japanese characters, 10 classes (IDX files)."""

    title, key, folder, tv = "KMNIST", "kmnist", "KMNIST", KMNIST
    classes = tuple(KMNIST.classes)


# -- SVHN: MATLAB files -----------------------------------------------------------------------------------
class SVHNDataModule(OfficialDataModule):
    """SVHN (cropped digits): 73,257 train / 26,032 test RGB 32x32 images (``train_32x32.mat``, ``test_32x32.mat``;
    the 531k ``extra`` images are not used). Label 10 in the files is the digit 0, as torchvision maps it."""

    title, key, folder = "SVHN", "svhn", "SVHN"
    image_size, in_channels, train_size, num_classes = 32, 3, 73_257, 10
    classes = tuple(str(d) for d in range(10))

    def search_dirs(self) -> list[Path]:
        d = self.data_dir
        return [d, d / self.folder, d / self.folder.lower(), d / self.folder / "raw"]

    def resources(self) -> list[str]:
        return [SVHN.split_list[s][1] for s in SOURCE_SPLITS]

    def fetch(self, resource: str) -> Path:
        url, name, md5 = next(v for v in SVHN.split_list.values() if v[1] == resource)
        return download([url], self.download_dir / name, md5)

    def split_sources(self, found: dict[str, Path], split: str) -> list[Path]:
        return [found[SVHN.split_list[split][1]]]

    def read_split(self, found: dict[str, Path], split: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
        import scipy.io

        (path,) = self.split_sources(found, split)
        md5 = SVHN.split_list[split][2]
        if self.verify and (got := file_md5(path)) != md5:
            raise self._not_official(str(path), got, md5)
        try:
            mat = scipy.io.loadmat(path, variable_names=["X", "y"])
        except Exception as e:  # SciPy raises ValueError, MatReadError, OSError... for a bad file
            raise DataError(
                f"{path} could not be read as a MATLAB file ({type(e).__name__}: {e}). The file is probably "
                "truncated or corrupt: replace it with a fresh copy of the official file."
            ) from e
        x, y = mat.get("X"), mat.get("y")
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            got_x = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else "missing"
            raise DataError(
                f"{path}: 'X' is {got_x}, SVHN has uint8 (32, 32, 3, N). Replace it with the official file."
            )
        if not isinstance(y, np.ndarray) or y.size != x.shape[3]:
            raise DataError(f"{path}: 'y' does not give one label per image ({x.shape[3]}). Replace the file.")
        labels = torch.as_tensor(y.reshape(-1).astype(np.int64))
        if bool(((labels < 1) | (labels > 10)).any()):
            bad = sorted({int(v) for v in labels[(labels < 1) | (labels > 10)].unique()})
            raise DataError(f"{path} holds labels {bad[:10]} outside 1..10 (10 = the digit 0). Replace the file.")
        labels[labels == 10] = 0
        images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))  # (H, W, C, N) -> (N, C, H, W)
        return images, labels, self.classes
