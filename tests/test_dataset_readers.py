"""The benchmark sets' readers on files this test writes in each official format (the real files cannot be
downloaded here): CIFAR-10/100 python pickles (extracted folder and .tar.gz), MNIST/KMNIST IDX (gzip), SVHN .mat.
Each is compared with torchvision's own reader of the same files (its MD5 check switched off: the files are not the
official ones), and every bad input is checked by its message."""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hydra import compose, initialize_config_dir
from torchvision import datasets as tvd

from cnnfeat.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    KMNISTDataModule,
    MNISTDataModule,
    SVHNDataModule,
)
from cnnfeat.data.common import ENV_DATA
from cnnfeat.data.official import OfficialDataModule
from cnnfeat.errors import ConfigError, DataError
from cnnfeat.probe import ProbeSpec, probe_from_datamodule
from cnnfeat.run.cli import CONFIG_DIR, instantiate_node
from cnnfeat.run.train import train

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 24  # images per CIFAR batch file written here (the official ones hold 10,000)


def photo_patches(n: int, seed: int) -> np.ndarray:
    """``n`` real RGB 32x32 patches (N, 32, 32, 3) cut from scikit-learn's sample photographs."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for k in range(n):
        img = photos[k % 2]
        y, x = int(rng.integers(0, img.shape[0] - 32)), int(rng.integers(0, img.shape[1] - 32))
        out[k] = img[y : y + 32, x : x + 32]
    return out


# -- writers of the official formats ----------------------------------------------------------------------
def write_cifar(root: Path, tv: type[tvd.CIFAR10], tarball: bool, seed: int = 0) -> Path:
    """The python version's pickles (protocol 2, as the originals) under ``root/<base_folder>``, or that folder
    packed as ``root/<filename>``."""
    rng = np.random.default_rng(seed)
    folder = root / tv.base_folder
    folder.mkdir(parents=True)
    hundred = tv is tvd.CIFAR100
    for k, (name, _) in enumerate([*tv.train_list, *tv.test_list]):
        n = PER_BATCH * (5 if hundred and name == "train" else 1)
        data = photo_patches(n, seed + k).transpose(0, 3, 1, 2).reshape(n, 3072)  # R, G, B planes, row-major
        batch: dict = {"batch_label": f"batch {k}", "data": data, "filenames": [f"img_{i}.png" for i in range(n)]}
        if hundred:
            batch["fine_labels"] = rng.integers(0, 100, n).tolist()
            batch["coarse_labels"] = rng.integers(0, 20, n).tolist()
        else:
            batch["labels"] = rng.integers(0, 10, n).tolist()
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = (
        {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]}
        if hundred
        else {"label_names": CIFAR10_NAMES, "num_cases_per_batch": PER_BATCH, "num_vis": 3072}
    )
    with (folder / tv.meta["filename"]).open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    if tarball:
        with tarfile.open(root / tv.filename, "w:gz") as tar:
            tar.add(folder, arcname=tv.base_folder)
    return root


def idx_bytes(array: np.ndarray) -> bytes:
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(root: Path, folder: str, fm: FashionMNISTDataModule) -> Path:
    """The four IDX files in torchvision's layout (``root/<folder>/raw``): gzip for cnnfeat, plain for torchvision's
    reader; real Fashion-MNIST pixels stand in for the set's own."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for split, prefix, n in (("train", "train", 60), ("test", "t10k", 30)):
        ds = fm.dataset(split)
        images, labels = ds.images[ds.image_ids[:n]].numpy(), ds.labels[ds.image_ids[:n]].numpy()
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(arr)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(data)
            (raw / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(data))
    return root


def write_svhn(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 40), ("test", 20)):
        x = photo_patches(n, seed + len(split)).transpose(1, 2, 3, 0)  # (32, 32, 3, N), as the .mat files hold
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # 10 = the digit 0
        y[0] = 10
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return root


def _prepared(cls: type[OfficialDataModule], data: Path, tmp_path: Path, **kw: object) -> OfficialDataModule:
    kw = {"verify": False, "download": False, "val_size": 10, **kw}
    dm = cls(data_dir=data, cache_dir=tmp_path / "cache", **kw)  # type: ignore[arg-type]
    dm.prepare_data()
    dm.setup()
    return dm


def _whole(dm: OfficialDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    ds = dm.dataset(split)
    return ds.images, ds.labels


@pytest.fixture
def trust_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's readers check the official MD5s first; these files are not the official ones."""
    for cls in (tvd.CIFAR10, tvd.SVHN):
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *args, **kwargs: True)  # its batches.meta check


# -- each reader against torchvision's ----------------------------------------------------------------------
@pytest.mark.parametrize("tarball", [False, True], ids=["folder", "tar.gz"])
def test_cifar10_reads_like_torchvision(tmp_path: Path, tarball: bool, trust_torchvision: None) -> None:
    data = write_cifar(tmp_path / "data", tvd.CIFAR10, tarball)
    if tarball:  # only the archive: cnnfeat reads inside it, torchvision needs it extracted
        tv_root = tmp_path / "tv"
        tv_root.mkdir()
        (data / tvd.CIFAR10.base_folder).rename(tv_root / tvd.CIFAR10.base_folder)
    else:
        tv_root = data
    dm = _prepared(CIFAR10DataModule, data, tmp_path)
    assert dm.classes == tuple(CIFAR10_NAMES) and (dm.in_channels, dm.image_size, dm.num_classes) == (3, 32, 10)
    for split, is_train in (("train", True), ("test", False)):
        tv = tvd.CIFAR10(str(tv_root), train=is_train, download=False)
        x, y = _whole(dm, split)
        assert torch.equal(x, torch.from_numpy(tv.data).permute(0, 3, 1, 2)) and y.tolist() == tv.targets
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == 5 * PER_BATCH and len(dm.dataset("val")) == 10
    xb, _ = next(iter(dm.train_dataloader()))
    assert xb.dtype == torch.uint8 and xb.shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("labels", ["fine", "coarse"])
def test_cifar100_fine_and_coarse_labels(tmp_path: Path, labels: str, trust_torchvision: None) -> None:
    data = write_cifar(tmp_path / "data", tvd.CIFAR100, tarball=True)
    n = 100 if labels == "fine" else 20
    dm = _prepared(CIFAR100DataModule, data, tmp_path, labels=labels, num_classes=n)
    assert dm.num_classes == n and dm.classes == tuple(f"{labels}{i}" for i in range(n))
    batch = pickle.loads((data / "cifar-100-python" / "train").read_bytes())
    x, y = _whole(dm, "train")
    assert torch.equal(x, torch.from_numpy(batch["data"]).view(-1, 3, 32, 32))
    assert y.tolist() == batch[f"{labels}_labels"]
    if labels == "fine":
        tv = tvd.CIFAR100(str(data), train=False, download=False)
        assert torch.equal(_whole(dm, "test")[0], torch.from_numpy(tv.data).permute(0, 3, 1, 2))
    with pytest.raises(
        ConfigError, match=r"data.num_classes=100, but CIFAR-100 has num_classes=20 with data.labels=coarse"
    ):
        CIFAR100DataModule(labels="coarse", num_classes=100)


@pytest.mark.parametrize(("cls", "tv_cls"), [(MNISTDataModule, tvd.MNIST), (KMNISTDataModule, tvd.KMNIST)])
def test_idx_sets_read_like_torchvision(
    tmp_path: Path, datamodule: FashionMNISTDataModule, cls: type[OfficialDataModule], tv_cls: type[tvd.MNIST]
) -> None:
    data = write_idx(tmp_path / "data", cls.folder, datamodule)
    dm = _prepared(cls, data, tmp_path)
    assert dm.classes == tuple(tv_cls.classes) and (dm.in_channels, dm.image_size) == (1, 28)
    for split, is_train in (("train", True), ("test", False)):
        tv = tv_cls(str(data), train=is_train, download=False)
        x, y = _whole(dm, split)
        assert torch.equal(x, tv.data.unsqueeze(1)) and torch.equal(y, tv.targets)


def test_svhn_reads_like_torchvision(tmp_path: Path, trust_torchvision: None) -> None:
    data = write_svhn(tmp_path / "data" / "SVHN")
    dm = _prepared(SVHNDataModule, tmp_path / "data", tmp_path)
    for split in ("train", "test"):
        tv = tvd.SVHN(str(data), split=split, download=False)
        x, y = _whole(dm, split)
        assert torch.equal(x, torch.from_numpy(tv.data)) and y.tolist() == tv.labels.tolist()
    assert int(dm.dataset("test").labels[0]) == 0  # label 10 in the file is the digit 0


def test_statistics_and_probe_of_a_benchmark_set(tmp_path: Path) -> None:
    data = write_cifar(tmp_path / "data", tvd.CIFAR10, tarball=False)
    dm = _prepared(CIFAR10DataModule, data, tmp_path, normalize=True)
    ds = dm.dataset("train")  # brute force over the training split (the held-out val images excluded)
    train = ds.images[ds.image_ids].double() / 255
    assert dm.mean == pytest.approx(train.mean((0, 2, 3)).tolist(), abs=1e-12)
    assert dm.std == pytest.approx(train.std((0, 2, 3), unbiased=False).tolist(), abs=1e-12)
    probe = probe_from_datamodule(dm, ProbeSpec("test"))
    x, y = _whole(dm, "test")
    assert torch.equal(probe.images, x.float() / 255) and torch.equal(probe.labels, y)
    assert torch.allclose(probe.inputs, dm.on_after_batch_transfer((x, y), 0)[0])
    assert abs(float(probe.inputs.mean())) < 0.5 and probe.class_names == tuple(CIFAR10_NAMES)


# -- bad inputs -------------------------------------------------------------------------------------------
def test_files_that_are_not_official_are_refused_by_md5(tmp_path: Path, datamodule: FashionMNISTDataModule) -> None:
    cifar = write_cifar(tmp_path / "c", tvd.CIFAR10, tarball=False)
    with pytest.raises(
        DataError,
        match=r"data_batch_1 does not hold the official CIFAR-10 data: its MD5 is [0-9a-f]{32}, "
        r"expected c99cafc152244af753f735de768cd75f.*data.verify=false",
    ):
        _prepared(CIFAR10DataModule, cifar, tmp_path, verify=True)
    mnist = write_idx(tmp_path / "m", "MNIST", datamodule)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz does not hold the official MNIST data.*f68b3c2d"):
        _prepared(MNISTDataModule, mnist, tmp_path, verify=True)
    svhn = write_svhn(tmp_path / "s")
    with pytest.raises(DataError, match=r"train_32x32.mat does not hold the official SVHN data.*e26dedcc"):
        _prepared(SVHNDataModule, svhn, tmp_path, verify=True)


@pytest.mark.parametrize(
    ("cls", "names"),
    [
        (CIFAR10DataModule, ["cifar-10-python.tar.gz", "cifar-10-batches-py/"]),
        (CIFAR100DataModule, ["cifar-100-python.tar.gz", "cifar-100-python/"]),
        (MNISTDataModule, ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
        (KMNISTDataModule, ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
        (SVHNDataModule, ["train_32x32.mat", "test_32x32.mat"]),
    ],
)
def test_missing_files_offline_say_where_and_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cls: type[OfficialDataModule], names: list[str]
) -> None:
    def offline(url: str, timeout: float) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("cnnfeat.data.common.urllib.request.urlopen", offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        cls(data_dir=empty, cache_dir=tmp_path / "cache").prepare_data()
    msg = str(e.value)
    assert f"{cls.title} files not found" in msg and "Downloading them failed" in msg and "no network" in msg
    assert str(empty) in msg and ENV_DATA in msg and all(n in msg for n in names)
    assert "run once with internet access to download them into" in msg and str(tmp_path / "cache") in msg
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()], "no partial download may remain"
    with pytest.raises(DataError, match="Downloading is off"):
        cls(data_dir=empty, cache_dir=tmp_path / "cache", download=False).prepare_data()


def test_corrupt_files_are_named(tmp_path: Path, datamodule: FashionMNISTDataModule) -> None:
    cifar = write_cifar(tmp_path / "c", tvd.CIFAR10, tarball=True)
    tar = cifar / tvd.CIFAR10.filename
    tar.write_bytes(tar.read_bytes()[:5000])
    for f in (cifar / tvd.CIFAR10.base_folder).iterdir():  # only the archive is left
        f.unlink()
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz could not be read as the CIFAR-10 archive.*truncated"):
        _prepared(CIFAR10DataModule, cifar, tmp_path)

    evil = write_cifar(tmp_path / "e", tvd.CIFAR10, tarball=False)
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    (evil / tvd.CIFAR10.base_folder / "data_batch_2").write_bytes(pickle.dumps({"data": Boom()}, protocol=2))
    with pytest.raises(
        DataError, match=r"data_batch_2 is not a readable CIFAR-10 batch \(UnpicklingError: .*system is not"
    ):
        _prepared(CIFAR10DataModule, evil, tmp_path)
    assert not marker.exists(), "a file that is not an official batch must not run code"

    svhn = write_svhn(tmp_path / "s")
    (svhn / "test_32x32.mat").write_bytes((svhn / "test_32x32.mat").read_bytes()[:300])
    with pytest.raises(DataError, match=r"test_32x32.mat could not be read as a MATLAB file"):
        _prepared(SVHNDataModule, svhn, tmp_path)

    mnist = write_idx(tmp_path / "m", "KMNIST", datamodule)
    (mnist / "KMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(29))[:-3]))
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte.gz holds an array of shape \(29,\) in 26 bytes; KMNIST"
    ):
        _prepared(KMNISTDataModule, mnist, tmp_path)


def test_bad_labels_and_arguments(tmp_path: Path) -> None:
    data = write_svhn(tmp_path / "s")
    mat = scipy.io.loadmat(data / "train_32x32.mat")
    mat["y"][3] = 11
    scipy.io.savemat(data / "train_32x32.mat", {"X": mat["X"], "y": mat["y"]})
    with pytest.raises(DataError, match=r"train_32x32.mat holds labels \[11\] outside 1..10"):
        _prepared(SVHNDataModule, data, tmp_path)
    with pytest.raises(ConfigError, match=r"data.in_channels=1, but CIFAR-10 has in_channels=3"):
        CIFAR10DataModule(in_channels=1)
    with pytest.raises(ConfigError, match=r"data.val_size must be an integer in \[0, 73257\)"):
        SVHNDataModule(val_size=80_000)
    with pytest.raises(ConfigError, match=r"data.labels must be 'fine'"):
        CIFAR100DataModule(labels="both")


def test_data_dir_is_never_written_and_the_cache_follows_the_sources(tmp_path: Path) -> None:
    data = write_cifar(tmp_path / "data", tvd.CIFAR10, tarball=True)
    before = sorted((p, p.stat().st_mtime_ns) for p in data.rglob("*"))
    _prepared(CIFAR10DataModule, data, tmp_path)
    assert sorted((p, p.stat().st_mtime_ns) for p in data.rglob("*")) == before
    cache = tmp_path / "cache" / "decoded" / "cifar10_train.pt"
    stamp = cache.stat().st_mtime_ns
    _prepared(CIFAR10DataModule, data, tmp_path)
    assert cache.stat().st_mtime_ns == stamp  # decoded once
    batch = data / tvd.CIFAR10.base_folder / "data_batch_3"
    content = pickle.loads(batch.read_bytes())
    content["labels"] = [9] * len(content["labels"])
    batch.write_bytes(pickle.dumps(content, protocol=2))
    dm = _prepared(CIFAR10DataModule, data, tmp_path)
    assert cache.stat().st_mtime_ns != stamp  # the source changed: decoded again
    assert dm.dataset("train").labels[2 * PER_BATCH : 3 * PER_BATCH].tolist() == [9] * PER_BATCH


# -- the configs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "kmnist", "svhn"])
def test_each_config_builds_its_datamodule_with_its_facts(name: str, tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"data={name}", f"data.data_dir={tmp_path}"])
    dm = instantiate_node(cfg.data, "data")
    assert isinstance(dm, OfficialDataModule) and dm.key.startswith(name)
    assert (cfg.data.in_channels, cfg.data.image_size, cfg.data.num_classes) == (
        dm.in_channels,
        dm.image_size,
        dm.num_classes,
    )


def test_cnnfeat_train_data_mnist_with_the_small_cnn(tmp_path: Path, datamodule: FashionMNISTDataModule) -> None:
    data = write_idx(tmp_path / "data", "MNIST", datamodule)
    overrides = [
        "data=mnist",
        f"data.data_dir={data}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.verify=false",
        "data.val_size=20",
        "data.batch_size=8",
        "callbacks=none",
        "logger=none",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_model_summary=false",
        "report=false",
        f"paths.output_dir={tmp_path / 'run'}",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
