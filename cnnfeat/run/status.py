"""How a run ended, in ``<run dir>/status.json``, and one live process per run directory.

Statuses: ``running``, ``finished``, ``diverged``, ``interrupted`` (SIGTERM / Ctrl-C), ``failed`` (with the
error). The file is valid JSON (non-finite numbers are written as the strings ``"nan"``, ``"inf"``,
``"-inf"``) and is replaced atomically; when the disk is too full for a new file, it is overwritten in place
(its first version is padded so that this needs no new space).

:class:`RunLock` holds an exclusive ``flock`` on ``<run dir>/.lock`` for the life of the process (the kernel
drops it when the process dies, even by SIGKILL), so a second process pointed at the same directory stops
with a message instead of mixing its checkpoints, logs and status into the first one's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, ClassVar

from cnnfeat.errors import RunDirectoryBusy
from cnnfeat.run.atomic import atomic_write, json_safe

#: exit codes of cnnfeat-train / cnnfeat-explore
EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR, EXIT_DIVERGED = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143

_PAD = 2048  # bytes the first status file is padded to, for in-place updates on a full disk


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's status record, or None when there is none (or it cannot be parsed)."""
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return None


def write_status(run_dir: str | Path, status: str, **info: Any) -> Path:
    """Record ``status`` (and details) in ``<run dir>/status.json``; call it from rank 0 only."""
    path = Path(run_dir) / "status.json"
    record = json_safe({"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info})
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    first = not path.exists()
    data = (text.ljust(_PAD) if first else text).encode()
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError:
        if first:
            raise
        with open(path, "r+b") as f:  # no room for a new file: overwrite the padded old one in place
            f.write(text.encode().ljust(max(len(text), _PAD)))
            f.truncate()
    return path


class RunLock:
    """An exclusive, process-lifetime lock on a run directory (see the module docstring)."""

    _held: ClassVar[dict[Path, RunLock]] = {}

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.path = self.run_dir / ".lock"
        self._fd: int | None = None

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        """Lock ``run_dir`` for this process (idempotent within the process); raise when another holds it."""
        key = Path(run_dir).resolve()
        if key in cls._held:
            return cls._held[key]
        lock = cls(key)
        lock.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirectoryBusy(
                f"The run directory {lock.run_dir} is in use by {holder}. Wait for it to end, or give this run "
                "another hydra.run.dir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"PID {os.getpid()} on {socket.gethostname()}".encode())
        lock._fd = fd
        cls._held[key] = lock
        return lock

    @classmethod
    def is_held(cls, run_dir: str | Path) -> bool:
        """Whether this process already holds the lock of ``run_dir``."""
        return Path(run_dir).resolve() in cls._held

    def release(self) -> None:
        """Drop the lock (also dropped by the kernel when the process ends)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None
        type(self)._held.pop(self.run_dir, None)

    @classmethod
    def release_all(cls) -> None:
        for lock in list(cls._held.values()):
            lock.release()
