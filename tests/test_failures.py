"""Nothing executed, nothing lost: unsafe checkpoints, atomic saves, honest exits, faithful resume, caches.

Every bad input and fault checks its *message* and, through the CLI, its exit code (README "Resuming and
failures"): 0 finished, 1 a bug (traceback), 2 a problem the message names, 3 diverged, 143 SIGTERM.
Processes are observed through states (a file, a log line), never through fixed sleeps.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.errors import (
    CheckpointError,
    CheckpointWriteError,
    ConfigError,
    DataError,
    RunDirectoryBusy,
    TrainingDiverged,
)
from cnnfeat.models import SmallCNN
from cnnfeat.run import atomic
from cnnfeat.run.checkpoint_io import AtomicCheckpointIO
from cnnfeat.run.checkpoints import load_model
from cnnfeat.run.explore import checkpoints_in
from cnnfeat.run.train import build, train
from tests.conftest import read_events
from tests.helpers.procs import Proc, run, strict_json, wait_for

MakeCfg = Callable[..., DictConfig]
REPO = Path(__file__).resolve().parents[1]
TINY = ["callbacks=none", "callbacks.rich_progress_bar=null"]


def _common(data_dir: Path, cache_dir: Path, run_dir: Path) -> list[str]:
    return [
        "trainer=cpu",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
        "callbacks=none",
        "trainer.enable_model_summary=false",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "report=false",
    ]


def _sha(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


# -- loading never executes anything from the file ---------------------------------------------------------
def _hostile(path: Path, marker: Path) -> Path:
    torch.save(
        {
            "state_dict": {},
            "cnnfeat_model": "subprocess.Popen",
            "hyper_parameters": {"args": ["touch", str(marker)]},
        },
        path,
    )
    return path


def test_a_checkpoint_naming_code_runs_nothing(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    marker = tmp_path / "pwned"
    bad = _hostile(tmp_path / "hostile.ckpt", marker)
    with pytest.raises(CheckpointError, match=r"'subprocess.Popen', which is not one of the imported cnnfeat models"):
        load_model(bad)
    r = run(
        "cnnfeat.run.explore",
        f"ckpt={bad}",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path / 'explore'}",
    )
    assert r.returncode == 2 and "not one of the imported cnnfeat models" in r.stderr, r.stderr[-2000:]
    r = run("cnnfeat.run.train", *_common(data_dir, cache_dir, tmp_path / "run"), f"ckpt_path={bad}")
    assert r.returncode == 2 and "was not saved from SmallCNN" in r.stderr, r.stderr[-2000:]
    assert not marker.exists(), "a command named in a checkpoint was executed"


def test_hyper_parameters_from_a_file_are_checked_before_construction(tmp_path: Path) -> None:
    good = SmallCNN()
    base = {"state_dict": good.state_dict(), "cnnfeat_model": "cnnfeat.models.small_cnn.SmallCNN"}
    cases = [
        ({"optimizer": {"_target_": "os.system", "command": "touch x"}}, r"optimizer._target_='os.system' is not a"),
        ({"evil": 1}, r"hyper-parameters \['evil'\] are not arguments of SmallCNN"),
        ({"num_classes": {"__class__": [1]}}, None),  # a dict where an int belongs: SmallCNN refuses it itself
    ]
    for hparams, message in cases:
        f = tmp_path / "x.ckpt"
        torch.save({**base, "hyper_parameters": hparams}, f)
        with pytest.raises((CheckpointError, ConfigError), match=message):
            load_model(f)
    torch.save({**base, "hyper_parameters": {"optimizer": {"_target_": "torch.optim.Adam", "lr": 0.01}}}, f)
    model, _ = load_model(f)
    assert model.optimizer_spec["_target_"] == "torch.optim.Adam"


def test_zero_byte_and_corrupt_checkpoints_are_named(make_cfg: MakeCfg, tmp_path: Path) -> None:
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    with pytest.raises(CheckpointError, match=r"empty.ckpt is empty \(0 bytes\)"):
        train(make_cfg(*TINY, f"ckpt_path={empty}"))
    assert not (tmp_path / "status.json").exists(), "a refused resume writes no record"


def test_explore_orders_epochs_and_accepts_other_names(tmp_path: Path) -> None:
    for name in ("epoch10-val_acc0.9.ckpt", "epoch2-val_acc0.8.ckpt", "epoch-final.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in checkpoints_in(tmp_path)] == ["epoch2-val_acc0.8.ckpt", "epoch10-val_acc0.9.ckpt"]
    (tmp_path / "epoch10-val_acc0.9.ckpt").unlink()
    (tmp_path / "epoch2-val_acc0.8.ckpt").unlink()
    assert [p.name for p in checkpoints_in(tmp_path)] == ["epoch-final.ckpt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"no \.ckpt files"):
        checkpoints_in(empty)


# -- atomic saves ------------------------------------------------------------------------------------------
def test_cnnfeat_train_saves_through_the_atomic_io(make_cfg: MakeCfg) -> None:
    _, _, trainer = build(make_cfg(*TINY))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def _kill_during_a_save(run_dir: Path, tmpdir: Path) -> tuple[bool, str, Path]:
    """Start the big-checkpoint trainer, SIGKILL it as soon as its second save begins.

    Returns whether the kill landed mid-write, the hash of the checkpoint before, and the temporary file.
    """
    p = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "helpers" / "big_checkpoint_run.py"), str(run_dir), "400"],
        env={**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    last = run_dir / "last.ckpt"
    wait_for(lambda: last.exists() or p.poll() is not None, 240, "the first checkpoint")
    assert last.exists(), p.stderr.read().decode()[-2000:]
    inode = last.stat().st_ino
    tmp = run_dir / f".last.ckpt.{p.pid}.tmp"
    wait_for(lambda: tmp.exists() or last.stat().st_ino != inode, 240, "the next save to start")
    p.send_signal(signal.SIGKILL)
    p.wait()
    return tmp.exists() and last.stat().st_ino == inode, _sha(last), tmp


def test_sigkill_while_saving_on_another_filesystem_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmpdir).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary directory")
    run_dir = Path(tempfile.mkdtemp(dir=shm, prefix="cnnfeat-test-"))
    try:
        for _attempt in range(3):
            mid_write, before, tmp = _kill_during_a_save(run_dir, tmpdir)
            if mid_write:
                break
            shutil.rmtree(run_dir)
            run_dir.mkdir()
        else:
            pytest.fail("could not kill the process during a save in 3 attempts")
        last = run_dir / "last.ckpt"
        state = torch.load(last, map_location="cpu", weights_only=True)
        assert _sha(last) == before and state["state_dict"]["w"].numel() == 400 * 262_144, "previous one intact"
        assert list(tmpdir.iterdir()) == [], "nothing left in $TMPDIR"
        assert atomic.remove_orphans(run_dir) == [tmp], "the orphan of the killed write is removed on the next save"
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _fill_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every ``torch.save`` fail as it does on a full disk (after writing part of the file)."""

    def full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if hasattr(f, "write"):
            f.write(b"\0" * 4096)
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
            "data/0: file write failed"
        )

    monkeypatch.setattr(torch, "save", full)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_failed(
    make_cfg: MakeCfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train(make_cfg(*TINY))
    last = tmp_path / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    _fill_disk(monkeypatch)
    with pytest.raises(CheckpointWriteError, match=r"\.ckpt \(the disk is full\); the previous checkpoint"):
        train(make_cfg(*TINY, "trainer.max_epochs=2", "resume=true"))
    assert last.read_bytes() == good
    assert not list((tmp_path / "checkpoints").glob(".*.tmp")), "no temporary file left behind"
    status = strict_json(tmp_path / "status.json")
    assert status["status"] == "failed" and "disk is full" in status["error"]


def test_a_real_full_disk(make_cfg: MakeCfg, tmp_path: Path) -> None:
    """On a 1.2 MB tmpfs: epoch 1's two checkpoints fit, epoch 2's do not."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        train(make_cfg(*TINY, f"paths.output_dir={mnt}", "test=false"))
        last = mnt / "checkpoints" / "last.ckpt"
        good = last.read_bytes()
        filler = mnt / "filler"
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        filler.write_bytes(b"\0" * max(0, free - 100_000))  # leave room for a status file, not a checkpoint
        with pytest.raises(CheckpointWriteError, match="the disk is full"):
            train(make_cfg(*TINY, f"paths.output_dir={mnt}", "test=false", "trainer.max_epochs=2", "resume=true"))
        assert last.read_bytes() == good
        assert strict_json(mnt / "status.json")["status"] == "failed"
        assert not list((mnt / "checkpoints").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_last_ckpt_is_written_every_epoch_even_without_improvement(make_cfg: MakeCfg, tmp_path: Path) -> None:
    train(make_cfg(*TINY, "trainer.max_epochs=3", "model.optimizer.lr=1e-12", "test=false"))
    ckpts = tmp_path / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 2, "the third epoch's weights"
    best = [p.name for p in ckpts.glob("epoch*.ckpt")]
    assert len(best) == 1 and best[0].startswith("epoch00"), "val/acc never improved after epoch 1"


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0, "global_step": 5}, path)
    good = path.read_bytes()
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite values \(w\) at epoch 2, step 9"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}, "epoch": 1, "global_step": 9}, path)
    assert path.read_bytes() == good


# -- honest exits ------------------------------------------------------------------------------------------
def test_a_diverged_run_exits_3_with_valid_json_and_no_bad_checkpoint(
    tmp_path: Path, data_dir: Path, cache_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    r = run(
        "cnnfeat.run.train",
        *_common(data_dir, cache_dir, run_dir),
        "model.optimizer.lr=50",
        "trainer.limit_train_batches=40",
    )
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Training diverged: the loss is" in r.stderr and "Traceback" not in r.stderr
    status = strict_json(run_dir / "status.json")
    assert status["status"] == "diverged" and status["epoch"] == 1 and status["loss"] in ("nan", "inf", "-inf")
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), ckpt


@pytest.mark.parametrize(
    ("phase", "line", "extra"),
    [
        ("prepare_data", "Decoding", ["data.cache_dir={fresh}"]),
        ("test", "Testing the final weights", ["trainer.limit_test_batches=null", "data.eval_batch_size=100"]),
    ],
)
def test_sigterm_in_any_phase_exits_143_and_says_interrupted(
    tmp_path: Path, data_dir: Path, cache_dir: Path, phase: str, line: str, extra: list[str]
) -> None:
    run_dir = tmp_path / "run"
    args = [*_common(data_dir, cache_dir, run_dir), *(e.format(fresh=tmp_path / "fresh-cache") for e in extra)]
    p = Proc("cnnfeat.run.train", *args)
    p.wait_for_line(line)
    p.p.send_signal(signal.SIGTERM)
    assert p.wait() == 143, p.output[-3000:]
    status = strict_json(run_dir / "status.json")
    assert status["status"] == "interrupted", (phase, status)


def test_a_failing_job_still_gets_a_multirun_summary(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "sweep"
    common = [a for a in _common(data_dir, cache_dir, sweep) if not a.startswith("hydra.run.dir")]
    r = run("cnnfeat.run.train", "-m", *common, f"hydra.sweep.dir={sweep}", "model.optimizer.lr=0,0.1")
    assert r.returncode == 1, "a failed job fails the sweep"
    summary = strict_json(sweep / "summary.json")
    assert [(j["job"], j["status"]) for j in summary] == [(0, "failed"), (1, "finished")]
    assert "model.optimizer.lr must be a positive number, got 0" in summary[0]["error"]
    assert "model.optimizer.lr=0 | failed |" in (sweep / "summary.md").read_text()


def test_one_run_directory_refuses_a_second_live_process(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    common = _common(data_dir, cache_dir, run_dir)
    first = Proc("cnnfeat.run.train", *common, "seed=5", "trainer.max_epochs=3", "trainer.limit_train_batches=100")
    wait_for(lambda: (run_dir / "status.json").exists() or first.p.poll() is not None, 240, "the first run to start")
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    second = run("cnnfeat.run.train", *common, "seed=6")
    assert second.returncode == 2 and f"The run directory {run_dir.resolve()} is in use by PID {first.p.pid}" in (
        second.stderr + second.stdout
    ), second.stderr[-2000:]
    assert first.wait() == 0, first.output[-3000:]
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config and "seed: 5" in config


def test_train_takes_the_lock_too(make_cfg: MakeCfg, tmp_path: Path) -> None:
    """Library use (``train(cfg)`` without Hydra's callback) is protected as well."""
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cnnfeat.run.status import RunLock; "
            f"RunLock.acquire({str(tmp_path)!r}); print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryBusy, match=rf"in use by PID {other.pid}"):
            train(make_cfg(*TINY))
        assert not (tmp_path / "status.json").exists()
    finally:
        other.communicate("")
    train(make_cfg(*TINY))  # free again once the other process has ended


def test_resume_is_faithful_or_refuses(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    common = [*_common(data_dir, cache_dir, run_dir), "test=false"]
    assert run("cnnfeat.run.train", *common).returncode == 0
    record = (run_dir / ".hydra" / "config.yaml").read_text()
    status = (run_dir / "status.json").read_text()

    refused = run("cnnfeat.run.train", *common, "trainer.max_epochs=2", "resume=true", "model.optimizer.lr=0.001")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "Refusing to resume" in refused.stderr and "model.optimizer.lr: 0.2 -> 0.001" in refused.stderr
    for override, message in (
        ("model.num_classes=5", "model.num_classes=5, but the data has 10 classes"),
        ("model.optimizer._target_=torch.optim.Adam", "model.optimizer._target_ changed"),
    ):
        r = run("cnnfeat.run.train", *common, "trainer.max_epochs=2", "resume=true", "resume_overrides=allow", override)
        assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert (run_dir / ".hydra" / "config.yaml").read_text() == record, "the original record is never overwritten"
    assert (run_dir / "status.json").read_text() == status

    ok = run(
        "cnnfeat.run.train",
        *common,
        "trainer.max_epochs=2",
        "resume=true",
        "resume_overrides=allow",
        "model.optimizer.lr=0.001",
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    lrs = [v for _, v in sorted(read_events(run_dir)["scalars"]["lr"])]
    assert lrs == pytest.approx([0.2, 0.001]), "the new learning rate really applies"
    assert (run_dir / ".hydra" / "config.yaml").read_text() == record
    resumed = [p for p in run_dir.glob(".hydra-resume-*") if (p / "config.yaml").is_file()]
    assert any("lr: 0.001" in (p / "config.yaml").read_text() for p in resumed), "the change is recorded beside"
    final = strict_json(run_dir / "status.json")
    assert final["status"] == "finished"


# -- caches ------------------------------------------------------------------------------------------------
def test_cache_write_failures_name_the_directory_and_variable(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    _fill_disk(monkeypatch)
    dm = FashionMNISTDataModule(data_dir=data_dir, cache_dir=cache, download=False)
    message = rf"Cannot write the decoded-data cache {cache}.*the disk is full.*CNNFEAT_CACHE"
    with pytest.raises(DataError, match=message):
        dm.prepare_data()
    assert not [p for p in cache.rglob("*") if p.is_file()], "no partial file left"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(DataError, match=rf"The cache directory {a_file} is a file, not a directory.*CNNFEAT_CACHE"):
        FashionMNISTDataModule(data_dir=data_dir, cache_dir=a_file, download=False).prepare_data()


def test_a_truncated_feature_cache_is_named_removed_and_rebuilt(
    data_dir: Path, cache_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cnnfeat.data.feature_cache import FrozenFeatureDataModule
    from cnnfeat.models import FrozenAlexNet

    def dm() -> FrozenFeatureDataModule:
        return FrozenFeatureDataModule(
            FrozenAlexNet("none", input_size=64), data_dir=data_dir, cache_dir=cache_dir, max_images=8, download=False
        )

    first = dm()
    first.prepare_data()
    first.setup()
    path = first.cache_file("train")
    original = torch.load(path, weights_only=True)["features"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    orphan = path.with_name(f".{path.name}.999999.tmp")
    orphan.write_bytes(b"left by a killed extraction")
    second = dm()
    second.prepare_data()
    assert "is incomplete; rebuilding it" in caplog.text and str(path) in caplog.text
    second.setup()
    assert torch.equal(second.dataset("train").features, original)
    assert not orphan.exists(), "temporary files of dead processes are cleaned"


# -- messages for bad values -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("model.num_classes=5", ConfigError, r"model.num_classes=5, but the data has 10 classes"),
        ("data.val_size=5000.5", ConfigError, r"data.val_size must be an integer in \[0, 60000\), got 5000.5"),
        ("trainer.max_epochs=abc", ConfigError, r"trainer.max_epochs must be an integer, got 'abc'"),
        ("seed=abc", ConfigError, r"seed must be an integer or null, got 'abc'"),
        ("model.input_std=nan", ConfigError, r"input_mean and input_std must both be finite numbers"),
        ("callbacks.top_patches.channels=[-1,2]", ValueError, r"channels \[-1, 2\] out of range for conv1"),
    ],
)
def test_bad_values_are_named(make_cfg: MakeCfg, override: str, error: type, message: str) -> None:
    extra = [] if "top_patches" in override else TINY
    with pytest.raises(error, match=message):
        train(make_cfg(*extra, override))


def test_unreadable_data_directory(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == data_dir else real_access(p, mode))
    dm = FashionMNISTDataModule(data_dir=data_dir, cache_dir=tmp_path, download=False)
    with pytest.raises(DataError, match=rf"The data directory {data_dir} .* is not readable by this user"):
        dm.prepare_data()


def test_labels_out_of_range_are_refused_even_unverified(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "FashionMNIST" / "raw"
    for f in src.glob("*.gz"):
        shutil.copy(f, tmp_path / f.name)
    labels = bytearray(gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[8 + 5] = 12
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    dm = FashionMNISTDataModule(data_dir=tmp_path, cache_dir=tmp_path / "cache", download=False, verify=False)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz holds labels \[12\] outside 0..9"):
        dm.prepare_data()


def test_an_internal_error_keeps_its_traceback(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    """A ValueError from inside torch is a bug to report, not a one-line 'user error' with exit code 2."""
    r = run("cnnfeat.run.train", *_common(data_dir, cache_dir, tmp_path / "run"), "+model.optimizer.momentum=-1")
    assert r.returncode == 1 and "ValueError: Invalid momentum value: -1" in r.stderr, r.stderr[-2000:]
    assert "HYDRA_FULL_ERROR=1 for a complete stack trace" in r.stderr and "CnnfeatError" not in r.stderr
    assert strict_json(tmp_path / "run" / "status.json")["status"] == "failed"


def test_atomic_write_error_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    atomic.atomic_write(target, lambda f: f.write(b"old"))

    def boom(f: object) -> None:
        f.write(b"new, partly")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic.atomic_write(target, boom)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
