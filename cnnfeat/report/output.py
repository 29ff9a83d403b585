"""The report folder: written in a temporary folder beside its destination and moved in, with a marker listing its
files; only a new, empty or previous report folder is replaced (``report_folder``)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnnfeat.errors import CnnfeatError, ConfigError
from cnnfeat.report.files import REPORT_DIR

#: the file by which a folder is known as a report cnnfeat-report wrote (JSON: the files it wrote)
MARKER = ".cnnfeat-report"


class ReportWriteError(CnnfeatError, OSError):
    """The report folder could not be written (no space, no permission); the temporary folder is removed."""


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
