"""CRC-32C of TensorBoard's event records at compiled speed (the same checksums).

Without TensorFlow, tensorboard checksums every event record it writes or reads in pure Python, a byte at a time
(``tensorboard.compat.tensorflow_stub.pywrap_tensorflow.crc32c``, about 8 MB/s on a 2-core CPU). Pictures make the
records large: a seed run writes about 9 MB of PNGs, a second of CPU in TensorBoard's writer thread, holding the GIL
while training and the callbacks wait, and as long again when the report reads them back. ``install`` replaces that
one function with the same table-driven CRC-32C compiled by numba (a cnnfeat dependency already, for UMAP), which
releases the GIL while it runs (about 400 MB/s). Both the writer (``RecordWriter``) and the reader
(``PyRecordReader_New``) call it through the stub's ``masked_crc32c``. The values are equal to the pure-Python ones
(tested on the standard check value and on random data of many lengths). ``install`` is idempotent (``uninstall``
puts tensorboard's function back), runs only where
cnnfeat writes or reads events (``Pictures.write``, ``cnnfeat.report.events.records``), and leaves tensorboard as
it is where numba is missing, where the function was already replaced, or where ``CNNFEAT_FAST_CRC=0``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache

import numpy as np

_STUB = "tensorboard.compat.tensorflow_stub.pywrap_tensorflow"
#: tensorboard's own function, kept by ``install`` for ``uninstall``
_replaced: list[Callable[[bytes], int]] = []


@cache
def _kernel() -> Callable[[np.ndarray, np.ndarray], int]:
    import numba

    @numba.njit(cache=True, nogil=True)
    def crc(buf: np.ndarray, table: np.ndarray) -> int:  # pragma: no cover - compiled
        value = np.uint32(0xFFFFFFFF)
        for b in buf:
            value = table[(value ^ b) & 0xFF] ^ (value >> np.uint32(8))
        return value ^ np.uint32(0xFFFFFFFF)

    return crc


@cache
def _table() -> np.ndarray:
    import importlib

    return np.asarray(importlib.import_module(_STUB).CRC_TABLE, dtype=np.uint32)


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli) of ``data``, as ``pywrap_tensorflow.crc32c`` computes it."""
    buf = np.frombuffer(data, dtype=np.uint8)
    return int(_kernel()(buf, _table()))


def install() -> bool:
    """Make tensorboard's event files checksum with ``crc32c`` (see the module docstring); True when it does."""
    if os.environ.get("CNNFEAT_FAST_CRC", "1") == "0":
        return False
    import importlib

    try:
        stub = importlib.import_module(_STUB)
    except ImportError:
        return False
    if stub.crc32c is crc32c:
        return True
    if getattr(stub.crc32c, "__module__", None) != stub.__name__:  # someone else's replacement: leave it
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    _replaced[:] = [stub.crc32c]
    stub.crc32c = crc32c
    return True


def uninstall() -> None:
    """Put tensorboard's own function back (after ``install``; otherwise nothing)."""
    import importlib

    stub = importlib.import_module(_STUB)
    if _replaced and stub.crc32c is crc32c:
        stub.crc32c = _replaced.pop()
