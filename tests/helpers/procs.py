"""Run cnnfeat's entry points as processes and wait for *states* (files, log lines), never for fixed times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path


def cli(module: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> list[str]:
    """The command line of ``python -m <module> args``."""
    return [sys.executable, "-m", module, *args]


def run(module: str, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    """Run an entry point to completion; returns ``subprocess.CompletedProcess`` with text output."""
    return subprocess.run(
        cli(module, *args),
        cwd=cwd,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Proc:
    """A running entry point whose combined output is collected in the background (for ``wait_for_line``)."""

    def __init__(self, module: str, *args: str, cwd: Path | None = None, env: dict | None = None) -> None:
        self.p = subprocess.Popen(
            cli(module, *args),
            cwd=cwd,
            env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, needle: str | Callable[[str], bool], timeout: float = 240) -> str:
        """Block until an output line contains ``needle`` (or satisfies it); fail if the process ends first."""
        match = needle if callable(needle) else (lambda line: needle in line)
        wait_for(
            lambda: any(match(x) for x in self.lines) or self.p.poll() is not None,
            timeout,
            f"a line matching {needle!r}",
        )
        found = [x for x in self.lines if match(x)]
        assert found, f"process ended (rc={self.p.returncode}) before printing {needle!r}:\n{self.output[-3000:]}"
        return found[0]

    def wait(self, timeout: float = 300) -> int:
        rc = self.p.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc


def wait_for(predicate: Callable[[], bool], timeout: float = 240, what: str = "a condition") -> None:
    """Poll ``predicate`` until it holds (raises ``TimeoutError`` naming ``what`` after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def strict_json(path: Path) -> dict:
    """Parse a JSON file, refusing the non-standard ``NaN``/``Infinity`` tokens Python's json would accept."""

    def refuse(token: str) -> None:
        raise ValueError(f"{path} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)
