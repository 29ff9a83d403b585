"""A run's static HTML report: an overview page and one page per layer with a card for every unit.

    cnnfeat-report outputs/runs/DATE/TIME-PID            # -> outputs/runs/DATE/TIME-PID/report/index.html
    cnnfeat-report outputs/runs/DATE/TIME-PID -o DIR     # -> DIR/index.html (DIR: new, empty, or a previous report)
    cnnfeat-report outputs/multirun/DATE/TIME-PID        # every job's report, and an index of the jobs side by side

Everything is read from the run directory: ``status.json``, the config (``.hydra/``, else Lightning's
``hparams.yaml``), the TensorBoard event files (scalars; the images of the representation callbacks, found by tag
prefix), ``umap_embedding.gif``, the atlas (``cnnfeat.atlas``, written by ``AtlasCallback``) and ``explored.json``
(``cnnfeat-explore``: which epochs it drew). Only regular files inside the run directory are read: a symbolic link, a
FIFO or a file reached through a linked folder is skipped and named (a warning, and a note on the page), never
followed, embedded or copied. Pages are plain HTML with inline CSS and SVG charts, no script, no font or file from the
network, so the folder opens from ``file://`` and from any static host. Unit anchors are ``<layer>.html#c<k>`` (conv
channel k) and ``#n<k>`` (neuron k of a fully connected layer); file names depend only on node names and unit
indices, so links survive regeneration.

The report is built in a temporary folder beside its destination and moved in at the end. It writes a marker file,
``.cnnfeat-report``, listing its files; the destination must be new, empty, or a previous report holding only the
files it wrote: any other folder is refused (exit code 2) and nothing in it is removed or replaced.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cnnfeat import events, tags
from cnnfeat.atlas import ATLAS_DIR, MANIFEST, Atlas, LayerInfo, anchor, slug
from cnnfeat.errors import CnnfeatError, ConfigError, DataError
from cnnfeat.lecture import LECTURE_LOG

log = logging.getLogger("cnnfeat")

REPORT_DIR = "report"
#: the file by which a folder is known as a report cnnfeat-report wrote (JSON: the files it wrote)
MARKER = ".cnnfeat-report"
#: written by cnnfeat-explore beside its pictures: the epochs it drew, those without a checkpoint, their files
EXPLORED = "explored.json"
#: TensorBoard image tags shown on the overview, by prefix (the representation callbacks' pictures)
IMAGE_PREFIXES = (tags.CKA_NAMESPACE, tags.PROBE_NAMESPACE, tags.UNITS_RASTER.prefix)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_TRAIN_ACC, _TRAIN_LOSS = tags.TRAIN_ACC.name, tags.TRAIN_LOSS.name
_VAL_ACC, _VAL_LOSS, _TEST_ACC = tags.VAL_ACC.name, tags.VAL_LOSS.name, tags.TEST_ACC.name
_KNN_ACC = tags.UMAP_QUALITY.format(metric="knn_acc")
#: the metrics of status.json shown first on the overview, in this order
_STATUS_METRICS = (_VAL_ACC, _TEST_ACC, _TRAIN_ACC, _TRAIN_LOSS, _VAL_LOSS)
_LINK = "a symbolic link; skipped (the report reads only regular files inside the run directory)"
_IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


class ReportWriteError(CnnfeatError, OSError):
    """The report folder could not be written (no space, no permission); the temporary folder is removed."""


# -- reading a run ----------------------------------------------------------------------------------------
class RunFiles:
    """The files of one run directory that the report may read: regular files reached without a symbolic link and
    inside the (resolved) run directory. Anything else is skipped, logged once and listed in ``notes``."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.real = run_dir.resolve()
        self.notes: list[str] = []
        self._noted: set[str] = set()

    def rel(self, path: Path | str) -> str:
        """``path`` as the page names it: relative to the run directory."""
        try:
            return Path(path).relative_to(self.dir).as_posix()
        except ValueError:
            return str(path)

    def skip(self, path: Path | str, why: str) -> None:
        """Note (once per file) that ``path`` was skipped and why."""
        rel = self.rel(path)
        if rel not in self._noted:
            self._noted.add(rel)
            self.notes.append(f"{rel}: {why}")
            log.warning("Report of %s: %s: %s", self.dir, rel, why)

    def ok(self, path: Path) -> bool:
        """Whether ``path`` (below the run directory) is a regular file the report may read. False, silently, when it
        does not exist; False, with a note, for a link on the way, a FIFO or device, or a path leaving the run."""
        try:
            parts = path.relative_to(self.dir).parts
        except ValueError:
            parts = ()
        if not parts:
            self.skip(path, "outside the run directory; skipped")
            return False
        p, mode = self.dir, 0
        for i, part in enumerate(parts):
            p = p / part
            try:
                mode = os.lstat(p).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return False
            except OSError as e:
                self.skip(p, f"cannot be read ({e.strerror or e}); skipped")
                return False
            if stat.S_ISLNK(mode):
                self.skip(p, _LINK)
                return False
            if i < len(parts) - 1 and not stat.S_ISDIR(mode):
                return False
        if not stat.S_ISREG(mode):
            self.skip(p, "not a regular file; skipped")
            return False
        if not path.resolve().is_relative_to(self.real):
            self.skip(path, "outside the run directory; skipped")
            return False
        return True

    def read_bytes(self, path: Path) -> bytes | None:
        """The content of ``path`` if ``ok`` (opened without following a link or waiting on a FIFO), else None."""
        if not self.ok(path):
            return None
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    self.skip(path, "not a regular file; skipped")
                    return None
                return f.read()
        except OSError as e:
            self.skip(path, f"cannot be read ({e.strerror or e}); skipped")
            return None

    def read_text(self, path: Path) -> str | None:
        data = self.read_bytes(path)
        return None if data is None else data.decode("utf-8", errors="replace")


def _wanted(tag: str, kind: str) -> bool:
    """What the report decodes of the event files: every scalar, and the pictures shown by prefix."""
    return kind == tags.Kind.SCALAR or (kind == tags.Kind.IMAGE and tag.startswith(IMAGE_PREFIXES))


def _yaml(text: str | None) -> Any:
    """A YAML document (None when absent or broken: the report shows what it can)."""
    if text is None:
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.create(text))
    except Exception:  # a foreign or broken file
        return None


def _status(files: RunFiles) -> dict[str, Any] | None:
    """``status.json`` as a JSON object (its ``metrics`` an object too), or None with a note."""
    path = files.dir / "status.json"
    text = files.read_text(path)
    if text is None:
        return None
    try:
        status = json.loads(text)
    except ValueError:
        files.skip(path, "not valid JSON; ignored")
        return None
    if not isinstance(status, dict):
        files.skip(path, f"not a JSON object (a {type(status).__name__}); ignored")
        return None
    if not isinstance(status.get("metrics") or {}, dict):
        files.skip(path, "its 'metrics' is not an object; metrics ignored")
        status = {**status, "metrics": {}}
    return status


def _number(value: Any) -> float | None:
    """A metric of status.json as a float: numbers, and the strings ``json_safe`` writes for non-finite ones."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return None


@dataclass(frozen=True)
class Explored:
    """``explored.json`` of ``cnnfeat-explore``: the epochs it drew (0 = the untrained network), the epochs up to the
    last explored one that had no checkpoint, and the checkpoint file of each explored epoch."""

    explored: tuple[int, ...]
    missing: tuple[int, ...]
    checkpoints: dict[int, str]

    @classmethod
    def parse(cls, text: str) -> Explored:
        """The record in ``text``; a ``DataError`` saying what is wrong when it is not of that structure."""
        try:
            d = json.loads(text)
        except ValueError as e:
            raise DataError(f"not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise DataError(f"must be a JSON object, got a {type(d).__name__}")
        epochs = {}
        for key in ("explored", "missing"):
            v = d.get(key, [] if key == "missing" else None)
            if not (isinstance(v, list) and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in v)):
                raise DataError(f"'{key}' must be a list of epochs (integers >= 0), got {v!r:.60}")
            epochs[key] = tuple(sorted(set(v)))
        both = sorted(set(epochs["explored"]) & set(epochs["missing"]))
        if both:
            raise DataError(f"epochs both explored and missing: {', '.join(map(str, both))}")
        ckpts = d.get("checkpoints", {})
        if not (
            isinstance(ckpts, dict) and all(re.fullmatch(r"\d+", k) and isinstance(v, str) for k, v in ckpts.items())
        ):
            raise DataError(f"'checkpoints' must map epochs to checkpoint file names, got {ckpts!r:.60}")
        return cls(epochs["explored"], epochs["missing"], {int(k): v for k, v in ckpts.items()})

    def describe(self) -> str:
        """One line of HTML: which epochs were explored, which are missing, and what that means for comparisons."""
        if not self.missing:
            return f"Explored epochs {_ranges(self.explored)} (none missing)."
        return (
            f"Explored epochs {_ranges(self.explored)}; missing {_ranges(self.missing)}: values that compare with a "
            "previous epoch compare with the previous <i>explored</i> one."
        )


def _ranges(values: Sequence[int]) -> str:
    """``0, 1, 3, 5&ndash;9`` (HTML): runs of three or more consecutive numbers as a range."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(f"{r[0]}&ndash;{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs) or "none"


class _RunAtlas(Atlas):
    """An atlas read for the report: only files ``RunFiles`` allows, step files named as the writer names them, and
    arrays checked against the manifest before they are drawn."""

    files: RunFiles

    def _numbered(self, layer: LayerInfo, prefix: str) -> list[int]:
        out = []
        for p in (self.dir / layer.slug).glob(f"{prefix}_*.npz"):
            m = re.fullmatch(rf"{prefix}_(\d+)\.npz", p.name)
            if m and p.name == f"{prefix}_{int(m.group(1)):03d}.npz" and self.files.ok(p):
                out.append(int(m.group(1)))
        return sorted(out)

    def steps(self, layer: LayerInfo) -> list[int]:
        return self._numbered(layer, "step")

    def patch_steps(self, layer: LayerInfo) -> list[int]:
        return self._numbered(layer, "patches")

    def classes(self, layer: LayerInfo) -> dict[str, np.ndarray] | None:
        path = self.dir / layer.slug / "classes.npz"
        return self._load(path) if self.files.ok(path) else None

    def featviz(self, layer: LayerInfo) -> dict[str, np.ndarray] | None:
        path = self.dir / layer.slug / "featviz.npz"
        return self._load(path) if self.files.ok(path) else None

    def _load(self, path: Path) -> dict[str, np.ndarray]:
        if not self.files.ok(path):
            raise DataError(f"{path}: not a regular file inside the run directory")
        arrays = super()._load(path)
        layer = next((i for i in self.layers if i.slug == path.parent.name), None)
        if layer is not None:
            _check_arrays(path, arrays, len(layer.shown))
        return arrays


#: per atlas file (by name prefix): its arrays as (name, dimensions, uint8 or not), first dimension = the rows
_ARRAYS = {
    "step": (("unit_max", 1, False),),
    "patches": (("crops", 5, True), ("ids", 2, False), ("values", 2, False)),
    "classes": (("counts", 2, False),),
    "featviz": (
        ("units", 1, False),
        ("images", 4, True),
        ("activation", 1, False),
        ("reference", 1, False),
        ("fidelity", 1, False),
        ("flagged", 1, False),
        ("targets", 2, False),
        ("peaks", 2, False),
    ),
}


def _check_arrays(path: Path, arrays: Mapping[str, np.ndarray], shown: int) -> None:
    """Refuse an atlas file whose arrays the report cannot draw (a missing array, a wrong shape or type)."""
    kind = path.stem.split("_")[0]
    spec = _ARRAYS.get(kind, ())
    units = arrays.get("units")
    rows = (len(units) if units.ndim else -1) if kind == "featviz" and units is not None else shown
    what = "optimised units" if kind == "featviz" else "shown units"
    for name, ndim, uint8 in spec:
        if name not in arrays:
            raise DataError(f"{path} lacks the array {name!r}; the atlas is damaged (delete it and rerun)")
        a = arrays[name]
        if a.ndim != ndim or len(a) != rows or (uint8 and a.dtype != np.uint8) or a.dtype.kind not in "fiub":
            raise DataError(
                f"{path}: {name} has shape {a.shape} ({a.dtype}) for {rows} {what}; the atlas is damaged (delete it "
                "and rerun)"
            )
    if kind == "step" and "weights" in arrays and (arrays["weights"].ndim < 2 or len(arrays["weights"]) != shown):
        raise DataError(f"{path}: weights has shape {arrays['weights'].shape} for {shown} shown units")


def _atlas(files: RunFiles) -> Atlas | None:
    """The run's atlas read through ``files`` (None when it has none or its manifest is skipped)."""
    run_dir = files.dir
    directory = run_dir if os.path.lexists(run_dir / MANIFEST) else run_dir / ATLAS_DIR
    path = directory / MANIFEST
    text = files.read_text(path)
    if text is None:
        return None
    atlas = _RunAtlas.from_text(directory, text, path)
    atlas.files = files
    return atlas


@dataclass
class RunData:
    """What the report shows of one run."""

    run_dir: Path
    status: dict[str, Any] | None
    config_text: str | None
    config_source: str
    overrides: list[str]
    experiment: str | None
    scalars: dict[str, list[tuple[int, float]]]
    images: dict[str, tuple[int, bytes]]
    gif: Path | None
    atlas: Atlas | None
    notes: list[str] = field(default_factory=list)
    gif_size: tuple[int, int] | None = None  #: (width, height) of the GIF
    gif_data: bytes | None = field(default=None, repr=False)
    explored: Explored | None = None

    @classmethod
    def read(cls, run_dir: Path | str) -> RunData:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            what = "is a file, not a run directory" if run_dir.is_file() else "no such run directory"
            raise ConfigError(f"{run_dir}: {what}")
        try:
            os.listdir(run_dir)
        except OSError as e:
            raise ConfigError(f"{run_dir}: cannot read the run directory ({e.strerror or e})") from e
        files = RunFiles(run_dir)
        config_text, source = None, ""
        for name in (".hydra/config.yaml", "hparams.yaml"):
            config_text = files.read_text(run_dir / name)
            if config_text is not None:
                source = name
                break
        overrides = _yaml(files.read_text(run_dir / ".hydra" / "overrides.yaml"))
        overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
        hydra_cfg = _yaml(files.read_text(run_dir / ".hydra" / "hydra.yaml"))
        for key in ("hydra", "runtime", "choices", "experiment"):
            hydra_cfg = hydra_cfg.get(key) if isinstance(hydra_cfg, dict) else None
        experiment = hydra_cfg
        for o in overrides:
            if o.startswith("experiment="):
                experiment = o.split("=", 1)[1]
        # the event files that ``files`` allows (regular files inside the run, none of a report folder), merged in
        # the order they were written: a resumed run's newer write of a step wins
        logged = events.read_run(run_dir, _wanted, files.skip, accept=files.ok, skip_dirs=(REPORT_DIR,))
        scalars, images = logged.scalars, logged.latest_images()
        gif, gif_data, gif_size = run_dir / "umap_embedding.gif", None, None
        if (data := files.read_bytes(gif)) is not None:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    gif_size = im.size if im.format == "GIF" else None
            except _IMAGE_ERRORS:
                gif_size = None
            if gif_size is None:
                files.skip(gif, "not a GIF image; skipped")
            else:
                gif_data = data
        explored = None
        if (text := files.read_text(run_dir / EXPLORED)) is not None:
            try:
                explored = Explored.parse(text)
            except DataError as e:
                files.skip(run_dir / EXPLORED, f"{e}; not shown")
        return cls(
            run_dir=run_dir,
            status=_status(files),
            config_text=config_text,
            config_source=source,
            overrides=overrides,
            experiment=str(experiment) if experiment else None,
            scalars=scalars,
            images=images,
            gif=gif if gif_data is not None else None,
            atlas=_atlas(files),
            notes=files.notes,
            gif_size=gif_size,
            gif_data=gif_data,
            explored=explored,
        )

    def note(self, text: str) -> None:
        """Something the report skipped: logged, and listed on the overview."""
        self.notes.append(text)
        log.warning("Report of %s: %s", self.run_dir, text)

    def has_anything(self) -> bool:
        return bool(self.status or self.scalars or self.atlas or self.config_text or self.explored)

    def per_epoch(self, tag: str) -> dict[int, float]:
        """An epoch-level metric by epoch (1-based), mapping Lightning's global steps through its ``epoch`` scalar."""
        values = self.scalars.get(tag, [])
        epochs = {s: e for s, e in self.scalars.get(tags.EPOCH.name, []) if math.isfinite(e)}
        out: dict[int, float] = {}
        for i, (step, v) in enumerate(values):
            out[int(epochs[step]) + 1 if step in epochs else i + 1] = v
        return out


# -- pictures ---------------------------------------------------------------------------------------------
@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _save(arr: np.ndarray, path: Path) -> Path:
    """Write an (H, W, 3) uint8 array (or (H, W)) as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, compress_level=6)
    return path


@cache
def _lut(name: str) -> np.ndarray:
    import matplotlib  # the colour tables cnnfeat.viz uses

    return (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def diverging(values: np.ndarray, scale: float) -> np.ndarray:
    """Signed values -> RdBu_r RGB uint8 (..., 3), 0 = white, ``scale`` saturated (the project's filter colours)."""
    idx = np.clip(np.round((values / max(scale, 1e-12) / 2 + 0.5) * 255), 0, 255).astype(np.int64)
    return _lut("RdBu_r")[idx]


def _up(arr: np.ndarray, factor: int) -> np.ndarray:
    return arr if factor <= 1 else np.repeat(np.repeat(arr, factor, axis=0), factor, axis=1)


def _grid(cells: list[np.ndarray], cols: int, gap: int = 1, fill: int = 160) -> np.ndarray:
    """Tile equal-size (h, w, 3) cells, ``cols`` per row, with ``gap`` grey pixels between them."""
    h, w = cells[0].shape[:2]
    rows = math.ceil(len(cells) / cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), fill, np.uint8)
    for i, c in enumerate(cells):
        r, k = divmod(i, cols)
        out[r * (h + gap) : r * (h + gap) + h, k * (w + gap) : k * (w + gap) + w] = c
    return out


def labelled(cells: list[np.ndarray], labels: list[str], per_row: int, gap: int = 6) -> np.ndarray:
    """Small multiples: cells (h, w, 3) left to right, ``per_row`` a row, each with its label underneath."""
    font = _font(11)
    h = max(c.shape[0] for c in cells)
    w = max(c.shape[1] for c in cells)
    label_w = max(int(font.getlength(t)) for t in labels) if labels else 0
    w = max(w, label_w)
    cols = min(per_row, len(cells))
    rows = math.ceil(len(cells) / cols)
    cell_h = h + 14
    canvas = Image.new("RGB", (cols * (w + gap) - gap, rows * (cell_h + gap) - gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (c, t) in enumerate(zip(cells, labels, strict=True)):
        r, k = divmod(i, cols)
        x, y = k * (w + gap), r * (cell_h + gap)
        canvas.paste(Image.fromarray(c), (x + (w - c.shape[1]) // 2, y))
        draw.text((x + (w - font.getlength(t)) / 2, y + h + 1), t, font=font, fill=(60, 60, 60))
    return np.asarray(canvas)


def row_labelled(rows: list[np.ndarray], labels: list[str], gap: int = 4) -> np.ndarray:
    """Rows (h, w, 3) stacked top to bottom with a label at the left of each."""
    font = _font(11)
    lw = max(int(font.getlength(t)) for t in labels) + 6
    w = max(r.shape[1] for r in rows)
    h = sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)
    canvas = Image.new("RGB", (lw + w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for r, t in zip(rows, labels, strict=True):
        canvas.paste(Image.fromarray(r), (lw, y))
        draw.text((0, y + r.shape[0] / 2 - 6), t, font=font, fill=(60, 60, 60))
        y += r.shape[0] + gap
    return np.asarray(canvas)


def kernel_cell(w: np.ndarray, scale: float, budget: int = 150) -> np.ndarray:
    """One unit's incoming weights at one step as a picture: RGB for 3 input channels, else a near-square grid of
    its input channels' kernels (conv) or of its weight vector (fc), diverging around 0."""
    if w.ndim == 3 and w.shape[0] == 3:  # RGB filter (AlexNet conv1): grey = 0
        rgb = np.clip(np.round((w / max(scale, 1e-12) / 2 + 0.5) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        return _up(rgb, max(1, budget // 2 // max(rgb.shape[:2])))
    if w.ndim == 1:  # a fully connected unit: its weights as a near-square grid, row by row
        side = math.ceil(math.sqrt(len(w)))
        padded = np.full(side * side, np.nan)
        padded[: len(w)] = w
        rgb = diverging(np.nan_to_num(padded.reshape(side, side)), scale)
        rgb[np.isnan(padded.reshape(side, side))] = 200
        return _up(rgb, max(1, min(6, budget // side)))
    k = w.shape[-1]
    cols = math.ceil(math.sqrt(w.shape[0]))
    px = max(1, min(8, budget // (cols * (k + 1))))
    cells = [_up(diverging(kernel, scale), px) for kernel in w]
    return _grid(cells, cols, gap=1 if px > 1 else 0)


def crop_image(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Cut ``box`` (top, left, bottom, right; inclusive) out of a (C, H, W) image, zero outside it."""
    top, left, bottom, right = box
    c, h, w = img.shape
    out = np.zeros((c, bottom - top + 1, right - left + 1), dtype=img.dtype)
    t, l_, b, r = max(top, 0), max(left, 0), min(bottom, h - 1), min(right, w - 1)
    if t <= b and l_ <= r:
        out[:, t - top : b - top + 1, l_ - left : r - left + 1] = img[:, t : b + 1, l_ : r + 1]
    return out


def image_cell(img: np.ndarray, min_side: int) -> np.ndarray:
    """A (C, h, w) uint8 image -> (h', w', 3), nearest-upscaled so its side is at least ``min_side``."""
    rgb = np.repeat(img, 3, axis=0) if img.shape[0] == 1 else img[:3]
    rgb = rgb.transpose(1, 2, 0)
    return _up(np.ascontiguousarray(rgb), math.ceil(min_side / max(rgb.shape[:2])))


# -- HTML pieces ------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#222;
background:#fafafa;line-height:1.4}
header{background:#263238;color:#fff;padding:10px 20px}header a{color:#cfe8ff}
nav{font-size:14px}nav a{margin-right:10px}
main{padding:12px 20px;max-width:1400px}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:22px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:0 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border:1px solid #ddd;padding:2px 7px;text-align:right}th{background:#eee}td.l,th.l{text-align:left}
pre{background:#fff;border:1px solid #ddd;padding:8px;font-size:12px;overflow:auto;max-height:420px}
img{image-rendering:pixelated}img.smooth{image-rendering:auto}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px;scroll-margin-top:10px}
.card:target{outline:3px solid #ffb300}
.card figure{margin:4px 0 8px}.card img{max-width:100%;height:auto}.card figcaption,.muted{font-size:12px;color:#666}
.row{display:flex;gap:12px;align-items:flex-start;flex-wrap:wrap}
.badge{display:inline-block;font-size:11px;border-radius:9px;padding:1px 7px;margin-left:4px;vertical-align:middle}
.ok{background:#e3f4e1;color:#1b5e20}.dead{background:#fde2e1;color:#b71c1c}
.flag{background:#fff0c2;color:#8a5300;border:1px solid #e0a800}
.bars{font-size:11px;margin:4px 0}.bar{display:flex;align-items:center;gap:4px;height:13px}
.bar span.n{width:78px;text-align:right;overflow:hidden;white-space:nowrap;color:#444}
.bar span.b{height:10px;display:inline-block}.bar span.c{color:#666}
.tl{display:flex;gap:1px;margin:3px 0}.tl span{width:12px;height:12px;display:inline-block}
.tl .a{background:#66bb6a}.tl .d{background:#e53935}
.thumbs{display:flex;flex-wrap:wrap;gap:4px}.thumbs a{text-decoration:none;font-size:10px;color:#555;text-align:center}
.flagged img{outline:2px solid #e0a800}
.explored{background:#fff8e1;border-left:3px solid #e0a800;padding:4px 10px}
.figs{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.figs figure{margin:0}
svg text{font-family:system-ui,sans-serif}
"""


def esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def page(title: str, body: str, nav: str = "") -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><nav>{nav}</nav></header><main>{body}</main></body></html>\n"
    )


def fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "&ndash;"
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def pct(v: float | None) -> str:
    return "&ndash;" if v is None or not math.isfinite(v) else f"{100 * v:.2f}%"


def table(head: Sequence[str] | None, rows: Iterable[Sequence[object]], left: int = 1) -> str:
    """A table of raw HTML cells (escape text first); the first ``left`` columns align left; no header if None."""
    th = "".join(f'<th class="{"l" if i < left else ""}">{esc(h)}</th>' for i, h in enumerate(head or []))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table>{f'<tr>{th}</tr>' if th else ''}{body}</table>"


def svg_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
    width: int = 520,
    height: int = 270,
) -> str:
    """Lines (with points) as an inline SVG: axes with ticks, a legend at the right; no script."""
    pts = [(x, y) for s in series.values() for x, y in s if _plottable(y)]
    if not pts:
        return f'<p class="muted">{esc(title)}: no values</p>'
    left, right, top, bottom = 52, 150, 24, 38
    pw, ph = width - left - right, height - top - bottom
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = ylim if ylim is not None else (min(ys), max(ys))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:  # a constant: centre it
        y0, y1 = (y0 - 0.5, y1 + 0.5) if y0 == 0 else (y0 - abs(y0) / 2, y1 + abs(y1) / 2)
    if ylim is None:
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (min(max(y, y0), y1) - y0) / (y1 - y0)) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{esc(title)}">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="{left}" y="15" font-size="13" font-weight="bold">{esc(title)}</text>',
    ]
    yticks, ydec = _ticks(y0, y1)
    for t in yticks:
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{t:.{ydec}f}</text>')
    xticks, xdec = _ticks(x0, x1, integer=all(float(x).is_integer() for x in xs))
    for t in xticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#888"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 15}" font-size="10" text-anchor="middle">{t:.{xdec}f}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" font-size="11" text-anchor="middle">{esc(xlabel)}</text>')
    out.append(
        f'<text x="12" y="{top + ph / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + ph / 2})">{esc(ylabel)}</text>'
    )
    for i, (label, s) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        good = [(x, y) for x, y in s if _plottable(y)]
        if len(good) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        for x, y in good:
            out.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.3" fill="{color}"><title>{esc(label)}: '
                f"{fmt(x)}, {fmt(y)}</title></circle>"
            )
        ly = top + 10 + 15 * i
        out.append(
            f'<line x1="{left + pw + 10}" x2="{left + pw + 26}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/>'
        )
        out.append(f'<text x="{left + pw + 30}" y="{ly + 4}" font-size="11">{esc(label[:22])}</text>')
    out.append("</svg>")
    return "".join(out)


def _plottable(y: float) -> bool:
    """A value a chart can place: finite, and small enough that differences of two stay finite."""
    return math.isfinite(y) and abs(y) < 1e300


def _ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> tuple[list[float], int]:
    """About ``n`` round tick values in [lo, hi], and the decimals that tell them apart."""
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step) * step
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if round(step / mag, 6) == 2.5 else 0)
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)], decimals


def thumb_row(thumbs: list[tuple[str, str, tuple[int, int], bool]], page_: str, layer: str, side: int) -> str:
    """Small optimised inputs linking to their unit cards (``page_#anchor``); flagged ones outlined."""
    return (
        "<div class='thumbs'>"
        + "".join(
            f'<a href="{esc(page_)}#{aid}" class="{"flagged" if flagged else ""}" title="{esc(layer)} {aid}">'
            f"{img_tag(src, f'{layer} {aid} optimised input', size, scale=side / max(size))}<br>{aid}</a>"
            for aid, src, size, flagged in thumbs
        )
        + "</div>"
    )


def img_tag(src: str, alt: str, size: tuple[int, int] | None = None, cls: str = "", scale: float = 1.0) -> str:
    wh = f' width="{round(size[1] * scale)}" height="{round(size[0] * scale)}"' if size else ""
    c = f' class="{cls}"' if cls else ""
    return f'<img src="{esc(src)}" alt="{esc(alt)}"{wh}{c}>'


# -- the overview -----------------------------------------------------------------------------------------
class _Writer:
    """Builds one report folder (assets referenced relative to the page)."""

    def __init__(self, data: RunData, out: Path) -> None:
        self.data, self.out = data, out
        self.assets = out / "assets"
        self.files: list[Path] = []
        #: per layer, its units' optimised inputs: (anchor, src, (h, w), flagged), for the overview
        self.thumbs: dict[str, list[tuple[str, str, tuple[int, int], bool]]] = {}

    def asset(self, rel: str) -> Path:
        p = self.assets / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        self.files.append(p)
        return p

    def png(self, arr: np.ndarray, rel: str) -> tuple[str, tuple[int, int]]:
        _save(arr, self.asset(rel))
        return f"assets/{rel}", arr.shape[:2]

    # -- pages --
    def nav(self, current: str = "") -> str:
        links = ['<a href="index.html">overview</a>']
        if self.data.atlas:
            for info in self.data.atlas.layers:
                name = f"<b>{esc(info.name)}</b>" if info.name == current else esc(info.name)
                links.append(f'<a href="{esc(info.slug)}.html">{name}</a>')
        return " ".join(links)

    def write(self) -> list[Path]:
        pages = {}
        if self.data.atlas:
            for info in self.data.atlas.layers:
                pages[f"{info.slug}.html"] = self.layer_page(info)
        pages["index.html"] = self.overview()  # after the layers: it shows their optimised inputs
        for name, text in pages.items():
            (self.out / name).write_text(text, encoding="utf-8")
        return [self.out / n for n in pages]

    def overview(self) -> str:
        d = self.data
        parts = [self.status_section(), self.layers_section(), self.curves_section()]
        if d.experiment == "seed":
            parts.append(self.lecture_section())
        parts += [self.umap_section(), self.dead_relu_section(), self.representation_section()]
        parts.append(self.config_section())
        if d.notes:
            parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in d.notes) + "</ul>")
        return page(f"cnnfeat report · {d.run_dir.name}", "".join(p for p in parts if p), self.nav())

    def explored_line(self) -> str:
        """Which epochs ``cnnfeat-explore`` drew and which it could not (no checkpoint); empty without explored.json."""
        e = self.data.explored
        return f"<p class='explored'>{e.describe()}</p>" if e is not None else ""

    def status_section(self) -> str:
        st = self.data.status or {}
        rows = [("run directory", esc(self.data.run_dir.resolve()))]
        if st:
            rows.append(("status", f"<b>{esc(st.get('status'))}</b> ({esc(st.get('time', ''))})"))
            for key in ("epoch", "step", "error", "resumed_from"):
                if st.get(key) not in (None, ""):
                    rows.append((key, esc(st[key])))
        else:
            rows.append(("status", "no status.json (not written by cnnfeat-train)"))
        if self.data.experiment:
            rows.append(("experiment", esc(self.data.experiment)))
        if self.data.overrides:
            rows.append(("overrides", esc(" ".join(self.data.overrides))))
        metrics = st.get("metrics") or {}
        keys = [k for k in _STATUS_METRICS if k in metrics]
        keys += sorted(k for k in metrics if k.startswith((_KNN_ACC, tags.DEAD_FRACTION_ALL.name)))
        for k in keys:
            v = _number(metrics[k])
            rows.append((esc(k), pct(v) if "acc" in k else fmt(v)))
        e = self.data.explored
        if e is not None and e.checkpoints:
            ckpts = table(["epoch", "checkpoint"], [(k, esc(v)) for k, v in sorted(e.checkpoints.items())])
            rows.append(("checkpoints", f"<details><summary>{len(e.checkpoints)} explored</summary>{ckpts}</details>"))
        return "<h2>Run</h2>" + self.explored_line() + table(None, rows, left=2)

    def curves_section(self) -> str:
        d = self.data
        loss = {t: sorted(d.per_epoch(t).items()) for t in (_TRAIN_LOSS, _VAL_LOSS) if t in d.scalars}
        acc = {t: sorted(d.per_epoch(t).items()) for t in (_TRAIN_ACC, _VAL_ACC) if t in d.scalars}
        if _TEST_ACC in d.scalars and acc:
            last = max(x for s in acc.values() for x, _ in s)
            acc[f"{_TEST_ACC} (final)"] = [(last, d.scalars[_TEST_ACC][-1][1])]
        lr = {tags.LR.name: sorted(d.per_epoch(tags.LR.name).items())} if tags.LR.name in d.scalars else {}
        if not (loss or acc):
            return "<h2>Training curves</h2><p class='muted'>No train/val scalars in the event files.</p>"
        figs = [svg_chart(loss, "Loss", "epoch", "cross-entropy"), svg_chart(acc, "Accuracy", "epoch", "accuracy")]
        if lr:
            figs.append(svg_chart(lr, "Learning rate", "epoch", "lr"))
        return "<h2>Training curves</h2><div class='figs'>" + "".join(figs) + "</div>"

    def lecture_section(self) -> str:
        d = self.data
        tr_acc, tr_loss, va_acc = d.per_epoch(_TRAIN_ACC), d.per_epoch(_TRAIN_LOSS), d.per_epoch(_VAL_ACC)
        if not tr_acc:
            return ""
        rows = []
        for e in sorted({*range(1, len(LECTURE_LOG) + 1), *tr_acc}):  # every epoch the run has, not a range to it
            lt, ll, lv = LECTURE_LOG[e - 1] if e <= len(LECTURE_LOG) else (float("nan"),) * 3
            rows.append(
                (
                    e,
                    pct(tr_acc.get(e)),
                    f"{lt:.2f}%" if math.isfinite(lt) else "&ndash;",
                    fmt(tr_loss.get(e)),
                    f"{ll:.4f}" if math.isfinite(ll) else "&ndash;",
                    pct(va_acc.get(e)),
                    f"{lv:.2f}%" if math.isfinite(lv) else "&ndash;",
                )
            )
        head = ["epoch", "train acc", "lecture", "train avgLoss", "lecture", "valid (=test) acc", "lecture"]
        return (
            "<h2>The lecture's table beside this run</h2><p class='muted'>experiment=seed validates on the official "
            '10k test set, as the lecture\'s "valid" column does.</p>' + table(head, rows)
        )

    def umap_section(self) -> str:
        d = self.data
        umap = {t: v for t, v in d.scalars.items() if t.startswith(tags.UMAP_NAMESPACE)}
        if not umap and d.gif is None:
            return ""
        parts = ["<h2>UMAP of the last-layer features</h2>"]
        if d.gif_data is not None and d.gif_size is not None:
            self.asset("umap_embedding.gif").write_bytes(d.gif_data)  # the bytes read and checked, not the path again
            w, h = d.gif_size
            parts.append(img_tag("assets/umap_embedding.gif", "UMAP animation, epoch by epoch", (h, w), "smooth"))
        metrics = tags.UMAP_METRICS
        rows = []
        pixel = [umap.get(tags.UMAP_PIXEL_QUALITY.format(metric=m)) for m in metrics]
        if any(pixel):
            rows.append(["raw pixels"] + [fmt(p[-1][1]) if p else "&ndash;" for p in pixel])
        feature = [tags.UMAP_QUALITY.format(metric=m) for m in metrics]
        steps = sorted({s for t in feature for s, _ in umap.get(t, [])})
        every = list(rows)
        for s in steps:
            vals = [dict(umap.get(t, [])).get(s) for t in feature]
            row = [("untrained network" if s == 0 else f"after epoch {s}")] + [fmt(v) for v in vals]
            every.append(row)
            if s in (0, 1, steps[-1]) or s % 5 == 0:
                rows.append(row)
        head = ["", "k-NN acc (features)", "k-NN acc (2-D map)", "trustworthiness", "silhouette"]
        if rows:
            parts.append(table(head, rows))
        if len(every) > len(rows):
            parts.append(f"<details><summary>every epoch</summary>{table(head, every)}</details>")
        return "".join(parts)

    def dead_relu_section(self) -> str:
        prefix = tags.DEAD_FRACTION.prefix  # relu/dead_fraction/<node> and .../all
        series = {t.removeprefix(prefix): v for t, v in self.data.scalars.items() if t.startswith(prefix)}
        if not series:
            return ""
        chart = svg_chart(series, "Dead ReLU units", "epochs trained (0 = untrained)", "dead fraction", (0.0, 1.0))
        final = [(esc(k), pct(v[-1][1]), esc(v[-1][0])) for k, v in series.items()]
        return (
            "<h2>Dying ReLU</h2><div class='figs'>"
            + chart
            + table(["ReLU", "dead at the end", "step"], final)
            + "</div>"
        )

    def tb_figures(self, images: Mapping[str, tuple[int, bytes]]) -> str:
        """TensorBoard pictures (tag -> (step, PNG bytes)) copied to the assets, as captioned figures in tag order."""
        figs = []
        for tag, (step, png) in sorted(images.items()):
            try:
                with Image.open(io.BytesIO(png)) as im:
                    (w, h), kind = im.size, im.format
            except _IMAGE_ERRORS:
                kind = None
            if kind != "PNG":
                self.data.note(f"TensorBoard picture {tag} (step {step}): not a PNG image; skipped")
                continue
            self.asset(f"tb/{slug(tag)}.png").write_bytes(png)
            figs.append(
                f"<figure>{img_tag(f'assets/tb/{slug(tag)}.png', tag, (h, w), 'smooth', 0.75)}"
                f"<figcaption>{esc(tag)} (step {step})</figcaption></figure>"
            )
        return "".join(figs)

    def representation_section(self) -> str:
        d = self.data
        parts = []
        cka = {t: v for t, v in d.images.items() if t.startswith(tags.CKA_NAMESPACE)}
        if cka:
            parts.append("<h3>CKA</h3><div class='figs'>" + self.tb_figures(cka) + "</div>")
        probe_acc = tags.PROBE_ACC.prefix
        probe = {t.removeprefix(probe_acc): v for t, v in d.scalars.items() if t.startswith(probe_acc)}
        if probe:
            steps = sorted({s for v in probe.values() for s, _ in v})
            rows = [[esc(layer)] + [pct(dict(v).get(s)) for s in steps] for layer, v in probe.items()]
            parts.append(
                "<h3>Linear probe accuracy per layer</h3>" + table(["layer"] + [f"step {s}" for s in steps], rows)
            )
        others = {t: v for t, v in d.images.items() if t.startswith((tags.PROBE_NAMESPACE, tags.UNITS_RASTER.prefix))}
        if others:
            parts.append("<div class='figs'>" + self.tb_figures(others) + "</div>")
        if not parts:
            return ""
        return "<h2>Representations (CKA, linear probes)</h2>" + "".join(parts)

    def layers_section(self) -> str:
        a = self.data.atlas
        if a is None:
            return (
                "<h2>Units</h2><p class='muted'>No atlas in this run (add the atlas callback: "
                "<code>callbacks=[default,atlas]</code>), so there are no unit pages.</p>"
            )
        rows = []
        for info in a.layers:
            s = self.layer_summary(info)
            rows.append(
                [
                    f'<a href="{esc(info.slug)}.html">{esc(info.name)}</a>',
                    esc(info.kind),
                    f"{len(info.shown)} of {info.units}" if len(info.shown) < info.units else str(info.units),
                    "&times;".join(map(str, info.rf_size)) if info.rf_size else "whole image",
                    s["dead"],
                    s["fidelity"],
                    *(["frozen: recorded once" if info.frozen else ""] if any(i.frozen for i in a.layers) else []),
                ]
            )
        fv = (a.manifest.get("settings") or {}).get("featviz_settings") or {}
        fc = (a.manifest.get("settings") or {}).get("featviz_fc_settings") or {}
        diff = {k: v for k, v in fc.items() if fv.get(k) != v}
        fc_note = ""
        if diff and any(i.kind == "fc" for i in a.layers):
            fc_note = "; fully connected units: " + ", ".join(f"{esc(k)} {esc(v)}" for k, v in diff.items())
        note = (
            f"<p class='muted'>Optimised inputs: objective <b>{esc(fv.get('objective', '?'))}</b>, "
            f"{esc(fv.get('steps', '?'))} steps, {esc(fv.get('parametrization', '?'))} parametrisation, seed "
            f"{esc(fv.get('seed', '?'))}{fc_note}. Fidelity = the unit's activation on its optimised input / on its "
            f"best real patch ({esc((a.manifest.get('probe') or {}).get('describe', ''))}); below 1.0 is flagged on "
            "the card.</p>"
        )
        head = ["layer", "kind", "units", "receptive field", "dead at the end", "fidelity ≥ 1"]
        head += [""] if any(i.frozen for i in a.layers) else []
        rows_fv = "".join(
            f"<h3><a href='{esc(info.slug)}.html'>{esc(info.name)}</a></h3>"
            + thumb_row(self.thumbs[info.name][:32], f"{info.slug}.html", info.name, 40)
            for info in a.layers
            if self.thumbs.get(info.name)
        )
        fv_title = "<h2>Optimised inputs (click one for its unit card; ⚑ outlined: fidelity below 1)</h2>"
        return "<h2>Units (the atlas)</h2>" + table(head, rows) + note + (fv_title + rows_fv if rows_fv else "")

    def field_figures(
        self,
        info: LayerInfo,
        fv: dict[str, np.ndarray],
        i: int,
        patches: dict[int, dict[str, np.ndarray]],
        j: int,
        base: str,
        aid: str,
    ) -> str:
        """The optimised input cut to the unit's receptive field where the objective read it, beside the unit's best
        real patch at the same scale: what fidelity compares."""
        if info.box(0, 0) is None:  # no receptive field (a fully connected unit sees the whole image)
            return ""
        row, col = (int(v) for v in fv["targets"][i])
        if row < 0:  # the channel objective: where the activation peaks
            row, col = (int(v) for v in fv["peaks"][i])
        box = info.box(row, col)
        if box is None:
            return ""
        cut = crop_image(fv["images"][i], box)
        side = max(56, cut.shape[-1])
        src, size = self.png(image_cell(cut, side), f"{base}_featviz_field.png")
        figs = [
            f"<figure>{img_tag(src, f'optimised input of {info.name} {aid} at its receptive field', size)}"
            f"<figcaption>its field at {row},{col}</figcaption></figure>"
        ]
        if patches:
            best = patches[max(patches)]["crops"][j][0]
            src, size = self.png(image_cell(best, max(side, best.shape[-1])), f"{base}_best_real.png")
            figs.append(
                f"<figure>{img_tag(src, f'best real patch of {info.name} {aid}', size)}"
                "<figcaption>best real</figcaption></figure>"
            )
        return "".join(figs)

    def layer_summary(self, info: LayerInfo) -> dict[str, str]:
        a = self.data.atlas
        assert a is not None
        steps, data = a.step_data(info)
        dead = "&ndash;"
        if steps:
            m = data[steps[-1]]["unit_max"]
            dead = f"{int((~(m > 0)).sum())} of {len(m)}"
        fv = a.featviz(info)
        fid = "&ndash;"
        if fv is not None:
            fid = f"{int((~fv['flagged']).sum())} of {len(fv['units'])}"
        return {"dead": dead, "fidelity": fid}

    def config_section(self) -> str:
        d = self.data
        if not d.config_text:
            return "<h2>Config</h2><p class='muted'>No config recorded.</p>"
        return (
            f"<h2>Config</h2><details><summary>{esc(d.config_source)}</summary><pre>{esc(d.config_text)}</pre>"
            "</details>"
        )

    # -- a layer page --
    def layer_page(self, info: LayerInfo) -> str:
        a = self.data.atlas
        assert a is not None
        names = a.class_names
        steps, data = a.step_data(info)
        patch_steps = a.patch_steps(info)
        patches = {s: a.patches(info, s) for s in patch_steps}
        classes, fv = a.classes(info), a.featviz(info)
        fv_row = {int(u): i for i, u in enumerate(fv["units"])} if fv is not None else {}
        maxima = np.stack([data[s]["unit_max"] for s in steps]) if steps else None  # (S, U)
        weights = [data[s]["weights"] for s in steps if "weights" in data[s]]
        w_steps = [s for s in steps if "weights" in data[s]]
        cards, thumbs = [], []
        for j, unit in enumerate(info.shown):
            aid = anchor(info.kind, unit)
            base = f"{info.slug}/{aid}"
            parts: list[str] = []
            badges = []
            if maxima is not None:
                alive = maxima[:, j] > 0
                if alive[-1]:
                    badges.append('<span class="badge ok">alive</span>')
                else:
                    died = next((steps[i] for i in range(len(steps)) if not alive[i:].any()), steps[-1])
                    badges.append(f'<span class="badge dead">dead since step {died}</span>')
            fig_fv = ""
            if unit in fv_row:
                i = fv_row[unit]
                fid, act, ref = float(fv["fidelity"][i]), float(fv["activation"][i]), float(fv["reference"][i])
                flagged = bool(fv["flagged"][i])
                if flagged:
                    why = "never fires on real images" if not math.isfinite(fid) else "below its best real patch"
                    badges.append(f'<span class="badge flag" title="{esc(why)}">fidelity {fmt(fid, 3)} ⚑</span>')
                else:
                    badges.append(f'<span class="badge ok">fidelity {fmt(fid, 3)}</span>')
                src, size = self.png(image_cell(fv["images"][i], 112), f"{base}_featviz.png")
                thumbs.append((aid, src, size, flagged))
                fig_fv = (
                    f"<div class='row'><figure>{img_tag(src, f'optimised input of {info.name} {aid}', size)}"
                    f"<figcaption>optimised input</figcaption></figure>"
                    f"{self.field_figures(info, fv, i, patches, j, base, aid)}</div>"
                    f"<div class='muted'>activation {fmt(act, 3)} on it / {fmt(ref, 3)} on its best real patch: "
                    f"fidelity <b>{fmt(fid, 3)}</b>{' (flagged: below 1)' if flagged else ''}</div>"
                )
            elif info.featviz_units or fv is not None:
                fig_fv = "<p class='muted'>not optimised (beyond featviz_max_units)</p>"
            fig_w = ""
            if weights:
                ws = [w[j] for w in weights]
                scale = max(float(np.abs(w).max()) for w in ws) or 1.0
                cells = [kernel_cell(w, scale) for w in ws]
                per_row = 8 if cells[0].shape[1] <= 60 else 4
                src, size = self.png(labelled(cells, [f"ep {s}" for s in w_steps], per_row), f"{base}_filters.png")
                what = "filter" if info.kind == "conv" else "incoming weights (row by row)"
                fig_w = (
                    f"<figure>{img_tag(src, f'{what} of {info.name} {aid} across epochs', size)}<figcaption>{what} "
                    f"across epochs (blue &lt; 0 &lt; red, one scale ±{fmt(scale, 3)})"
                    f"{' — frozen' if info.frozen else ''}</figcaption></figure>"
                )
            parts.append(fig_fv + fig_w)
            if patches:
                rows, labels = [], []
                for s in patch_steps:
                    crops = patches[s]["crops"][j]  # (k, C, s, s)
                    cell_side = max(36, crops.shape[-1])
                    rows.append(_grid([image_cell(c, cell_side) for c in crops], len(crops), gap=2, fill=255))
                    labels.append(f"ep {s}")
                src, size = self.png(row_labelled(rows, labels), f"{base}_patches.png")
                last = patches[patch_steps[-1]]
                labels_of = last["labels"][j] if "labels" in last else np.full(len(last["ids"][j]), -1)
                top = ", ".join(
                    f"#{int(i)}{' ' + esc(names[int(lab)]) if 0 <= lab < len(names) else ''} ({fmt(float(v), 3)})"
                    for i, v, lab in zip(last["ids"][j][:3], last["values"][j][:3], labels_of[:3], strict=True)
                    if i >= 0
                )
                what = (
                    f"receptive field {'&times;'.join(map(str, info.rf_size))} px" if info.rf_size else "whole images"
                )
                parts.append(
                    f"<figure>{img_tag(src, f'top patches of {info.name} {aid}', size)}<figcaption>top "
                    f"{patches[patch_steps[-1]]['crops'].shape[1]} probe patches per kept epoch ({what})"
                    f"{'; best: ' + top if top else ''}</figcaption></figure>"
                )
            if classes is not None and names:
                counts = classes["counts"][j]
                total = int(counts.sum()) or 1
                bars = "".join(
                    f"<div class='bar'><span class='n'>{esc(n)}</span><span class='b' style='width:"
                    f"{180 * c / total:.0f}px;background:{PALETTE[k % len(PALETTE)]}'></span><span class='c'>{c}"
                    "</span></div>"
                    for k, (n, c) in enumerate(zip(names, counts.tolist(), strict=False))
                )
                parts.append(
                    f"<div class='bars'><span class='muted'>classes of its top {total} activations (step "
                    f"{int(classes['step'])})</span>{bars}</div>"
                )
            if maxima is not None:
                cells = "".join(
                    f"<span class='{'a' if m > 0 else 'd'}' title='epoch {s}: {'alive' if m > 0 else 'dead'}, max "
                    f"{fmt(float(m), 3)}'></span>"
                    for s, m in zip(steps, maxima[:, j].tolist(), strict=True)
                )
                when = f"epochs {steps[0]}&ndash;{steps[-1]}" if len(steps) > 1 else f"epoch {steps[0]}"
                parts.append(
                    f"<div class='muted'>alive/dead, {when}{' (frozen: recorded once)' if info.frozen else ''} "
                    f"(green = fired on "
                    f"{esc((a.manifest.get('probe') or {}).get('alive_images', '?'))} probe images)</div>"
                    f"<div class='tl'>{cells}</div>"
                )
            cards.append(
                f"<section class='card' id='{aid}'><h3><a href='#{aid}'>{esc(info.name)} · {aid}</a>"
                f"{''.join(badges)}</h3>{''.join(parts)}</section>"
            )
        s = self.layer_summary(info)
        intro = (
            f"<p>{esc(info.kind)} layer, {info.units} units"
            f"{f' ({len(info.shown)} shown: max_units)' if len(info.shown) < info.units else ''}; "
            f"alive/dead read at {esc(info.activation or info.name)}; "
            f"receptive field {'&times;'.join(map(str, info.rf_size)) + ' px' if info.rf_size else 'the whole image'}"
            f"{' of ' + esc(info.frame) + ' output' if info.frame else ''}; dead at the end: {s['dead']}; optimised "
            f"inputs reaching their best real patch: {s['fidelity']}{'; frozen (recorded once)' if info.frozen else ''}"
            ".</p>"
        )
        self.thumbs[info.name] = thumbs
        thumbs_html = f"<h2>Optimised inputs</h2>{thumb_row(thumbs, '', info.name, 56)}" if thumbs else ""
        body = (
            intro + self.explored_line() + thumbs_html + "<h2>Units</h2><div class='cards'>" + "".join(cards) + "</div>"
        )
        return page(f"{info.name} · {self.data.run_dir.name}", body, self.nav(info.name))


# -- the report folder -------------------------------------------------------------------------------------
def _names(names: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _own_files(folder: Path) -> set[str] | None:
    """The files (relative, POSIX) that a report in ``folder`` wrote, by its marker, or by the look of a report of a
    cnnfeat from before the marker (pages and ``assets/`` only, its index titled by the report); None otherwise."""
    marker = folder / MARKER
    try:
        if not stat.S_ISREG(os.lstat(marker).st_mode):
            return None
        files = json.loads(marker.read_text(encoding="utf-8")).get("files")
        if isinstance(files, list) and all(isinstance(f, str) for f in files):
            return {*files, MARKER}
        return None
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError):
        return None
    entries = os.listdir(folder)
    index = folder / "index.html"
    if "index.html" not in entries or any(not (e.endswith(".html") or e == "assets") for e in entries):
        return None
    if not stat.S_ISREG(os.lstat(index).st_mode):
        return None
    with open(index, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace")
    if "<title>cnnfeat report · " not in head and "<title>cnnfeat sweep · " not in head:
        return None
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir() or p.is_symlink()}


def _foreign(folder: Path, own: set[str]) -> list[str]:
    """What in ``folder`` is not one of the report's own files (links and anything not a regular file included)."""
    out = []
    for root, dirs, files in os.walk(folder):
        for name in [*files, *(d for d in dirs if os.path.islink(os.path.join(root, d)))]:
            path = Path(root, name)
            rel = path.relative_to(folder).as_posix()
            if rel not in own or not stat.S_ISREG(os.lstat(path).st_mode):
                out.append(rel)
    return sorted(out)


def report_folder(out: Path | str) -> Path:
    """``out`` as an absolute path, if the report may be written there: a new folder, an empty one, or a previous
    report holding only the files it wrote. Anything else raises a ``ConfigError`` that says why; nothing is touched."""
    out = Path(os.path.abspath(out))
    for parent in out.parents:
        if os.path.isfile(parent / MARKER) and not os.path.islink(parent / MARKER):
            raise ConfigError(
                f"{out} is inside the report folder {parent}, which the next report there replaces; give a folder "
                "outside it"
            )
    if os.path.islink(out):
        raise ConfigError(f"{out} is a symbolic link; give the folder itself (the report replaces a folder's content)")
    if os.path.lexists(out) and not out.is_dir():
        what = "is a file, not a folder" if out.is_file() else "is not a folder"
        raise ConfigError(f"{out} {what}; give a new or empty folder for the report")
    if not out.is_dir():
        return out
    try:
        entries = sorted(os.listdir(out))
        own = _own_files(out) if entries else set()
        foreign = _foreign(out, own) if own is not None else []
    except OSError as e:
        raise ConfigError(f"{out}: cannot read the report folder ({e.strerror or e})") from e
    if own is None:
        raise ConfigError(
            f"{out} is not a cnnfeat report (it holds {_names(entries)}); give a new or empty folder, or one that a "
            "previous cnnfeat-report wrote: nothing in this one is removed or replaced"
        )
    if foreign:
        raise ConfigError(
            f"{out} holds {_names(foreign)}, which cnnfeat-report did not write; move them out of the report folder "
            "or give another folder"
        )
    return out


def _new_dir(out: Path, kind: str) -> Path:
    """A new folder beside ``out`` (``.<name>.<kind>-<random>``, made with the usual permissions), never one that
    was there before."""
    while True:
        path = out.parent / f".{out.name or REPORT_DIR}.{kind}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _build(out: Path, fill: Any) -> None:
    """Write a report into a temporary folder beside ``out`` (``fill(tmp)``), add the marker listing its files, and
    move it to ``out`` (checked by ``report_folder``). A folder that exists is kept (it may be the working
    directory); only the previous report's own files leave it."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_dir(out, "tmp")
    except OSError as e:
        raise ConfigError(f"{out}: cannot create the report folder here ({e.strerror or e})") from e
    try:
        fill(tmp)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        (tmp / MARKER).write_text(json.dumps({"written_by": "cnnfeat-report", "files": files}, indent=0) + "\n")
        if not out.exists():
            os.rename(tmp, out)
            return
        report_folder(out)  # again, just before replacing: nothing of the user's has arrived meanwhile
        old = _new_dir(out, "old")
        for name in os.listdir(out):
            os.rename(out / name, old / name)
        for name in os.listdir(tmp):
            os.rename(tmp / name, out / name)
        shutil.rmtree(old)
    except OSError as e:
        raise ReportWriteError(f"{out}: cannot write the report ({e.strerror or e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_report(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write ``<run dir>/report/index.html`` (or ``out/index.html``) and its pages and assets; returns index.html.

    ``out`` must be new, empty, or a previous report (see ``report_folder``); a ``ConfigError`` says why not."""
    start = time.perf_counter()
    dest = Path(out) if out is not None else Path(run_dir) / REPORT_DIR
    target = report_folder(dest)
    data = RunData.read(run_dir)
    if not data.has_anything():
        raise ConfigError(
            f"{run_dir}: nothing to report (no status.json, config, TensorBoard events or atlas); is it a cnnfeat run "
            "directory?"
        )
    _build(target, lambda tmp: _Writer(data, tmp).write())
    log.info("Report: %s (%.1f s)", dest / "index.html", time.perf_counter() - start)
    return dest / "index.html"


# -- a multirun -------------------------------------------------------------------------------------------
def sweep_jobs(sweep_dir: Path) -> dict[str, Path]:
    """A multirun's job directories labelled by their differing overrides (``cnnfeat.figures.multirun_jobs``)."""
    from cnnfeat.figures import multirun_jobs

    return multirun_jobs(sweep_dir)


def is_sweep(path: Path) -> bool:
    try:
        return (
            path.is_dir()
            and any(p.is_dir() and p.name.isdigit() for p in path.iterdir())
            and not os.path.lexists(path / "status.json")
        )
    except OSError:
        return False


def write_sweep_report(sweep_dir: Path | str, jobs_too: bool = True, out: Path | str | None = None) -> Path:
    """Each job's report (``jobs_too``), then ``<sweep dir>/report/index.html`` (or ``out/index.html``) linking them
    side by side. A job that cannot be read or reported is skipped with a warning."""
    sweep_dir = Path(sweep_dir)
    dest = Path(out) if out is not None else sweep_dir / REPORT_DIR
    target = report_folder(dest)
    try:
        jobs = sweep_jobs(sweep_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    columns = []
    for label, job in jobs.items():
        try:
            d = RunData.read(job)
        except CnnfeatError as e:
            log.warning("No report for job %s: %s", job, e)
            continue
        index = None
        if jobs_too:
            try:
                index = write_report(job)
            except CnnfeatError as e:
                log.warning("No report for job %s: %s", job, e)
        elif (job / REPORT_DIR / "index.html").is_file():
            index = job / REPORT_DIR / "index.html"
        columns.append((label, job, index, d))
    out_abs = target

    def rel(path: Path) -> str:
        return os.path.relpath(os.path.abspath(path), out_abs)

    head = ["", *[f"job {esc(job.name)}" for _, job, _, _ in columns]]
    rows: list[list[str]] = [
        ["overrides", *[esc(label) for label, _, _, _ in columns]],
        ["report", *[f'<a href="{esc(rel(index))}">open</a>' if index else "&ndash;" for _, _, index, _ in columns]],
        [
            "status",
            *[(esc(d.status["status"]) if d.status and "status" in d.status else "&ndash;") for _, _, _, d in columns],
        ],
    ]
    for key in (_VAL_ACC, _TEST_ACC, _TRAIN_ACC, tags.DEAD_FRACTION_ALL.name, _KNN_ACC):
        vals = [_number(((d.status or {}).get("metrics") or {}).get(key)) for _, _, _, d in columns]
        if any(v is not None for v in vals):
            rows.append([esc(key), *[pct(v) for v in vals]])
    curves = []
    for _, job, _, d in columns:
        series = {t: sorted(d.per_epoch(t).items()) for t in (_TRAIN_ACC, _VAL_ACC) if t in d.scalars}
        curves.append(svg_chart(series, f"job {job.name}", "epoch", "accuracy", width=360, height=220))
    rows.append(["accuracy", *curves])
    thumbs = []
    for _, job, index, d in columns:
        gif = index.parent / "assets" / "umap_embedding.gif" if index is not None else None
        if d.gif_size is not None and gif is not None and gif.is_file():
            w, h = d.gif_size
            thumbs.append(img_tag(rel(gif), f"UMAP of job {job.name}", (h, w), "smooth", 300 / max(w, 1)))
        else:
            thumbs.append("&ndash;")
    if any(t != "&ndash;" for t in thumbs):
        rows.append(["UMAP", *thumbs])
    summary = sweep_dir / "summary.md"
    body = (
        f"<p>{len(columns)} jobs of <code>{esc(sweep_dir.resolve())}</code>, side by side.</p>"
        + table(head, rows)
        + (f"<p><a href='{esc(rel(summary))}'>summary.md</a></p>" if RunFiles(sweep_dir).ok(summary) else "")
    )
    text = page(f"cnnfeat sweep · {sweep_dir.name}", body)
    _build(target, lambda tmp: (tmp / "index.html").write_text(text, encoding="utf-8"))
    log.info("Sweep report: %s", dest / "index.html")
    return dest / "index.html"


def report_at_end(run_dir: Path | str) -> Path | None:
    """For the end of ``cnnfeat-train``/``cnnfeat-explore``: write the report, and log instead of failing the run."""
    try:
        return write_report(run_dir)
    except (CnnfeatError, OSError) as e:
        log.warning("No report for %s: %s", run_dir, e)
        return None


def main(argv: list[str] | None = None) -> None:
    """``cnnfeat-report PATH``: a run directory's report, or a multirun's job reports and their index."""
    p = argparse.ArgumentParser(
        prog="cnnfeat-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("path", type=Path, help="a run directory (outputs/runs/...) or a multirun (outputs/multirun/...)")
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        help="report folder (default: PATH/report); it must be new, empty, or a previous report",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = args.path
        if not path.exists():
            raise ConfigError(f"{path}: no such directory")
        if not path.is_dir():
            raise ConfigError(f"{path} is {'a file' if path.is_file() else 'not a folder'}, not a run directory")
        index = write_sweep_report(path, out=args.out) if is_sweep(path) else write_report(path, args.out)
    except CnnfeatError as e:
        print(f"cnnfeat-report: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(index)


if __name__ == "__main__":
    main()
