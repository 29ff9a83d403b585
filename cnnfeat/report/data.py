"""What a run holds, as the report shows it: status, config, scalars and pictures of the event files, the UMAP GIF,
the atlas (checked against its manifest) and ``explored.json``, all read through ``RunFiles``."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cnnfeat import tags
from cnnfeat.atlas import ATLAS_DIR, MANIFEST, Atlas, LayerInfo
from cnnfeat.errors import ConfigError, DataError
from cnnfeat.report import events
from cnnfeat.report.files import REPORT_DIR, RunFiles

log = logging.getLogger("cnnfeat")

#: written by cnnfeat-explore beside its pictures: the epochs it drew, those without a checkpoint, their files
EXPLORED = "explored.json"
#: TensorBoard image tags shown on the overview, by prefix (the representation callbacks' pictures)
IMAGE_PREFIXES = (tags.CKA_NAMESPACE, tags.PROBE_NAMESPACE, tags.UNITS_RASTER.prefix)
_TRAIN_ACC, _TRAIN_LOSS = tags.TRAIN_ACC.name, tags.TRAIN_LOSS.name
_VAL_ACC, _VAL_LOSS, _TEST_ACC = tags.VAL_ACC.name, tags.VAL_LOSS.name, tags.TEST_ACC.name
_KNN_ACC = tags.UMAP_QUALITY.format(metric="knn_acc")
_IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


#: TensorBoard image tags shown at every step, not only the last (the attribution strips), by prefix
SERIES_PREFIXES = (tags.ATTRIBUTION.prefix,)


def _wanted(tag: str, kind: str) -> bool:
    """What the report decodes of the event files: every scalar, the pictures shown by prefix (the attribution
    strips at every step) and the importance tables."""
    if kind == tags.Kind.SCALAR:
        return True
    if kind == tags.Kind.IMAGE:
        return tag.startswith(IMAGE_PREFIXES + SERIES_PREFIXES)
    return kind == tags.Kind.TEXT and tags.IMPORTANCE_TABLE.match(tag) is not None


@dataclass(frozen=True)
class UnitImportance:
    """One row of an importance table (``importance/<layer>/table``): a removed unit and what the network lost."""

    rank: int
    unit: int
    acc_drop: float
    logit_drop: float
    firing: float
    role: str  #: empty, or how the table calls the unit out (``tags.ROLE_BUSY_IDLE`` / ``tags.ROLE_RARE_VITAL``)

    @property
    def busy_idle(self) -> bool:
        return self.role == tags.ROLE_BUSY_IDLE

    @property
    def rare_vital(self) -> bool:
        return self.role == tags.ROLE_RARE_VITAL


_IMPORTANCE_HEAD = tags.IMPORTANCE_TABLE_COLUMNS


def importance_rows(text: str) -> list[UnitImportance]:
    """The markdown table of ``importance/<layer>/table`` as rows; a ``DataError`` saying what is wrong otherwise."""
    lines = [line.strip() for line in text.strip().splitlines()]

    def cells(line: str) -> list[str]:
        if not (line.startswith("|") and line.endswith("|")):
            raise DataError(f"not a markdown table row: {line!r:.60}")
        return [c.strip() for c in line[1:-1].split("|")]

    if len(lines) < 2 or tuple(cells(lines[0])) != _IMPORTANCE_HEAD:
        raise DataError(f"not an importance table (its header must be {' | '.join(_IMPORTANCE_HEAD)})")
    rows = []
    for line in lines[2:]:
        c = cells(line)
        if len(c) != len(_IMPORTANCE_HEAD):
            raise DataError(f"a row has {len(c)} cells, not {len(_IMPORTANCE_HEAD)}: {line!r:.60}")
        try:
            rows.append(UnitImportance(int(c[0]), int(c[1]), float(c[2]), float(c[3]), float(c[4]), c[5]))
        except ValueError as e:
            raise DataError(f"a row holds a value that is not a number ({e}): {line!r:.60}") from e
    return rows


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


def _importance(
    texts: Mapping[str, list[tuple[int, str]]], files: RunFiles
) -> dict[str, dict[int, list[UnitImportance]]]:
    """The importance tables of the event files by layer and step; a table that does not parse is noted, not shown."""
    out: dict[str, dict[int, list[UnitImportance]]] = {}
    for tag, steps in sorted(texts.items()):
        found = tags.IMPORTANCE_TABLE.match(tag)
        if found is None:
            continue
        for step, text in steps:
            try:
                out.setdefault(found["layer"], {})[step] = importance_rows(text)
            except DataError as e:
                files.notes.append(f"TensorBoard text {tag} (step {step}): {e}; not shown")
                log.warning("Report of %s: %s", files.dir, files.notes[-1])
    return {layer: by_step for layer, by_step in out.items() if by_step}


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
    #: the pictures shown at every step (``SERIES_PREFIXES``): tag -> [(step, PNG bytes)] by step
    image_series: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict, repr=False)
    #: the importance tables as logged: layer -> {step: rows, most important first}
    importance: dict[str, dict[int, list[UnitImportance]]] = field(default_factory=dict)

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
        scalars = logged.scalars
        images = {t: v for t, v in logged.latest_images().items() if t.startswith(IMAGE_PREFIXES)}
        series = {t: v for t, v in logged.images.items() if t.startswith(SERIES_PREFIXES) and v}
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
            image_series=series,
            importance=_importance(logged.texts, files),
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
