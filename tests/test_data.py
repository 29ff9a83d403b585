"""FashionMNISTDataModule on the real files: shapes, splits, equivalence with torchvision, bad input."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.datasets import FashionMNIST
from torchvision.transforms import ToTensor

from cnnfeat.data.fashion_mnist import CLASSES, ENV_DATA, DataError, FashionMNISTDataModule, to_float

STEMS = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def _raw(data_dir: Path) -> Path:
    return data_dir / "FashionMNIST" / "raw"


def _copy_gz(data_dir: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for s in STEMS:
        shutil.copy(_raw(data_dir) / f"{s}.gz", dest / f"{s}.gz")
    return dest


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_shapes_dtypes_and_classes(datamodule: FashionMNISTDataModule) -> None:
    assert [len(datamodule.dataset(s)) for s in ("train", "val", "test")] == [55_000, 5_000, 10_000]
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (128,) and y.dtype == torch.int64
    xf, yf = datamodule.on_after_batch_transfer((x, y), 0)
    assert xf.dtype == torch.float32 and xf.min() >= 0.0 and xf.max() <= 1.0 and xf.max() > 0.5
    assert torch.equal(yf, y)
    assert datamodule.classes == CLASSES and len(CLASSES) == 10
    assert CLASSES[0] == "T-shirt/top" and CLASSES[9] == "Ankle boot"
    assert set(datamodule.dataset("test").labels.tolist()) == set(range(10))


def test_split_is_seeded_disjoint_and_complete(data_dir: Path, cache_dir: Path) -> None:
    def split(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        dm = FashionMNISTDataModule(data_dir=data_dir, cache_dir=cache_dir, split_seed=seed, val_size=1000)
        dm.prepare_data()
        dm.setup()
        return dm.dataset("train").image_ids, dm.dataset("val").image_ids

    (tr0, va0), (tr0b, va0b), (_, va1) = split(0), split(0), split(1)
    assert torch.equal(va0, va0b) and torch.equal(tr0, tr0b)
    assert not torch.equal(va0, va1)
    assert len(va0) == 1000 and len(tr0) == 59_000
    assert torch.equal(torch.cat([tr0, va0]).sort().values, torch.arange(60_000))


def test_val_on_test_validates_on_the_official_test_set(data_dir: Path, cache_dir: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=data_dir, cache_dir=cache_dir, val_on_test=True)
    dm.prepare_data()
    dm.setup()
    assert len(dm.dataset("train")) == 60_000
    assert dm.dataset("val") is dm.dataset("test")


def test_fast_path_matches_torchvision(datamodule: FashionMNISTDataModule, data_dir: Path, tmp_path: Path) -> None:
    _copy_gz(data_dir, tmp_path / "FashionMNIST" / "raw")  # torchvision extracts next to its files
    ids = [0, 22, 193, 36, 312, 1087, 74, 9999]
    tv_test = FashionMNIST(tmp_path, train=False, download=True)
    x, y = datamodule.images("test", ids)
    for k, i in enumerate(ids):
        img, label = tv_test[i]
        assert torch.equal(x[k], ToTensor()(img)) and y[k] == label
    # training rows keep torchvision's indices; the split only selects among them
    tv_train, rows = FashionMNIST(tmp_path, train=True, download=True), datamodule.dataset("train")
    for i in ids:
        img, label = tv_train[i]
        assert torch.equal(to_float(rows.images[i : i + 1])[0], ToTensor()(img)) and rows.labels[i] == label


def test_image_ids_are_stable_and_checked(datamodule: FashionMNISTDataModule) -> None:
    x, y = datamodule.images("test", [22, 193])
    assert x.shape == (2, 1, 28, 28)
    assert torch.equal(y, datamodule.dataset("test").labels[[22, 193]])
    with pytest.raises(IndexError, match=r"\[0, 9999\].*\[10000\]"):
        datamodule.images("test", [5, 10_000])
    with pytest.raises(ValueError, match="Unknown split 'valid'"):
        datamodule.dataset("valid")


def test_plain_idx_files_are_accepted(data_dir: Path, tmp_path: Path) -> None:
    flat = tmp_path / "idx"
    flat.mkdir()
    for s in STEMS:
        (flat / s).write_bytes(gzip.decompress((_raw(data_dir) / f"{s}.gz").read_bytes()))
    dm = FashionMNISTDataModule(data_dir=flat, cache_dir=tmp_path / "cache", download=False)
    dm.prepare_data()
    dm.setup()
    assert len(dm.dataset("test")) == 10_000


def test_source_directory_is_never_written(data_dir: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in _raw(data_dir).iterdir())
    dm = FashionMNISTDataModule(data_dir=data_dir, cache_dir=tmp_path / "cache", download=False)
    dm.prepare_data()
    assert sorted(p.name for p in _raw(data_dir).iterdir()) == before
    assert (tmp_path / "cache" / "decoded" / "fashion_mnist_train.pt").is_file()


def test_env_var_overrides_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_DATA, str(tmp_path))
    assert FashionMNISTDataModule().data_dir == tmp_path
    assert FashionMNISTDataModule(data_dir=tmp_path / "x").data_dir == tmp_path / "x"


def test_missing_data_offline_names_dir_variable_and_both_ways(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])  # refused at once: "offline"
    empty = tmp_path / "empty"
    empty.mkdir()
    dm = FashionMNISTDataModule(data_dir=empty, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert str(empty) in msg and "Downloading them failed" in msg
    assert ENV_DATA in msg and "apt install dataset-fashion-mnist" in msg and "train-images-idx3-ubyte.gz" in msg
    assert not list((tmp_path / "cache").rglob("*.gz*")), "no half-downloaded file may remain"

    dm = FashionMNISTDataModule(data_dir=empty, cache_dir=tmp_path / "cache", download=False)
    with pytest.raises(DataError, match="Downloading is off"):
        dm.prepare_data()


def test_truncated_gzip_is_reported_and_left_untouched(data_dir: Path, tmp_path: Path) -> None:
    d = _copy_gz(data_dir, tmp_path / "data")
    bad = d / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:100_000])
    md5 = _md5(bad)
    dm = FashionMNISTDataModule(data_dir=d, cache_dir=tmp_path / "cache", download=False)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz could not be read.*truncated or corrupt"):
        dm.prepare_data()
    assert _md5(bad) == md5
    assert not (tmp_path / "cache" / "decoded" / "fashion_mnist_test.pt").exists()


def test_wrong_content_md5_and_wrong_magic(data_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    for s in STEMS:
        (d / s).write_bytes(gzip.decompress((_raw(data_dir) / f"{s}.gz").read_bytes()))
    bad = d / "t10k-labels-idx1-ubyte"
    raw = bytearray(bad.read_bytes())
    raw[3] = 0x03  # magic says 3-d
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"MD5 of its decoded content is [0-9a-f]{32}, expected 15d4843"):
        FashionMNISTDataModule(data_dir=d, cache_dir=tmp_path / "c1", download=False).prepare_data()
    with pytest.raises(DataError, match=r"IDX magic number 0x00000803, expected 0x00000801"):
        FashionMNISTDataModule(data_dir=d, cache_dir=tmp_path / "c2", download=False, verify=False).prepare_data()
    raw[3] = 0x01
    bad.write_bytes(bytes(raw[:-10]))  # right header, 10 labels short
    with pytest.raises(DataError, match=r"shape \(10000,\) in 9990 bytes"):
        FashionMNISTDataModule(data_dir=d, cache_dir=tmp_path / "c3", download=False, verify=False).prepare_data()


def test_cache_follows_the_source(data_dir: Path, tmp_path: Path) -> None:
    """A cache built from good files must not hide a source that later became corrupt."""
    d = _copy_gz(data_dir, tmp_path / "data")
    FashionMNISTDataModule(data_dir=d, cache_dir=tmp_path / "cache", download=False).prepare_data()
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz could not be read"):
        FashionMNISTDataModule(data_dir=d, cache_dir=tmp_path / "cache", download=False).prepare_data()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        FashionMNISTDataModule(batch_size=0)
    with pytest.raises(ValueError, match="val_size"):
        FashionMNISTDataModule(val_size=60_000)
