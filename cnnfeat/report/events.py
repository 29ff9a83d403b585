"""The one reader of TensorBoard event files: every ``events.out.tfevents.*`` of a run, merged in time order.

A run directory can hold several event files: Lightning's logger opens a new one for testing and for the HParams
record after the fit, and a run resumed from a checkpoint writes its own next to the first run's. ``read`` merges
the records of all of them by the time each was written (the event's ``wall_time``; a tie goes to the file started
later), so when a step of a tag was written twice (a resumed run re-logging an epoch, the HParams metrics of each
fit), the newer write wins, whatever the files are named or wherever they are. ``records`` gives every record in
that order, nothing dropped (for tests that count writes).

The raw event records are read (no TensorBoard accumulator, which keeps each file apart) and only what the caller
wants is decoded. A corrupt or truncated file gives what it holds before the damage, and the caller hears of it
(``on_damage``); which files are read at all is the caller's choice (``event_files(accept=...)``: the report reads
only regular files inside the run). Tag names are in ``cnnfeat.tags``. No Lightning is imported.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnfeat.run import event_crc
from cnnfeat.tags import Kind

log = logging.getLogger("cnnfeat")

#: the names TensorBoard's ``SummaryWriter`` gives its files
EVENT_FILES = "events.out.tfevents.*"
#: kinds of a record beside ``cnnfeat.tags.Kind``: another tensor summary, or anything else (audio, ...)
TENSOR, OTHER = "tensor", "other"

#: ``want(tag, kind)``: whether to keep a record's value (every record's tag and kind are listed anyway)
Want = Callable[[str, str], bool]
#: ``on_damage(path, why)``: a file that could not be read, or only in part
OnDamage = Callable[[Path, str], None]


def event_files(
    run_dir: Path | str, accept: Callable[[Path], bool] | None = None, skip_dirs: Collection[str] = ()
) -> list[Path]:
    """The event files below ``run_dir`` (any depth) that ``accept`` allows (default: regular files), none inside a
    folder named in ``skip_dirs``; oldest first (by modification time, then name: the order damage is reported in)."""
    run_dir = Path(run_dir)
    accept = accept or Path.is_file
    found = [
        f
        for f in run_dir.rglob(EVENT_FILES)
        if not set(f.relative_to(run_dir).parts[:-1]) & set(skip_dirs) and accept(f)
    ]

    def age(path: Path) -> tuple[float, str]:
        try:
            return path.stat().st_mtime, path.name
        except OSError:  # gone or unreadable: reading it says so
            return -math.inf, path.name

    return sorted(found, key=age)


@dataclass(frozen=True)
class Record:
    """One summary value as written: tag, step, when, its kind, and its protobuf (``None`` when not wanted)."""

    tag: str
    step: int
    wall_time: float
    kind: str  #: a ``cnnfeat.tags.Kind`` value, ``tensor`` or ``other``
    value: Any = field(repr=False)  #: ``tensorboard.compat.proto.summary_pb2.Summary.Value`` or None
    file: Path = field(repr=False)
    #: (wall time, start of its file, file, position in the file): the merge order
    order: tuple[float, float, str, int] = field(repr=False, default=(0.0, 0.0, "", 0))

    def scalar(self) -> float:
        if self.value.WhichOneof("value") == "simple_value":
            return float(self.value.simple_value)
        from tensorboard.util import tensor_util

        return float(tensor_util.make_ndarray(self.value.tensor).reshape(()))

    def image(self) -> bytes:
        """The encoded picture (PNG for cnnfeat's)."""
        return self.value.image.encoded_image_string

    def histogram(self) -> Any:
        """The ``HistogramProto`` (min, max, num, sum, sum_squares, bucket_limit, bucket)."""
        return self.value.histo

    def text(self) -> str:
        return "\n".join(s.decode("utf-8", errors="replace") for s in self.value.tensor.string_val)


def kind_of(value: Any) -> str:
    """What a ``Summary.Value`` holds, as ``cnnfeat.tags.Kind`` names it (``tensor`` / ``other`` otherwise)."""
    which = value.WhichOneof("value")
    plugin = value.metadata.plugin_data.plugin_name
    if which == "simple_value":
        return Kind.SCALAR.value
    if which == "image":
        return Kind.IMAGE.value
    if which == "histo":
        return Kind.HISTOGRAM.value
    if which == "tensor":
        if plugin == "text":
            return Kind.TEXT.value
        if plugin == "scalars":  # a scalar written as a tensor (TensorFlow 2, SummaryWriter(new_style=True))
            from tensorboard.util import tensor_util

            arr = tensor_util.make_ndarray(value.tensor)
            if arr.size == 1 and arr.dtype.kind in "fiub":
                return Kind.SCALAR.value
        return TENSOR
    if which is None and plugin == "hparams":
        return Kind.HPARAMS.value
    return OTHER


def _frames(path: Path) -> tuple[int, bool]:
    """TFRecord frames in an event file, counted from their length headers, and whether they fill it exactly."""
    size, offset, count = path.stat().st_size, 0, 0
    with open(path, "rb") as f:
        while offset + 12 <= size:
            f.seek(offset)
            (length,) = struct.unpack("<Q", f.read(8))
            offset += 12 + length + 4
            count += offset <= size
    return count, offset == size


def _warn(path: Path, why: str) -> None:
    log.warning("%s: %s", path, why)


def records(paths: Iterable[Path | str], want: Want | None = None, on_damage: OnDamage | None = None) -> list[Record]:
    """Every summary value of the files ``paths``, in the order they were written (see the module docstring).

    ``want(tag, kind)`` false: the record is listed with ``value=None``. A file that cannot be read, or only in part
    (corrupt, truncated), gives the records before the damage and a call ``on_damage(path, why)`` (default: a
    warning)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    event_crc.install()  # the records' checksums at compiled speed (cnnfeat.run.event_crc)
    on_damage = on_damage or _warn
    out: list[Record] = []
    for f in map(Path, paths):
        read, start, found = 0, math.inf, []
        try:
            for event in LegacyEventFileLoader(str(f)).Load():
                read += 1
                start = min(start, event.wall_time)  # its first record: the file's version, written on opening
                if event.HasField("summary"):
                    found += [(v, event.step, event.wall_time) for v in event.summary.value]
            frames, exact = _frames(f)
        except OSError as e:
            on_damage(f, f"cannot be read ({e.strerror or e}); skipped")
            frames, exact = read, True
        for i, (v, step, wall_time) in enumerate(found):
            kind = kind_of(v)
            value = v if want is None or want(v.tag, kind) else None
            out.append(Record(v.tag, step, wall_time, kind, value, f, (wall_time, start, str(f), i)))
        if read < frames or not exact:
            on_damage(f, f"corrupt or truncated event file: read its first {read} records, skipped the rest")
    out.sort(key=lambda r: r.order)
    return out


@dataclass
class Events:
    """The values of a run by kind and tag, one per step (the newest write), sorted by step."""

    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    images: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    histograms: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    #: every tag seen (wanted or not), as stored, and its kind
    kinds: dict[str, str] = field(default_factory=dict)

    @classmethod
    def merge(cls, recs: Iterable[Record]) -> Events:
        """Records in the order they were written (``records``) -> the newest value of each tag and step."""
        newest: dict[str, dict[str, dict[int, Record]]] = {kind: {} for kind in _DECODE}
        kinds: dict[str, str] = {}
        for r in recs:
            kinds.setdefault(r.tag, r.kind)
            if r.value is not None and r.kind in _DECODE:
                newest[r.kind].setdefault(r.tag, {})[r.step] = r  # a later write of a step replaces the earlier

        def by_step(kind: Kind) -> dict[str, list[tuple[int, Any]]]:
            decode = _DECODE[kind.value]
            return {tag: [(s, decode(r)) for s, r in sorted(d.items())] for tag, d in newest[kind.value].items()}

        return cls(by_step(Kind.SCALAR), by_step(Kind.IMAGE), by_step(Kind.HISTOGRAM), by_step(Kind.TEXT), kinds)

    def latest_images(self) -> dict[str, tuple[int, bytes]]:
        """Each image tag's picture of its highest step."""
        return {t: v[-1] for t, v in self.images.items() if v}


_DECODE: dict[str, Callable[[Record], Any]] = {
    Kind.SCALAR.value: Record.scalar,
    Kind.IMAGE.value: Record.image,
    Kind.HISTOGRAM.value: Record.histogram,
    Kind.TEXT.value: Record.text,
}


def read(paths: Iterable[Path | str], want: Want | None = None, on_damage: OnDamage | None = None) -> Events:
    """The files ``paths`` merged: one value per tag and step, the newest write (see ``records``)."""
    return Events.merge(records(paths, want, on_damage))


def read_run(
    run_dir: Path | str,
    want: Want | None = None,
    on_damage: OnDamage | None = None,
    accept: Callable[[Path], bool] | None = None,
    skip_dirs: Collection[str] = (),
) -> Events:
    """Every event file below ``run_dir`` (``event_files``), merged (``read``)."""
    return read(event_files(run_dir, accept, skip_dirs), want, on_damage)


def read_scalars(run_dir: Path | str, prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """All scalars under ``run_dir`` whose tag starts with ``prefix``: ``{tag: [(step, value), ...]}`` by step, one
    value per step (the newest write)."""
    wanted = Kind.SCALAR.value
    return read_run(run_dir, lambda tag, kind: kind == wanted and tag.startswith(prefix)).scalars


__all__ = [
    "EVENT_FILES",
    "Events",
    "Record",
    "event_files",
    "kind_of",
    "read",
    "read_run",
    "read_scalars",
    "records",
]
