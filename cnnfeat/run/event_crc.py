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
def _kernel(disk_cache: bool = True) -> Callable[[np.ndarray, np.ndarray], int]:
    import numba

    @numba.njit(cache=disk_cache, nogil=True)
    def crc(buf: np.ndarray, table: np.ndarray) -> int:  # pragma: no cover - compiled
        value = np.uint32(0xFFFFFFFF)
        for b in buf:
            value = table[(value ^ b) & 0xFF] ^ (value >> np.uint32(8))
        return value ^ np.uint32(0xFFFFFFFF)

    return crc


#: the compiled kernel ``install`` made and checked (None: not installed)
_compiled: list[Callable[[np.ndarray, np.ndarray], int]] = []


@cache
def _table() -> np.ndarray:
    import importlib

    return np.asarray(importlib.import_module(_STUB).CRC_TABLE, dtype=np.uint32)


def _pure(data: object) -> int:
    """tensorboard's own CRC-32C (any input it accepts: bytes, arrays, iterables of bytes)."""
    import importlib

    stub = importlib.import_module(_STUB)
    return stub.crc_finalize(stub.crc_update(stub.CRC_INIT, data))


def crc32c(data: object) -> int:
    """CRC-32C (Castagnoli) of ``data``, as ``pywrap_tensorflow.crc32c`` computes it: bytes-like input (what
    tensorboard passes) by the compiled kernel once ``install`` made one, anything else by tensorboard's own loop."""
    if _compiled and (
        isinstance(data, bytes | bytearray)
        or (isinstance(data, memoryview) and data.c_contiguous and data.itemsize == 1)
    ):
        return int(_compiled[0](np.frombuffer(data, dtype=np.uint8), _table()))
    return _pure(data)


def _compile() -> bool:
    """Compile the kernel here (not in TensorBoard's writer thread) and check it on CRC-32C's check value; numba's
    disk cache first, in memory where no cache directory is writable. False when neither works."""
    for disk_cache in (True, False):
        try:
            kernel = _kernel(disk_cache)
            if int(kernel(np.frombuffer(b"123456789", dtype=np.uint8), _table())) == 0xE3069283:
                _compiled[:] = [kernel]
                return True
        except Exception:  # numba's errors vary (no cache locator, no compiler): keep tensorboard's
            continue
    return False


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
    if not _compiled and not _compile():
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
