"""The compiled CRC-32C that cnnfeat installs into TensorBoard's event writer and reader gives TensorBoard's values."""

from __future__ import annotations

import array
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as stub
from torch.utils.tensorboard import SummaryWriter

from cnnfeat.run import event_crc


def _pure(data: bytes) -> int:
    """TensorBoard's own pure-Python CRC-32C (what ``stub.crc32c`` is before ``install``)."""
    return stub.crc_finalize(stub.crc_update(stub.CRC_INIT, data))


def _masked(crc: int) -> int:
    """TensorBoard's masking of a record checksum (``pywrap_tensorflow.masked_crc32c``)."""
    return stub.u32(((crc >> 15) | stub.u32(crc << 17)) + 0xA282EAD8)


def test_the_check_value_and_random_data_of_many_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stub, "crc32c", stub.crc32c)
    assert event_crc.install()  # compiles the kernel, on this thread
    assert event_crc.crc32c(b"123456789") == 0xE3069283 == _pure(b"123456789")  # the CRC-32C check value
    for n in (0, 1, 2, 7, 8, 9, 255, 256, 1000, 4097, 65_537):
        data = os.urandom(n)
        assert event_crc.crc32c(data) == _pure(data), n
        assert event_crc.crc32c(bytearray(data)) == _pure(data)
        assert event_crc.crc32c(memoryview(data)) == _pure(data)
    # what the compiled kernel does not take goes to tensorboard's own loop: the same value, never a wrong one
    data = os.urandom(64)
    for other in (list(data), memoryview(data)[::2], array.array("B", data), np.frombuffer(data, dtype=np.uint8)[::3]):
        assert event_crc.crc32c(other) == _pure(other), type(other)
    with pytest.raises(OverflowError):  # tensorboard's own loop refuses wider items, and so does ours (it is the same)
        event_crc.crc32c(array.array("H", [300]))


def test_installed_events_round_trip_and_an_edit_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stub, "crc32c", stub.crc32c)  # restored after the test
    assert event_crc.install() and stub.crc32c is event_crc.crc32c
    assert event_crc.install(), "idempotent"
    w = SummaryWriter(tmp_path)
    w.add_image("pic", torch.rand(3, 64, 80), 3)
    w.add_scalar("x", 0.25, 3)
    w.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("pic")] == [3] and acc.Scalars("x")[0].value == 0.25
    (path,) = tmp_path.glob("events.*")
    raw = path.read_bytes()
    offset, checked = 0, 0  # every record's two checksums, recomputed with the pure-Python CRC
    while offset < len(raw):
        length = int.from_bytes(raw[offset : offset + 8], "little")
        header_crc = int.from_bytes(raw[offset + 8 : offset + 12], "little")
        data = raw[offset + 12 : offset + 12 + length]
        data_crc = int.from_bytes(raw[offset + 12 + length : offset + 16 + length], "little")
        assert header_crc == _masked(_pure(raw[offset : offset + 8]))
        assert data_crc == _masked(_pure(data))
        offset += 16 + length
        checked += 1
    assert checked >= 3


def test_uninstall_and_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stub, "crc32c", stub.crc32c)  # whatever it is now comes back after the test
    event_crc.install()
    event_crc.uninstall()
    assert stub.crc32c is not event_crc.crc32c and stub.crc32c.__module__ == stub.__name__, "tensorboard's own"
    assert stub.crc32c(b"123456789") == 0xE3069283
    monkeypatch.setenv("CNNFEAT_FAST_CRC", "0")
    assert not event_crc.install() and stub.crc32c is not event_crc.crc32c


def test_pictures_encoded_side_by_side_are_the_bytes_and_order_of_add_image(tmp_path: Path) -> None:
    """``Pictures.write`` encodes a render's PNGs on threads; the event file holds what ``add_image`` one after the
    other writes: the same tags, steps, sizes and PNG bytes, in the same order."""
    from cnnfeat.callbacks.base import Pictures
    from tests.conftest import read_events

    g = torch.Generator().manual_seed(0)
    images = {f"maps/img{i}": (torch.rand(3, 20 + i, 30, generator=g) * 4).round() / 4 for i in range(9)}
    images["one/grey_like"] = torch.full((3, 5, 7), 0.5)
    for name, threaded in (("seq", False), ("par", True)):
        with SummaryWriter(tmp_path / name) as w:
            if threaded:
                Pictures(images=images).write(w, 3)
            else:
                for tag, img in images.items():
                    w.add_image(tag, img, 3, dataformats="CHW")
    seq, par = read_events(tmp_path / "seq")["images"], read_events(tmp_path / "par")["images"]
    assert list(par) == list(seq) == list(images), "every picture, in the order given"
    for tag in images:
        ((a,), (b,)) = seq[tag], par[tag]
        fields = ("step", "width", "height", "encoded_image_string")
        assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields], tag
