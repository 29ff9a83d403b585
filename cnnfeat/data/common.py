"""What cnnfeat's image DataModules share: where files and caches live, uint8 datasets, splits, batching.

Every DataModule here hands out ``(uint8 images (B,C,H,W), int64 labels)`` batches; the images become float32
in [0, 1] after the transfer to the device (a quarter of the bytes cross the bus), and only there, when asked
(``normalize=true``), standardised with the training images' per-channel mean and std. Models do their own
normalisation otherwise, as the lecture's SmallCNN does.

:class:`ImageDataModule` is the shared LightningDataModule base (datasets per split, loaders, ``images()``, the
device-side conversion); :class:`StandardizedImageDataModule` adds the per-channel statistics, optional
standardisation, train-time augmentation and a probe for the picture callbacks that always shows the images as
they are. Source files are never written to: decoded data, downloads and statistics go to a writable cache
(``data.cache_dir``, ``$CNNFEAT_CACHE`` or ``~/.cache/cnnfeat``).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import shutil
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cnnfeat.errors import ConfigError, DataError, check_bool, check_int
from cnnfeat.probe import ProbeSet, ProbeSpec
from cnnfeat.run import lightning_api as pl
from cnnfeat.run.atomic import atomic_write, is_disk_full, remove_orphans

log = logging.getLogger(__name__)

ENV_DATA = "CNNFEAT_DATA"
ENV_CACHE = "CNNFEAT_CACHE"
SPLITS = ("train", "val", "test")
DOWNLOAD_TIMEOUT_S = 30


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -- directories ------------------------------------------------------------------------------------------
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


def resolve_dirs(data_dir: str | os.PathLike | None, cache_dir: str | os.PathLike | None) -> tuple[Path, Path]:
    """``(data_dir, cache_dir)``: the given ones, else ``$CNNFEAT_DATA`` / the default cache."""
    env_dir = os.environ.get(ENV_DATA)
    data = Path(data_dir or env_dir or default_cache_dir()).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return data, cache


def check_data_dir(path: Path, holds: str) -> None:
    """Refuse a data directory that exists but is not a readable directory (a missing one is looked past)."""
    if path.exists() and not (path.is_dir() and os.access(path, os.R_OK | os.X_OK)):
        raise DataError(
            f"The data directory {path} (data.data_dir or {ENV_DATA}) is "
            f"{'not a directory' if not path.is_dir() else 'not readable by this user'}: point it at "
            f"the readable directory that holds {holds}."
        )


def missing_message(
    name: str,
    missing: Sequence[str],
    looked_for: str,
    searched: Sequence[Path],
    download_dir: Path,
    why: str,
    files: str,
    other_ways: Sequence[str] = (),
) -> str:
    """The offline message: which files are missing, where they were looked for, and every way to provide them."""
    ways = [
        f"put {files} in a directory and set data.data_dir=DIR or the environment variable {ENV_DATA}=DIR;",
        *other_ways,
        f"run once with internet access to download them into {download_dir}.",
    ]
    return (
        f"{name} files not found: {', '.join(missing)} ({looked_for} in {', '.join(str(d) for d in searched)} and "
        f"{download_dir}). {why}\nProvide the data in one of these ways:\n"
        + "\n".join(f"  {i}. {w}" for i, w in enumerate(ways, 1))
    )


def download(urls: Sequence[str], dest: Path, md5: str | None) -> Path:
    """Fetch ``dest`` from the first of ``urls`` that works (to a temporary name, checked by MD5, then renamed).

    Raises ``OSError`` listing every URL's failure; no partial file remains.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        part = dest.with_name(dest.name + ".part")
        try:
            log.info("Downloading %s", url)
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r, part.open("wb") as f:
                shutil.copyfileobj(r, f)
            got = file_md5(part)
            if md5 is not None and got != md5:
                raise OSError(f"MD5 {got} != {md5}")
            part.replace(dest)
            return dest
        except (OSError, urllib.error.URLError) as e:
            errors.append(f"{url}: {e}")
            part.unlink(missing_ok=True)
    raise OSError("; ".join(errors))


def file_md5(path: Path) -> str:
    """MD5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_bytes(path: Path) -> bytes:
    """A file's bytes; a permission problem is a message naming the file."""
    try:
        return path.read_bytes()
    except PermissionError as e:
        raise DataError(f"{path} cannot be read (permission denied): give this user read access to it.") from e


# -- IDX files (MNIST, Fashion-MNIST, KMNIST) -------------------------------------------------------------
#: the image and label files of the train and test splits (``.gz`` or plain)
IDX_STEMS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def decompress(path: Path) -> bytes:
    """A file's bytes, gunzipped when it is gzip; a truncated or corrupt file is a message naming it."""
    raw = read_bytes(path)
    try:
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(
            f"{path} could not be read or decompressed ({type(e).__name__}: {e}). The file is probably "
            "truncated or corrupt: replace it with a fresh copy of the official file."
        ) from e


def parse_idx(data: bytes, path: Path, images: bool, expected: Sequence[int | None], what: str) -> torch.Tensor:
    """The uint8 array of an IDX file's bytes, checking magic number, shape (``None``: any size) and length."""
    ndim = 3 if images else 1
    expected_magic = 0x0800 + ndim  # 0x08 = unsigned byte, then the number of dimensions
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise DataError(f"{path} is too short to be an IDX file ({len(data)} bytes).")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"{path} has IDX magic number {magic:#010x}, expected {expected_magic:#010x} "
            f"(uint8, {ndim}-d {'images' if images else 'labels'}). Is it the right file?"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    fits = all(e is None or d == e for d, e in zip(dims, expected, strict=True))
    if not fits or len(data) != header + math.prod(dims):
        shape = "(" + ", ".join("N" if e is None else str(e) for e in expected) + ("," if ndim == 1 else "") + ")"
        raise DataError(
            f"{path} holds an array of shape {tuple(dims)} in {len(data) - header} bytes; {what} needs shape "
            f"{shape}. The file is truncated or not {what}."
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims).clone()


# -- caches -----------------------------------------------------------------------------------------------
def fingerprint(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """``(resolved path, size, mtime_ns)`` of each file: a cache built from them is valid while these hold."""
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return out


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


def read_cache(path: Path, **expected: Any) -> dict | None:
    """The cache file's payload when it exists, loads, and has every ``expected`` key/value; else ``None``.

    ``verified`` is the exception: a cache built with verification serves a run without it, not the reverse.
    """
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, weights_only=True)
    except Exception:
        log.warning("Rebuilding unreadable cache file %s", path)
        return None
    for key, value in expected.items():
        if key == "verified":
            if cached.get("verified", False) < value:
                return None
        elif cached.get(key) != value:
            return None
    return cached


# -- tensors and datasets ---------------------------------------------------------------------------------
def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N,H,W) or (N,C,H,W) -> float32 (N,C,H,W) in [0, 1], as ``ToTensor`` would give."""
    if images.ndim == 3:
        images = images.unsqueeze(1)
    return images.to(torch.float32).div_(255.0)


class TensorImageDataset(Dataset):
    """uint8 images (N,H,W) or (N,C,H,W) and int64 labels in memory; a batch is one indexing op, not N PIL
    conversions (unless a per-image ``transform``, e.g. train-time augmentation, is given).

    ``indices`` maps dataset positions to rows of ``images`` so that a split keeps the original image IDs
    (``image_ids``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.images, self.labels = images, labels
        self.image_ids = torch.arange(len(images)) if indices is None else indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.image_ids[i]
        x = self.images[j]
        x = x.unsqueeze(0) if x.ndim == 2 else x
        return (self.transform(x) if self.transform is not None else x), self.labels[j]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.plain(indices)
        if self.transform is not None:
            x = torch.stack([self.transform(im) for im in x])
        return x, y

    def plain(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The images (B,C,H,W) and labels at dataset positions, without the ``transform``."""
        rows = self.image_ids[torch.as_tensor(indices, dtype=torch.long)]
        x = self.images[rows]
        return (x.unsqueeze(1) if x.ndim == 3 else x), self.labels[rows]


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``collate_fn`` for ``__getitems__`` datasets: the batch is already stacked."""
    return batch


def seeded_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_ids, val_ids)``: ``val_size`` of ``range(n)`` drawn with ``seed`` for validation, both sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def pixel_sums(images: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per image and channel, the exact integer sums of the uint8 values and of their squares: (N, C, 2) int64.

    Summed over any subset of images they give that subset's mean and std exactly (:func:`stats_from_sums`).
    """
    if images.ndim == 3:
        images = images.unsqueeze(1)
    out = torch.empty(len(images), images.shape[1], 2, dtype=torch.int64)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].flatten(2).to(torch.int64)
        out[start : start + chunk, :, 0] = x.sum(-1)
        out[start : start + chunk, :, 1] = (x * x).sum(-1)
    return out


def stats_from_sums(sums: torch.Tensor, pixels_per_image: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of images in [0, 1] from their :func:`pixel_sums`."""
    total = sums.sum(0).to(torch.float64)  # (C, 2), exact integers well below 2**53 for any realistic data set
    n = max(len(sums) * pixels_per_image, 1)
    mean = total[:, 0] / (255.0 * n)
    var = (total[:, 1] / (255.0**2 * n) - mean**2).clamp(min=0.0)
    return tuple(float(v) for v in mean), tuple(float(v) for v in var.sqrt())


def plain(value: Any) -> Any:
    """An OmegaConf container as plain lists and dicts (anything else as it is): what a DataModule records with
    ``save_hyperparameters`` goes into checkpoints, which are loaded with ``weights_only=True``."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


# -- augmentation -----------------------------------------------------------------------------------------
def build_augment(spec: Mapping[str, Any] | None, where: str = "data.augment") -> Callable | None:
    """A torchvision ``transforms.v2.Compose`` from ``{TransformName: {kwargs}}`` (in order); ``None`` if empty.

    Names are looked up in ``torchvision.transforms.v2`` only, e.g. ``{RandomHorizontalFlip: {}, RandomCrop: {size:
    32, padding: 4}}``. Each transform receives one uint8 image (C,H,W) and must return one of the same shape.
    """
    if spec is None or not len(spec):
        return None
    from omegaconf import OmegaConf
    from torchvision.transforms import v2

    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)  # type: ignore[assignment]
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"{where} must be a mapping of torchvision.transforms.v2 names to their arguments, e.g. "
            f"{{RandomHorizontalFlip: {{}}, RandomCrop: {{size: 32, padding: 4}}}}; got {spec!r}"
        )
    steps = []
    for name, kwargs in spec.items():
        cls = getattr(v2, str(name), None)
        if not (isinstance(cls, type) and issubclass(cls, v2.Transform)) or cls in (v2.Compose, v2.ToDtype):
            names = sorted(n for n in dir(v2) if n.startswith("Random") or n in ("ColorJitter", "GaussianBlur"))
            raise ConfigError(f"{where}.{name}: not a torchvision.transforms.v2 transform; e.g. {', '.join(names)}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ConfigError(f"{where}.{name} needs a mapping of arguments ({{}} for none), got {kwargs!r}")
        try:
            steps.append(cls(**dict(kwargs or {})))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}.{name}: {e}") from e
    return v2.Compose(steps)


def check_augment(augment: Callable, example: torch.Tensor, where: str = "data.augment") -> None:
    """Refuse an augmentation that does not map a uint8 image (C,H,W) to one of the same shape and dtype."""
    try:
        out = augment(example)
    except Exception as e:  # a transform that cannot take this image (e.g. a crop larger than the image)
        raise ConfigError(f"{where} fails on a {tuple(example.shape)} uint8 image: {type(e).__name__}: {e}") from e
    if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.shape != example.shape:
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{where} must turn a uint8 image {tuple(example.shape)} into one of the same shape and dtype, got {got} "
            "(normalisation is data.normalize, resizing is data.image_size)"
        )


def check_floats(name: str, values: Sequence[float] | None, channels: int, positive: bool = False) -> None:
    """Refuse ``data.<name>`` unless it is ``None`` or 1 or ``channels`` finite numbers (> 0 when ``positive``)."""
    if values is None:
        return
    ok = isinstance(values, Sequence) and len(values) in (1, channels)
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not ok or (positive and not all(v > 0 for v in values)):
        raise ConfigError(
            f"data.{name} must be a list of 1 or {channels} finite numbers{' > 0' if positive else ''}, got {values!r}"
        )


# -- the LightningDataModule base -------------------------------------------------------------------------
class ImageDataModule(pl.LightningDataModule):
    """Datasets of uint8 images per split behind the usual loaders; batches become float in [0, 1] on the device.

    Subclasses build ``self._data`` (``train``, ``val``, ``test``) in ``setup`` and set what a model needs to adapt
    itself: ``classes``, ``num_classes``, ``in_channels`` and ``image_size`` (square images of that side).
    """

    classes: tuple[str, ...] = ()
    num_classes: int
    in_channels: int
    image_size: int

    def __init__(self, batch_size: int, eval_batch_size: int, num_workers: int, pin_memory: bool) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            check_int(f"data.{name}", value)
        check_int("data.num_workers", num_workers, minimum=0)
        check_bool("data.pin_memory", pin_memory)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._data: dict[str, Any] = {}

    def dataset(self, split: str) -> Any:
        """The ``train``, ``val`` or ``test`` dataset (after ``setup``)."""
        if split not in SPLITS:
            raise ConfigError(f"Unknown split {split!r}; choose one of {SPLITS}")
        if not self._data:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run yet")
        return self._data[split]

    def images(
        self, split: str = "test", ids: Sequence[int] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images (N,C,H,W) in [0,1] and labels for image IDs of a split (all when ``ids`` is None), as they
        are: without augmentation or standardisation. IDs are the split's own positions."""
        ds = self.dataset(split)
        if ids is None:
            ids = torch.arange(len(ds))
        ids = torch.as_tensor(ids, dtype=torch.long)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(ds)):
            raise IndexError(
                f"Image IDs must be in [0, {len(ds) - 1}] for the {split} split, got "
                f"{ids[(ids < 0) | (ids >= len(ds))].tolist()}"
            )
        x, y = ds.plain(ids.tolist())
        return to_float(x), y

    def loader_workers(self, split: str) -> int:
        """DataLoader workers for a split (subclasses that batch from memory may need none)."""
        return self.num_workers

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        workers = self.loader_workers(split)
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=keep_batch,
            num_workers=workers,
            pin_memory=self.pin_memory,
            # workers start anew each epoch: a persistent iterator draws its seed from the global RNG once, so a
            # resumed fit (a new iterator mid-run) drew one number more and shuffled its next epochs differently
            persistent_workers=False,
        )

    def has_val(self) -> bool:
        """Whether there is a validation split (``val_dataloader`` returns ``[]`` otherwise)."""
        return len(self.dataset("val")) > 0

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_val():
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
            return self.model_inputs(to_float(batch[0])), batch[1]
        return batch

    def model_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the model receives for float images in [0, 1] (themselves here)."""
        return images


class StandardizedImageDataModule(ImageDataModule):
    """An :class:`ImageDataModule` that knows its training images' per-channel ``mean`` and ``std``.

    ``mean``/``std`` are given, or computed from the training split (exactly, from per-image integer sums kept in
    the cache). ``normalize=True`` standardises batches on the device with them; the probe for the picture callbacks
    (``probe_set``) always shows the images as they are, and gives the model what it receives in training. ``augment``
    (see :func:`build_augment`) applies to the training split only.
    """

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int,
        pin_memory: bool,
        normalize: bool,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        augment: Mapping[str, Any] | None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        check_bool("data.normalize", normalize)
        if (mean is None) != (std is None):
            raise ConfigError(f"give both data.mean and data.std (or neither), got mean={mean!r}, std={std!r}")
        self.normalize = normalize
        self._given_stats = (mean, std) if mean is not None else None
        self.augment = build_augment(augment)
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None

    def _check_given_stats(self) -> None:
        if self._given_stats is not None:
            mean, std = self._given_stats
            check_floats("mean", mean, self.in_channels)
            check_floats("std", std, self.in_channels, positive=True)

    def set_stats(self, computed: Callable[[], tuple[tuple[float, ...], tuple[float, ...]]]) -> None:
        """``mean``/``std``: the given ones (one value for every channel, or one each), else ``computed()``."""
        if self._given_stats is not None:
            mean, std = (tuple(float(v) for v in s) for s in self._given_stats)
        else:
            mean, std = computed()
        c = self.in_channels
        self.mean, self.std = (mean * c if len(mean) == 1 else mean), (std * c if len(std) == 1 else std)
        if self.normalize and not all(s > 0 for s in self.std):
            raise DataError(
                f"{type(self).__name__}: a channel of the training images is constant (std {self.std}); "
                "give data.mean and data.std, or set data.normalize=false"
            )

    def model_inputs(self, images: torch.Tensor) -> torch.Tensor:
        if not self.normalize:
            return images
        if self.mean is None or self.std is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run yet")
        shape = (1, len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, device=images.device).view(shape)
        std = torch.tensor(self.std, device=images.device).view(shape)
        return (images - mean) / std

    def probe_set(self, spec: ProbeSpec) -> ProbeSet:
        """The first ``spec.max_images`` images of a split for the picture callbacks: as they are (no augmentation,
        no standardisation) and as the model receives them. ``spec.mean``/``std`` are not needed: this DataModule
        knows its own."""
        split, note = spec.split, ""
        if split == "test" and not len(self.dataset("test")) and len(self.dataset("val")):
            split = "val"
            note = (
                "the data has no test images; the picture callbacks use the validation split instead (its image IDs "
                "are positions in the validation set)"
            )
        size = len(self.dataset(split))
        n = min(size, spec.max_images)
        if n == 0:
            raise ConfigError(f"{type(self).__name__} has no {spec.split} images to draw probe images from")
        images, labels = self.images(split, torch.arange(n))
        names = tuple(self.classes) or tuple(str(i) for i in range(self.num_classes))
        return ProbeSet(images, self.model_inputs(images), labels, names, torch.arange(n), split, size, note=note)
