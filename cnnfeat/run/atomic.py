"""Write files so that a reader sees the old version or the new one, never half of one.

The data goes to a temporary file *in the destination's own directory* (so the final rename never crosses a
filesystem, where it would become a copy), is flushed and ``fsync``-ed, then ``os.replace``-d over the
destination, and the directory entry is ``fsync``-ed. A failure (disk full, a kill) leaves the destination
as it was; the temporary file is removed on an error, and one left behind by a killed process is removed by
:func:`remove_orphans` the next time that directory is written to.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("cnnfeat")

_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def json_safe(value: Any) -> Any:
    """Plain JSON values: non-finite floats become strings, tensors/numpy scalars numbers, unknowns strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    return str(value)


def tmp_path(path: Path) -> Path:
    """The temporary file beside ``path`` that this process writes before renaming it into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_orphans(directory: Path) -> list[Path]:
    """Delete temporary files in ``directory`` left by processes that no longer run; returns what was removed."""
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TMP.match(p.name)
        if m and not _alive(int(m["pid"])):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
                log.info("Removed %s, left by an interrupted write", p)
    return removed


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened / synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it is synced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path.parent)
    tmp = tmp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write(path: Path | str, write: Callable[[IO], object]) -> Path:
    """Call ``write(f)`` on a temporary binary file and move it onto ``path`` atomically (see the module doc)."""
    with atomic_open(path) as f:
        write(f)
    return Path(path)


def is_disk_full(e: BaseException) -> bool:
    """Whether an error (or what caused it) says the device is out of space."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:  # a chain of causes can loop (an exception re-raised in its handler)
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(e) or "file write failed" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
