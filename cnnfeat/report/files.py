"""What of a run directory the report may read: regular files reached without a symbolic link and inside the run
directory. Everything the report reads goes through ``RunFiles``."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("cnnfeat")

#: the report's folder inside a run directory (the default destination; never read back as part of the run)
REPORT_DIR = "report"
_LINK = "a symbolic link; skipped (the report reads only regular files inside the run directory)"


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
