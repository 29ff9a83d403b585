"""Your own images in torchvision's ``ImageFolder`` layout: one folder per class, any size, grey or colour.

Layout: ``root/<class>/**/<image>``, split per class with ``split_seed`` into train / val / test
(``val_fraction``, ``test_fraction``); or ``root/train/<class>/...`` with ``root/val/`` and ``root/test/`` where
present (a missing one is drawn from ``train/`` the same way). The classes are ``train/``'s folder names, sorted
(ImageFolder's order and indices); ``val/`` and ``test/`` may lack a class but not add one. Hidden files and
folders are skipped; every other file in a class folder must be an image Pillow reads (PNG, JPEG, WebP, ...).

Each image becomes ``in_channels`` channels (``1``: grey, ``3``: RGB; 16-bit grey scaled to 8 bits) and
``image_size`` x ``image_size`` pixels (torchvision's ``Resize(image_size)`` + ``CenterCrop(image_size)`` on the
PIL image), as uint8. Unset, ``in_channels`` is what the images are (grey and colour mixed is refused) and
``image_size`` their common size (different sizes are refused); images smaller than ``image_size`` are refused,
never enlarged.

Scanning reads every file's header once (cached by size and modification time) and collects every problem into
one message naming the files or folders. Then one pass decodes every image (with progress, in ``num_workers``
processes), which proves that each one decodes and takes its pixel sums (the per-channel ``mean``/``std`` of the
training split follow exactly). A set whose decoded pixels fit in ``max_memory_mb`` keeps them in a uint8 cache
file and is batched from memory, like Fashion-MNIST; a larger one is decoded again on access in DataLoader
workers. Nothing is written into ``root``.

The config reads the data set's facts at composition time through the ``${image_folder:KEY}`` resolver (KEY:
``num_classes``, ``in_channels``, ``image_size``), so that a model config can say ``${data.num_classes}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF

from cnnfeat.data.common import (
    StandardizedImageDataModule,
    TensorImageDataset,
    check_augment,
    check_cache_dir,
    default_cache_dir,
    keep_batch,
    plain,
    read_cache,
    stats_from_sums,
    to_float,
    write_cache,
)
from cnnfeat.errors import CnnfeatError, ConfigError, DataError, check_int
from cnnfeat.run.progress import task_progress

log = logging.getLogger(__name__)

SPLIT_DIRS = ("train", "val", "test")
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_SIXTEEN_BIT = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_SCAN_VERSION = 1
_DECODE_VERSION = 1
#: files named in a message, per problem (the count is always given)
_SHOW = 8


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _listing(items: Sequence[str], show: int = _SHOW) -> str:
    shown = ", ".join(items[:show])
    return shown + (f" and {len(items) - show} more" if len(items) > show else "")


# -- decoding one image -----------------------------------------------------------------------------------
def load_image(path: Path, in_channels: int, image_size: int) -> np.ndarray:
    """One image as uint8 (S, S, C): ``in_channels`` channels, resized (shorter side) and centre-cropped to
    ``image_size`` exactly as torchvision's ``Resize`` + ``CenterCrop`` do on the PIL image. A file that does not
    decode is a :class:`DataError` naming it."""
    try:
        with Image.open(path) as im:
            if im.mode in _SIXTEEN_BIT:  # Pillow's convert("L") would clip at 255
                wide = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
            im = im.convert("L" if in_channels == 1 else "RGB")
            if im.size != (image_size, image_size):
                im = TF.center_crop(TF.resize(im, image_size), image_size)
            arr = np.array(im)  # a writable copy, as torchvision's PILToTensor makes
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... for a bad file
        raise DataError(f"{path} could not be decoded ({type(e).__name__}: {e}): it is truncated or corrupt.") from e
    return arr[:, :, None] if arr.ndim == 2 else arr


def _header(path: Path) -> tuple[str, int, int] | str:
    """``(mode, width, height)`` from the file's header, or why it is not an image."""
    try:
        with Image.open(path) as im:
            return im.mode, im.width, im.height
    except Exception as e:  # not an image, or one Pillow cannot identify
        return f"{type(e).__name__}: {e}"


# -- scanning the folder ----------------------------------------------------------------------------------
@dataclass
class FolderIndex:
    """What scanning found: classes, files per split with labels, each file's header, and the problems."""

    root: Path
    layout: str  # "classes" (root/<class>) or "splits" (root/train/<class>, ...)
    classes: tuple[str, ...]
    files: list[str]  # every image, relative to root, in ImageFolder's order (split folders in train/val/test order)
    labels: list[int]
    groups: dict[str, list[int]]  # "all" or a split folder -> positions in ``files``
    headers: dict[str, tuple[str, int, int]]
    stat: dict[str, tuple[int, int]]  # file -> (size, mtime_ns)
    problems: list[str] = field(default_factory=list)

    def modes(self) -> tuple[list[str], list[str]]:
        """(grey files, colour files)."""
        grey = [f for f in self.files if self.headers[f][0] in GREY_MODES]
        colour = [f for f in self.files if self.headers[f][0] not in GREY_MODES]
        return grey, colour

    def source(self) -> list[tuple[str, int, int]]:
        return [(f, *self.stat[f]) for f in self.files]


def _cache_root(root: Path, cache_dir: Path) -> Path:
    resolved = str(root.resolve())
    return cache_dir / "image_folder" / f"{root.resolve().name}-{hashlib.sha1(resolved.encode()).hexdigest()[:12]}"


def _walk_class(class_dir: Path, root: Path) -> list[str]:
    """Files under a class folder in ImageFolder's order (sorted walk, sorted names), hidden ones skipped."""
    out = []
    for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=True)):
        if any(_hidden(part) for part in Path(dirpath).relative_to(class_dir).parts):
            continue
        for name in sorted(filenames):
            if not _hidden(name):
                out.append((Path(dirpath) / name).relative_to(root).as_posix())
    return out


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if not _hidden(e.name) and e.is_dir())


def _layout(root: Path) -> tuple[str, list[str]]:
    """``("splits", [split folders])`` when ``root/train`` exists, else ``("classes", ["."])``."""
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise DataError(
            f"data.root={root} {what}: point it at a folder with one folder of images per class (or train/, val/, "
            "test/ folders of class folders)."
        )
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"data.root={root} is not readable by this user.")
    names = _subdirs(root)
    if "train" in names:
        return "splits", [s for s in SPLIT_DIRS if s in names]
    return "classes", ["."]


def scan_folder(root: Path, cache_dir: Path | None = None, progress: bool = True) -> FolderIndex:
    """Index ``root``: classes, files and labels, every file's header (cached in ``cache_dir`` by size and
    modification time), and the problems that make the folder unusable whatever the settings."""
    root = Path(root).expanduser()
    layout, groups_dirs = _layout(root)
    problems: list[str] = []
    per_group: dict[str, dict[str, list[str]]] = {}
    for g in groups_dirs:
        base = root / g
        per_group[g] = {c: _walk_class(base / c, root) for c in _subdirs(base)}
    if layout == "splits":
        extra = [n for n in _subdirs(root) if n not in SPLIT_DIRS]
        if extra:
            problems.append(
                f"{root} has a train/ folder, so its folders must be train/, val/ and test/ (each with one folder per "
                f"class), but it also holds {_listing([n + '/' for n in extra])}: move them, or point data.root at "
                "a folder of class folders"
            )
    first = groups_dirs[0]
    classes = tuple(per_group[first])
    if not classes:
        where = root / first if layout == "splits" else root
        also = f" ({problems[0]})" if problems else ""  # e.g. a class folder named train/ beside the other classes
        raise DataError(
            f"{where} holds no class folders: put the images of each class in a folder named after it.{also}"
        )
    empty = [f"{(Path(g) / c).as_posix()}/" for g, cls in per_group.items() for c, fs in cls.items() if not fs]
    if empty:
        problems.append(f"{len(empty)} class folder(s) hold no files: {_listing(empty)} (under {root})")
    for g in groups_dirs[1:]:
        unknown = [c for c in per_group[g] if c not in classes]
        if unknown:
            problems.append(
                f"{root / g} has class folder(s) that {root / first} lacks: {_listing(unknown)} (a model trained on "
                f"{first}/ cannot predict them; add training images or remove the folders)"
            )
    index_of = {c: i for i, c in enumerate(classes)}
    files, labels, groups = [], [], {}
    for g in groups_dirs:
        key = "all" if layout == "classes" else g
        groups[key] = []
        for c, fs in per_group[g].items():
            if c not in index_of:
                continue
            for f in fs:
                groups[key].append(len(files))
                files.append(f)
                labels.append(index_of[c])
    stat = {}
    for f in files:
        st = (root / f).stat()
        stat[f] = (st.st_size, st.st_mtime_ns)
    headers, unreadable = _headers(root, files, stat, cache_dir, progress)
    if unreadable:
        problems.append(
            f"{len(unreadable)} file(s) are not images Pillow can read (remove or convert them): "
            + _listing([f"{f} ({why})" for f, why in unreadable], 4)
        )
    floats = [f for f in files if f in headers and headers[f][0] == "F"]
    if floats:  # Pillow's convert() truncates them to integers: [0, 1] pixels would all become black
        problems.append(
            f"{len(floats)} file(s) hold 32-bit floating-point pixels (mode F), whose range cnnfeat cannot know "
            f"([0, 1]? [0, 255]?): save them as 8- or 16-bit images: {_listing(floats, 4)}"
        )
    bad = {f for f, _ in unreadable}
    if bad:
        keep = [i for i, f in enumerate(files) if f not in bad]
        remap = {old: new for new, old in enumerate(keep)}
        groups = {g: [remap[i] for i in ids if i in remap] for g, ids in groups.items()}
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    return FolderIndex(root, layout, classes, files, labels, groups, headers, stat, problems)


def _headers(
    root: Path, files: list[str], stat: dict[str, tuple[int, int]], cache_dir: Path | None, progress: bool
) -> tuple[dict[str, tuple[str, int, int]], list[tuple[str, str]]]:
    """Every file's ``(mode, width, height)``, read from its header unless the cache has it for the same size and
    modification time; the files that are not images, with why."""
    cache_file = _cache_root(root, cache_dir) / "scan.pt" if cache_dir is not None else None
    known: dict[str, Any] = {}
    if cache_file is not None:
        cached = read_cache(cache_file, version=_SCAN_VERSION, root=str(root.resolve()))
        known = cached["entries"] if cached else {}
    entries: dict[str, Any] = {}
    todo = []
    for f in files:
        hit = known.get(f)
        if hit is not None and tuple(hit[:2]) == stat[f]:
            entries[f] = hit
        else:
            todo.append(f)
    if todo:
        with task_progress(f"Scanning {root}", len(todo), "files", terminal=None if progress else False) as advance:
            for f in todo:
                h = _header(root / f)
                entries[f] = (*stat[f], list(h) if isinstance(h, tuple) else h)
                advance(1)
        if cache_file is not None:
            try:
                check_cache_dir(cache_file.parent)
                write_cache(
                    cache_file, {"version": _SCAN_VERSION, "root": str(root.resolve()), "entries": entries}, "scan"
                )
            except DataError as e:  # the index only saves time next run
                log.warning("%s", e)
    headers: dict[str, tuple[str, int, int]] = {}
    unreadable = []
    for f in files:
        h = entries[f][2]
        if isinstance(h, str):
            unreadable.append((f, h))
        else:
            headers[f] = (str(h[0]), int(h[1]), int(h[2]))
    return headers, unreadable


def _raise_problems(root: Path, problems: list[str]) -> None:
    if problems:
        raise DataError(f"The image folder {root} cannot be used:\n" + "\n".join(f"  - {p}" for p in problems))


def detect_channels(index: FolderIndex) -> int:
    """1 when every image is grey, 3 when every image is colour; mixed is a :class:`DataError` naming files."""
    grey, colour = index.modes()
    if grey and colour:
        few, kind = (grey, "grey") if len(grey) <= len(colour) else (colour, "colour")
        raise DataError(
            f"The image folder {index.root} mixes grey and colour images ({len(grey)} grey, {len(colour)} colour; "
            f"the {kind} ones: {_listing(few)}). Set data.in_channels=3 to read all of them as RGB, or "
            "data.in_channels=1 to read all of them as grey."
        )
    return 1 if grey else 3


def detect_size(index: FolderIndex) -> int:
    """The side of the images when all are square and of one size; otherwise a :class:`DataError` with the sizes."""
    by_size: dict[tuple[int, int], list[str]] = {}
    for f in index.files:
        by_size.setdefault(index.headers[f][1:], []).append(f)
    if len(by_size) == 1:
        ((w, h),) = by_size
        if w == h:
            return w
    smallest = min(min(s) for s in by_size)
    sizes = sorted(by_size.items(), key=lambda kv: -len(kv[1]))
    shown = "; ".join(f"{w}x{h}: {len(fs)} file(s), e.g. {fs[0]}" for (w, h), fs in sizes[:4])
    raise DataError(
        f"The images in {index.root} are not all square and of one size ({len(by_size)} size(s): {shown}"
        f"{'; ...' if len(sizes) > 4 else ''}). Set data.image_size=N to resize (shorter side) and centre-crop "
        f"every image to N x N (N <= {smallest}, the smallest side found)."
    )


def too_small(index: FolderIndex, image_size: int) -> list[str]:
    """Files whose shorter side is below ``image_size`` (they would have to be enlarged)."""
    return [f"{f} ({w}x{h})" for f in index.files for w, h in [index.headers[f][1:]] if min(w, h) < image_size]


# -- config-time facts ------------------------------------------------------------------------------------
FACTS = ("num_classes", "in_channels", "image_size")
_FACTS_MEMO: dict[tuple[str, str], tuple[tuple, dict[str, int | None]]] = {}


def _signature(root: Path) -> tuple:
    """Modification times of root, its folders, and the class folders inside train/, val/, test/: adding or removing
    an image in a class folder changes them (used to reuse facts within one process without listing every file)."""
    sig = [(str(root), root.stat().st_mtime_ns)]
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.is_dir():
            sig.append((e.path, e.stat().st_mtime_ns))
            if e.name in SPLIT_DIRS:
                sig.extend((c.path, c.stat().st_mtime_ns) for c in os.scandir(e.path) if c.is_dir())
    return tuple(sorted(sig))


def folder_facts(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict[str, int | None]:
    """``num_classes``, ``in_channels`` and ``image_size`` of an image folder (``None`` for one that cannot be told:
    mixed grey/colour, several sizes), from a scan; reused within a process while the folders are unchanged."""
    root = Path(root).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = (str(root.resolve()), str(cache))
    sig = _signature(root) if root.is_dir() else ()
    memo = _FACTS_MEMO.get(key)
    if memo is not None and memo[0] == sig:
        return memo[1]
    index = scan_folder(root, cache, progress=True)
    facts: dict[str, int | None] = {"num_classes": len(index.classes), "in_channels": None, "image_size": None}
    if index.files:
        for name, detect in (("in_channels", detect_channels), ("image_size", detect_size)):
            with contextlib.suppress(DataError):  # the DataModule says why, naming the files
                facts[name] = detect(index)
    _FACTS_MEMO[key] = (sig, facts)
    return facts


def _resolve_fact(key: str, *, _parent_: Any) -> int | None:
    """``${image_folder:KEY}`` in a data config: the fact of the folder at ``data.root``; ``None`` when it cannot
    be told (the DataModule then says why, naming the files)."""
    if key not in FACTS:
        raise ConfigError(f"${{image_folder:{key}}}: KEY must be one of {', '.join(FACTS)}")
    root = _parent_.get("root")
    if root is None:
        return None
    try:
        return folder_facts(root, _parent_.get("cache_dir"))[key]
    except (CnnfeatError, OSError):
        return None


OmegaConf.register_new_resolver("image_folder", _resolve_fact, replace=True)


# -- datasets ---------------------------------------------------------------------------------------------
class FolderImageDataset(Dataset):
    """Image files decoded on access (in DataLoader workers) into uint8 (C, S, S), then ``transform`` (augmentation)."""

    def __init__(
        self,
        root: Path,
        files: Sequence[str],
        labels: torch.Tensor,
        in_channels: int,
        image_size: int,
        transform: Any = None,
    ) -> None:
        self.root, self.files, self.labels = root, list(files), labels
        self.in_channels, self.image_size, self.transform = in_channels, image_size, transform
        self.image_ids = torch.arange(len(self.files))

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> torch.Tensor:
        arr = load_image(self.root / self.files[i], self.in_channels, self.image_size)
        return torch.from_numpy(arr).permute(2, 0, 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._load(i)
        return (self.transform(x) if self.transform is not None else x), self.labels[i]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        xs = [self._load(i) for i in indices]
        if self.transform is not None:
            xs = [self.transform(x) for x in xs]
        return torch.stack(xs), self.labels[torch.as_tensor(indices, dtype=torch.long)]

    def plain(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The images (B,C,S,S) and labels at dataset positions, without the ``transform``."""
        xs = [self._load(i) for i in indices]
        shape = (0, self.in_channels, self.image_size, self.image_size)
        x = torch.stack(xs) if xs else torch.empty(shape, dtype=torch.uint8)
        return x, self.labels[torch.as_tensor(indices, dtype=torch.long)]


class _Plain(Dataset):
    """A dataset's ``plain`` items one by one (to fetch un-augmented images through a DataLoader's workers)."""

    def __init__(self, ds: FolderImageDataset, ids: Sequence[int]) -> None:
        self.ds, self.ids = ds, list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitems__(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ds.plain([self.ids[p] for p in positions])


class _Decode(Dataset):
    """The one-off pass over a batch of files: (positions, uint8 (B,C,S,S) or None, pixel sums (B,C,2), errors).

    Batched, so that a worker hands back three tensors per batch rather than two per image (each tensor crossing
    processes costs a shared-memory handle). A file that does not decode leaves zeros and its error.
    """

    def __init__(self, root: Path, files: Sequence[str], in_channels: int, image_size: int, keep: bool) -> None:
        self.root, self.files, self.in_channels, self.image_size, self.keep = root, files, in_channels, image_size, keep

    def __len__(self) -> int:
        return len(self.files)

    def __getitems__(
        self, indices: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[tuple[int, str]]]:
        c, s = self.in_channels, self.image_size
        pixels = torch.zeros((len(indices), c, s, s), dtype=torch.uint8) if self.keep else None
        sums = torch.zeros((len(indices), c, 2), dtype=torch.int64)
        errors = []
        for k, i in enumerate(indices):
            try:
                arr = load_image(self.root / self.files[i], c, s)
            except DataError as e:
                why = e.__cause__ or e
                errors.append((i, f"{type(why).__name__}: {why}"))
                continue
            x = torch.from_numpy(arr).permute(2, 0, 1)
            flat = x.reshape(c, -1).to(torch.int64)
            sums[k, :, 0], sums[k, :, 1] = flat.sum(1), (flat * flat).sum(1)
            if pixels is not None:
                pixels[k] = x
        return torch.as_tensor(indices, dtype=torch.long), pixels, sums, errors


# -- the DataModule ---------------------------------------------------------------------------------------
class ImageFolderDataModule(StandardizedImageDataModule):
    """Your images in class folders (see the module docstring): ``(uint8 images (B,C,S,S), labels)`` batches that
    become float32 in [0, 1] on the device (standardised there with the training split's ``mean``/``std`` when
    ``normalize=true``).

    Args:
        root: the folder of class folders (or of ``train/``, ``val/``, ``test/`` folders of class folders).
        image_size: side of the square images the model gets (resize + centre crop); ``None``: the images' own.
        in_channels: 1 (grey) or 3 (RGB); ``None``: what the images are.
        num_classes: checked against the class folders when given (configs fill it in for model configs).
        val_fraction, test_fraction: of each class, drawn with ``split_seed`` when ``val/`` / ``test/`` is absent.
        in_memory: ``True``/``False``, or ``"auto"``: decoded pixels up to ``max_memory_mb`` stay in memory.
        num_workers: processes decoding images (``None``: up to 4, as many as the CPUs allow).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        image_size: int | None = None,
        in_channels: int | None = None,
        num_classes: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        in_memory: bool | str = "auto",
        max_memory_mb: int = 2048,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int | None = None,
        pin_memory: bool = False,
        normalize: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: Mapping[str, Any] | None = None,
    ) -> None:
        mean, std, augment = plain(mean), plain(std), plain(augment)  # recorded by save_hyperparameters below
        if num_workers is None:
            num_workers = min(
                4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            )
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, normalize, mean, std, augment)
        if root is None or str(root) in ("", "???"):
            raise ConfigError(
                "data.root is required: the folder with one folder of images per class (or train/, val/, test/ "
                "folders of class folders), e.g. data.root=~/pictures/flowers"
            )
        check_int("data.image_size", image_size, allow_none=True)
        if in_channels not in (None, 1, 3) or isinstance(in_channels, bool):
            raise ConfigError(
                f"data.in_channels must be 1 (grey), 3 (RGB) or null (what the images are), got {in_channels!r}"
            )
        check_int("data.num_classes", num_classes, allow_none=True)
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 <= frac < 1:
                raise ConfigError(f"data.{name} must be a number in [0, 1), got {frac!r}")
        if val_fraction + test_fraction >= 1:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction must be below 1 (training needs images), got "
                f"{val_fraction} + {test_fraction}"
            )
        if isinstance(split_seed, bool) or not isinstance(split_seed, int):
            raise ConfigError(f"data.split_seed must be an integer, got {split_seed!r}")
        if in_memory not in (True, False, "auto"):
            raise ConfigError(f"data.in_memory must be true, false or auto, got {in_memory!r}")
        check_int("data.max_memory_mb", max_memory_mb, minimum=0)
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.val_fraction, self.test_fraction, self.split_seed = float(val_fraction), float(test_fraction), split_seed
        self.in_memory_setting, self.max_memory_mb = in_memory, max_memory_mb
        self._index: FolderIndex | None = None
        self._splits: dict[str, list[int]] = {}
        self._given = {"image_size": image_size, "in_channels": in_channels, "num_classes": num_classes}
        if None in self._given.values():
            self._settle(self.scan())
        else:
            self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes  # type: ignore[assignment]
            self.classes = ()
        self._check_given_stats()

    # -- scanning ------------------------------------------------------------------------------------
    def scan(self) -> FolderIndex:
        """Scan ``root`` (once per instance) and refuse a folder with problems, naming the files or folders."""
        if self._index is None:
            index = scan_folder(self.root, self.cache_dir)
            _raise_problems(index.root, index.problems)
            self._index = index
        return self._index

    def _settle(self, index: FolderIndex) -> None:
        """Set ``classes``, ``num_classes``, ``in_channels`` and ``image_size`` from the scan and the given values;
        refuse given values the folder contradicts and images smaller than ``image_size``."""
        given = self._given
        self.classes = index.classes
        if given["num_classes"] is not None and given["num_classes"] != len(index.classes):
            raise ConfigError(
                f"data.num_classes={given['num_classes']}, but {index.root} has {len(index.classes)} class folders "
                f"({_listing(list(index.classes))}); leave data.num_classes unset to take the folders' count"
            )
        self.num_classes = len(index.classes)
        self.in_channels = given["in_channels"] or detect_channels(index)
        self.image_size = given["image_size"] or detect_size(index)
        small = too_small(index, self.image_size)
        if small:
            raise DataError(
                f"{len(small)} image(s) in {index.root} are smaller than data.image_size={self.image_size} (they would "
                f"have to be enlarged): {_listing(small)}. Lower data.image_size or remove them."
            )

    def _assign_splits(self, index: FolderIndex) -> dict[str, list[int]]:
        """Positions in ``index.files`` of each split: the split folders, the rest drawn per class with the seed."""
        if index.layout == "classes":
            pool, need = index.groups["all"], {"val": self.val_fraction, "test": self.test_fraction}
            splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        else:
            pool = index.groups["train"]
            splits = {"train": [], "val": list(index.groups.get("val", [])), "test": list(index.groups.get("test", []))}
            need = {
                s: f for s, f in (("val", self.val_fraction), ("test", self.test_fraction)) if s not in index.groups
            }
        g = torch.Generator().manual_seed(self.split_seed)
        by_class: dict[int, list[int]] = {}
        for pos in pool:
            by_class.setdefault(index.labels[pos], []).append(pos)
        missing: dict[str, list[str]] = {}
        for label in sorted(by_class):
            members = by_class[label]
            perm = torch.randperm(len(members), generator=g).tolist()
            start = 0
            for split in ("test", "val"):
                if split in need:
                    # at least one image of every class where the class can spare it (training keeps one)
                    want = max(round(need[split] * len(members)), 1 if need[split] > 0 else 0)
                    k = min(want, max(len(members) - 1 - start, 0))
                    if k == 0 and need[split] > 0:
                        missing.setdefault(split, []).append(index.classes[label])
                    splits[split].extend(members[p] for p in perm[start : start + k])
                    start += k
            splits["train"].extend(members[p] for p in perm[start:])
        for split, names in missing.items():
            log.warning(
                "%d class(es) have too few images to give the %s split one (training keeps at least one): %s",
                len(names),
                split,
                _listing(names),
            )
        return {s: sorted(ids) for s, ids in splits.items()}

    # -- files ---------------------------------------------------------------------------------------
    @property
    def cache_root(self) -> Path:
        """This folder's directory in the cache (scan index, decoded pixels, pixel sums)."""
        return _cache_root(self.root, self.cache_dir)

    def decoded_bytes(self) -> int:
        """Bytes of every image decoded at the configured size."""
        return len(self.scan().files) * self.in_channels * self.image_size**2

    @property
    def in_memory(self) -> bool:
        """Whether the decoded images are kept in memory (``in_memory``, or ``auto`` and small enough)."""
        if self.in_memory_setting != "auto":
            return bool(self.in_memory_setting)
        return self.decoded_bytes() <= self.max_memory_mb * 2**20

    def _decoded_file(self) -> Path:
        kind = "pixels" if self.in_memory else "sums"
        return self.cache_root / f"{kind}-c{self.in_channels}-s{self.image_size}.pt"

    def prepare_data(self) -> None:
        """Scan the folder, then decode every image once (pixels cached for the in-memory path, pixel sums for both);
        every file that does not decode is named in one message."""
        check_cache_dir(self.cache_dir)
        index = self.scan()
        self._settle(index)
        path, source = self._decoded_file(), index.source()
        settings = {"in_channels": self.in_channels, "image_size": self.image_size}
        if read_cache(path, version=_DECODE_VERSION, source=source, settings=settings) is not None:
            return
        keep = self.in_memory
        n, c, s = len(index.files), self.in_channels, self.image_size
        pixels = torch.empty((n, c, s, s), dtype=torch.uint8) if keep else None
        sums = torch.zeros((n, c, 2), dtype=torch.int64)
        failed: list[str] = []
        loader = DataLoader(
            _Decode(index.root, index.files, c, s, keep),
            batch_size=64,
            num_workers=self.num_workers,
            collate_fn=keep_batch,
            generator=torch.Generator(),  # its own: the global RNG must not move only on a cold cache
        )
        what = f"Decoding {index.root} ({'into memory' if keep else 'checking every image'})"
        with task_progress(what, n, "images") as advance:
            for ids, x, sm, errors in loader:
                failed.extend(f"{index.files[i]} ({why})" for i, why in errors)
                if pixels is not None:
                    pixels[ids] = x
                sums[ids] = sm
                advance(len(ids))
        if failed:
            raise DataError(
                f"{len(failed)} image(s) in {index.root} could not be decoded (truncated or corrupt; remove or replace "
                f"them): {_listing(failed, 4)}"
            )
        payload = {"version": _DECODE_VERSION, "source": source, "settings": settings, "sums": sums}
        if pixels is not None:
            payload["images"] = pixels
        write_cache(path, payload, f"decoded {index.root}")

    # -- datasets ------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Build the train/val/test datasets from the scan and the cache written by ``prepare_data`` (idempotent)."""
        if self._data:
            return
        index = self.scan()
        self._settle(index)
        path, source = self._decoded_file(), index.source()
        settings = {"in_channels": self.in_channels, "image_size": self.image_size}
        cached = read_cache(path, version=_DECODE_VERSION, source=source, settings=settings)
        if cached is None:
            raise DataError(
                f"{path} is missing or was built from other files: call prepare_data() before setup() (Trainer does)."
            )
        self._splits = self._assign_splits(index)
        labels = torch.tensor(index.labels, dtype=torch.int64)
        for split, ids in self._splits.items():
            transform = self.augment if split == "train" else None
            if "images" in cached:
                self._data[split] = TensorImageDataset(
                    cached["images"], labels, torch.tensor(ids, dtype=torch.long), transform
                )
            else:
                files = [index.files[i] for i in ids]
                self._data[split] = FolderImageDataset(
                    index.root, files, labels[ids], self.in_channels, self.image_size, transform
                )
        if not len(self._data["train"]):
            raise DataError(f"{index.root}: no training images (the train split is empty).")
        if self.augment is not None:
            check_augment(self.augment, self._data["train"].plain([0])[0][0])
        train_ids = torch.tensor(self._splits["train"], dtype=torch.long)
        self.set_stats(lambda: stats_from_sums(cached["sums"][train_ids], self.image_size**2))
        counts = {s: len(d) for s, d in self._data.items()}
        log.info(
            "%s: %d classes, %s images (train/val/test), %dx%dx%d, %s",
            index.root,
            self.num_classes,
            "/".join(str(counts[s]) for s in ("train", "val", "test")),
            self.in_channels,
            self.image_size,
            self.image_size,
            "in memory" if "images" in cached else f"decoded on access by {self.num_workers} worker(s)",
        )

    def files(self, split: str) -> list[Path]:
        """The image files of a split, in the order of its image IDs."""
        index = self.scan()
        self.dataset(split)
        return [index.root / index.files[i] for i in self._splits[split]]

    def has_val(self) -> bool:
        return len(self.dataset("val")) > 0

    def test_dataloader(self) -> DataLoader | list:  # type: ignore[override]
        return self._loader("test", self.eval_batch_size, shuffle=False) if len(self.dataset("test")) else []

    def loader_workers(self, split: str) -> int:
        """In memory, a batch is one indexing op: workers help only when per-image augmentation runs."""
        if isinstance(self._data.get(split), TensorImageDataset):
            return self.num_workers if split == "train" and self.augment is not None else 0
        return self.num_workers

    def images(
        self, split: str = "test", ids: Sequence[int] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images (N,C,S,S) in [0,1] and labels of a split as they are (no augmentation or standardisation);
        files are decoded in the DataLoader workers."""
        ds = self.dataset(split)
        if isinstance(ds, TensorImageDataset) or self.num_workers == 0:
            return super().images(split, ids)
        ids = torch.arange(len(ds)) if ids is None else torch.as_tensor(ids, dtype=torch.long)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(ds)):
            super().images(split, ids)  # raises the IndexError naming the bad IDs
        if not len(ids):
            return super().images(split, ids)
        loader = DataLoader(
            _Plain(ds, ids.tolist()),
            batch_size=64,
            num_workers=self.num_workers,
            collate_fn=keep_batch,
            generator=torch.Generator(),  # its own: reading pictures must not move the training's RNG
        )
        xs, ys = zip(*loader, strict=True)
        return to_float(torch.cat(xs)), torch.cat(ys)
