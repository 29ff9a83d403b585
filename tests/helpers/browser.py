"""Drive Debian's headless Chromium over the DevTools protocol on a pipe (stdlib only: no websockets, no Selenium).

``Chromium`` starts ``/usr/bin/chromium --headless --remote-debugging-pipe`` with a fresh profile and no network
services; ``check(url)`` loads a page and reports what went wrong: uncaught exceptions, console errors, log
errors (a missing file shows up as "Failed to load resource"), requests that leave ``file:``/``data:``, and images
that did not decode (``naturalWidth == 0``). ``screenshot(url, path)`` saves a full-page PNG.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import selectors
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--disable-dev-shm-usage",  # /dev/shm may be small or filled by other tests: shared memory files go to /tmp
    "--remote-debugging-pipe",
)

_BROKEN_IMAGES = (
    "JSON.stringify(Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src))"
)


@dataclass
class PageCheck:
    """What one page load produced."""

    url: str
    errors: list[str] = field(default_factory=list)  # exceptions, console and log errors
    foreign_requests: list[str] = field(default_factory=list)  # anything but file: and data:
    broken_images: list[str] = field(default_factory=list)
    images: int = 0
    title: str = ""

    @property
    def ok(self) -> bool:
        return not (self.errors or self.foreign_requests or self.broken_images)


class Chromium:
    """One headless Chromium with a DevTools pipe; use as a context manager."""

    def __init__(self, binary: Path = CHROMIUM, timeout: float = 60.0) -> None:
        self.binary, self.timeout = binary, timeout
        self._id = 0
        self._buf = b""
        self._events: list[dict[str, Any]] = []

    def __enter__(self) -> Chromium:
        self.profile = tempfile.mkdtemp(prefix="cnnfeat-chromium-")
        cmd_r, self._cmd_w = os.pipe()  # we write commands, Chromium reads fd 3
        self._out_r, out_w = os.pipe()  # Chromium writes fd 4, we read
        args = [*FLAGS, f"--user-data-dir={self.profile}", "about:blank"]
        self._log = open(Path(self.profile) / "chromium.log", "w+b")
        # bash, not sh: dash takes one-digit file descriptors only, and a test process has many open
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w}', str(self.binary), *args],
            pass_fds=(cmd_r, out_w),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        os.close(cmd_r)
        os.close(out_w)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._out_r, selectors.EVENT_READ)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):  # already gone
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._sel.close()
        self._log.close()
        for fd in (self._cmd_w, self._out_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    # -- protocol --
    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(timeout=left):
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                self._log.seek(0)
                tail = self._log.read().decode(errors="replace").splitlines()[-15:]
                raise RuntimeError(
                    f"Chromium closed the DevTools pipe (exit code {self.proc.poll()}); its log ends:\n"
                    + "\n".join(tail)
                )
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def _wait_for(self, method: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == method for e in self._events):
            self._events.append(self._read(deadline))

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def load(self, url: str) -> None:
        self._events.clear()
        self.call("Page.navigate", session=True, url=url)
        self._wait_for("Page.loadEventFired")

    # -- checks --
    def check(self, url: str) -> PageCheck:
        """Load ``url`` and collect errors, foreign requests and broken images."""
        self.load(url)
        out = PageCheck(url)
        out.broken_images = json.loads(self.evaluate(_BROKEN_IMAGES) or "[]")
        out.images = int(self.evaluate("document.images.length") or 0)
        out.title = str(self.evaluate("document.title") or "")
        for e in self._events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.errors.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
            elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.errors.append(f"console.{p.get('type')}: {p.get('args')}")
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif method == "Network.requestWillBeSent":
                req = p.get("request", {}).get("url", "")
                if not req.startswith(("file:", "data:", "about:")):
                    out.foreign_requests.append(req)
            elif method == "Network.loadingFailed":
                out.errors.append(f"failed to load: {p.get('errorText')} ({p.get('requestId')})")
        return out

    def screenshot(self, url: str, path: Path, width: int = 1280, max_height: int = 2400) -> Path:
        """A PNG of ``url`` (full page up to ``max_height`` pixels) at ``path``."""
        self.load(url)
        height = int(self.evaluate("document.documentElement.scrollHeight") or 900)
        clip = {"x": 0, "y": 0, "width": width, "height": min(height, max_height), "scale": 1}
        data = self.call("Page.captureScreenshot", session=True, format="png", clip=clip, captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path
