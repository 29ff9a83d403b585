"""What a hostile try of the entry points found (issue 21): nothing executed, nothing overwritten, exit code 2.

Crafted checkpoints (specs that walk out of ``torch.optim``, sizes the weights do not hold, wrong structures),
a second sweep pointed at a live sweep's folder, a full disk before Hydra records its config, and the
refusals of Hydra and Lightning: each checks the message, the exit code and that nothing ran or was written.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir

from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.errors import CheckpointError, ConfigError
from cnnfeat.models import SmallCNN, optim
from cnnfeat.run.checkpoints import load_model
from cnnfeat.run.cli import CONFIG_DIR, entry_point, instantiate_node
from cnnfeat.run.status import EXIT_USER_ERROR
from tests.helpers.procs import Proc, run

SMALL_CNN = "cnnfeat.models.small_cnn.SmallCNN"


def _checkpoint(path: Path, **extra: Any) -> Path:
    torch.save({"state_dict": SmallCNN().state_dict(), "cnnfeat_model": SMALL_CNN, **extra}, path)
    return path


def _hubconf(tmp_path: Path) -> tuple[Path, Path]:
    """A directory whose ``hubconf.py`` leaves a marker file when it is imported."""
    hub, marker = tmp_path / "hub", tmp_path / "EXECUTED"
    hub.mkdir()
    (hub / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef x(*a, **k):\n    return None\n")
    return hub, marker


# -- specs are looked up in torch.optim, never imported --------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "spec", "message"),
    [
        ("optimizer", {"_target_": "torch.optim.optimizer.torch.hub.load", "model": "x"}, "is not a torch.optim"),
        ("scheduler", {"_target_": "torch.optim.lr_scheduler.torch.hub.load", "model": "x"}, "is not a torch.optim"),
        ("optimizer", {"_target_": "torch.optim.SGD.__init__", "lr": 0.1}, "is not a torch.optim optimizer"),
        ("optimizer", {"_target_": "torch.optim.lr_scheduler.StepLR", "lr": 0.1}, "is not a torch.optim optimizer"),
        ("scheduler", {"_target_": "torch.optim.Adam"}, "is not a torch.optim scheduler"),
        ("optimizer", {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": {"_target_": "os.system"}}, "plain"),
        ("optimizer", {"_target_": "torch.optim.SGD", "lr": 0.1, "_partial_": True}, "not an argument a spec may"),
        ("optimizer", {"_target_": "torch.optim.SGD", "lr": 0.1, "_args_": ["x"]}, "not an argument a spec may"),
        ("optimizer", {"_target_": "torch.optim.SGD", "lr": 0.1, "params": []}, "not an argument a spec may"),
        ("optimizer", {"_target_": "torch.optim.SGD", "lr": 0.1, "momentun": 0.9}, "not an argument of SGD"),
    ],
)
def test_a_checkpoint_spec_outside_torch_optim_is_refused_and_nothing_runs(
    tmp_path: Path, key: str, spec: dict, message: str
) -> None:
    hub, marker = _hubconf(tmp_path)
    spec = {**spec, **({"repo_or_dir": str(hub), "source": "local"} if "hub" in spec["_target_"] else {})}
    f = _checkpoint(tmp_path / "x.ckpt", hyper_parameters={key: spec})
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(f)
    assert str(f) in str(info.value) and "may not name code to run" in str(info.value)
    with pytest.raises(ConfigError, match=message):  # the same spec from a config
        SmallCNN(**{key: spec})
    assert not marker.exists(), "a checkpoint's spec imported code"


def test_the_spec_check_is_not_a_prefix_check() -> None:
    """``torch.optim.optimizer.torch`` is the torch package itself: attribute walks from a torch.optim module
    reach anything, so the class must be *defined* in torch.optim and be an Optimizer."""
    for target in ("torch.optim.optimizer.torch", "torch.optim.sgd.torch.save", "torch.optim.Optimizer.__init__"):
        with pytest.raises(ConfigError, match=r"is not a torch\.optim optimizer class"):
            optim.resolve(target, "optimizer", "model.optimizer")
    assert optim.resolve("torch.optim.sgd.SGD", "optimizer", "model.optimizer") is torch.optim.SGD
    assert optim.resolve("torch.optim.lr_scheduler.ReduceLROnPlateau", "scheduler", "x") is not None


def test_checked_specs_build_the_same_optimizer_and_schedule() -> None:
    model = SmallCNN(
        optimizer={"_target_": "torch.optim.Adam", "lr": 0.01, "betas": [0.8, 0.9]},
        scheduler={"_target_": "torch.optim.lr_scheduler.MultiStepLR", "milestones": [2, 5], "gamma": 0.5},
    )
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert type(opt) is torch.optim.Adam and tuple(opt.param_groups[0]["betas"]) == (0.8, 0.9)
    assert type(sched) is torch.optim.lr_scheduler.MultiStepLR and dict(sched.milestones) == {2: 1, 5: 1}


class MyOptimizer(torch.optim.SGD):
    """An optimizer of the user's own, allowed from code."""


def test_a_class_of_your_own_is_allowed_from_code_only() -> None:
    target = f"{__name__}.MyOptimizer"
    with pytest.raises(ConfigError, match=r"cnnfeat\.models\.optim\.allow"):
        SmallCNN(optimizer={"_target_": target, "lr": 0.1})
    optim.allow(MyOptimizer)
    try:
        opt = SmallCNN(optimizer={"_target_": target, "lr": 0.1}).configure_optimizers()["optimizer"]
        assert type(opt) is MyOptimizer
    finally:
        optim._allowed.discard(MyOptimizer)
    with pytest.raises(ConfigError, match="takes an Optimizer or LRScheduler subclass"):
        optim.allow(dict)


# -- a file cannot ask for what its weights do not hold --------------------------------------------------------
def test_sizes_from_a_file_are_checked_against_its_weights_before_anything_is_allocated(tmp_path: Path) -> None:
    f = _checkpoint(tmp_path / "big.ckpt", hyper_parameters={"num_classes": 10**9})
    with pytest.raises(CheckpointError, match=r"does not fit SmallCNN: fc3.weight: \(10, 100\) in the file, "):
        load_model(f)


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        ({"state_dict": [1, 2]}, "state_dict is not a mapping of names to tensors"),
        ({"state_dict": {"conv1.weight": "x"}}, "state_dict is not a mapping of names to tensors"),
        ({"cnnfeat_model": ["a"]}, "cnnfeat_model is a list, not a str"),
        ({"hyper_parameters": [1, 2]}, "hyper_parameters is a list, not a Mapping"),
        ({"hyper_parameters": {"num_classes": True}}, "num_classes must be >= 2"),
        ({"hyper_parameters": {"num_classes": -3}}, "num_classes must be >= 2"),
        ({"hyper_parameters": {"optimizer": "torch.optim.SGD"}}, "must be a mapping with a _target_"),
        ({"hyper_parameters": {"optimizer": {"lr": 0.1}}}, "needs a _target_"),
    ],
)
def test_checkpoints_of_the_wrong_structure_are_named(tmp_path: Path, contents: dict, message: str) -> None:
    f = _checkpoint(tmp_path / "x.ckpt", **{k: v for k, v in contents.items() if k != "state_dict"})
    if "state_dict" in contents:
        torch.save({"state_dict": contents["state_dict"], "cnnfeat_model": SMALL_CNN}, f)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(f)
    assert str(f) in str(info.value)


def test_a_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"is a directory, not a \.ckpt file"):
        load_model(tmp_path)


# -- Hydra's and Lightning's refusals: exit code 2 and what to do ----------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trainer.max_epoch=3"], "trainer has no key 'max_epoch'. Did you mean trainer.max_epochs"),
        (["model=resnet"], "no such config option"),
        (["callbacks.feature_maps.channels=-1"], "callbacks.feature_maps has no key 'channels'"),
        (["model.optimizer.lr=="], "the command line was refused"),
    ],
)
def test_hydra_refusals_exit_2_and_run_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    from cnnfeat.run.train import main

    monkeypatch.setattr(sys, "argv", ["cnnfeat-train", *args])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1], err
    assert "Traceback" not in err
    assert not (tmp_path / "outputs").exists(), "nothing was run"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trainer.max_epochs=-5"], "trainer: `max_epochs` must be a non-negative integer or -1"),
        (["trainer.limit_train_batches=-1"], "trainer: You have passed invalid value -1 for limit_train_batches"),
        (["trainer.precision=bogus"], "trainer: Precision 'bogus' is invalid"),
        (["data.split_seed=abc"], "data.split_seed must be an integer, got 'abc'"),
        (["data.num_workers=-1"], "data.num_workers must be an integer >= 0, got -1"),
        (["data.num_workers=abc"], "data.num_workers must be an integer >= 0, got 'abc'"),
        (["data.pin_memory=maybe"], "data.pin_memory must be true or false, got 'maybe'"),
    ],
)
def test_bad_values_exit_2_with_one_line(
    tmp_path: Path, data_dir: Path, cache_dir: Path, args: list[str], message: str
) -> None:
    r = run(
        "cnnfeat.run.train",
        "trainer=cpu",
        "callbacks=none",
        "report=false",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *args,
    )
    assert r.returncode == EXIT_USER_ERROR, r.stderr[-3000:]
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists(), "nothing was trained"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_the_gpu_preset_without_a_gpu_says_which_presets_run_here() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer=gpu", "logger=none", "paths.output_dir=."])
    with pytest.raises(ConfigError, match=r"trainer: .*No GPU is visible to this process.*trainer=cpu"):
        instantiate_node(cfg.trainer, "trainer", callbacks=[], logger=False)


def test_data_arguments_are_checked_before_anything_is_read() -> None:
    for kwargs, message in [
        ({"split_seed": "abc"}, "data.split_seed must be an integer"),
        ({"split_seed": 1.5}, "data.split_seed must be an integer"),
        ({"num_workers": -1}, "data.num_workers must be an integer >= 0"),
        ({"num_workers": True}, "data.num_workers must be an integer >= 0"),
        ({"download": "no"}, "data.download must be true or false"),
        ({"val_on_test": 1}, "data.val_on_test must be true or false"),
    ]:
        with pytest.raises(ConfigError, match=message):
            FashionMNISTDataModule(data_dir="/nonexistent", **kwargs)


# -- nothing is written into a live run's or sweep's folder ----------------------------------------------------
def test_a_second_sweep_into_a_live_sweeps_folder_is_refused_before_it_writes(
    tmp_path: Path, data_dir: Path, cache_dir: Path
) -> None:
    sweep = tmp_path / "sweep"
    common = [
        "-m",
        "trainer=cpu",
        "callbacks=none",
        "report=false",
        "test=false",
        "trainer.max_epochs=1000",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        f"hydra.sweep.dir={sweep}",
    ]
    first = Proc("cnnfeat.run.train", *common, "model.optimizer.lr=0.1")
    try:
        first.wait_for_line("epoch 2")  # job 0 is training
        record = {p.name: p.read_bytes() for p in (sweep / "0" / ".hydra").iterdir()}
        assert b"model.optimizer.lr=0.1" in record["overrides.yaml"]
        second = run("cnnfeat.run.train", *common, "model.optimizer.lr=0.05")
        assert second.returncode == EXIT_USER_ERROR, second.stderr[-3000:]
        assert "RunDirectoryBusy" in second.stderr and str(sweep) in second.stderr
        assert "Traceback" not in second.stderr
        assert {p.name: p.read_bytes() for p in (sweep / "0" / ".hydra").iterdir()} == record, "job 0's record"
        assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0"], "no job of the second sweep"
    finally:
        first.p.send_signal(signal.SIGTERM)
        first.wait()


# -- a full disk before Hydra records the run ------------------------------------------------------------------
def test_a_full_disk_before_the_run_starts_is_one_line_and_exit_2(tmp_path: Path) -> None:
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        (mnt / "filler").write_bytes(b"\0" * max(0, free - 8192))
        r = run("cnnfeat.run.train", "trainer=cpu", "callbacks=none", f"hydra.run.dir={mnt / 'run'}")
        assert r.returncode == EXIT_USER_ERROR, r.stderr[-3000:]
        assert "the disk is full" in r.stderr and "nothing was run" in r.stderr and "Traceback" not in r.stderr
        assert not (mnt / "run" / ".hydra").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_inside_hydra_becomes_exit_2(capsys: pytest.CaptureFixture) -> None:
    """Where the disk fills between the check and Hydra's own save: Hydra prints, and the exit code is 2."""

    def hydra_main() -> None:  # what Hydra's run_and_report does with an exception: print it, then exit 1
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            sys.exit(1)

    with pytest.raises(SystemExit) as info:
        entry_point(hydra_main, "cnnfeat-train")()
    assert info.value.code == EXIT_USER_ERROR and "the disk is full" in capsys.readouterr().err

    def buggy() -> None:
        try:
            raise KeyError("a bug")
        except KeyError:
            sys.exit(1)

    with pytest.raises(SystemExit) as info:
        entry_point(buggy, "cnnfeat-train")()
    assert info.value.code == 1, "a bug keeps exit code 1"


# -- cnnfeat-explore: what it is given is checked before anything is drawn ------------------------------------
def test_explore_without_ckpt_exits_2_saying_what_to_give(tmp_path: Path) -> None:
    r = run("cnnfeat.run.explore", f"hydra.run.dir={tmp_path / 'x'}")
    assert r.returncode == EXIT_USER_ERROR, r.stderr[-3000:]
    assert "ckpt=... is required" in r.stderr and "Traceback" not in r.stderr


def test_explore_devices_are_checked() -> None:
    from cnnfeat.run.explore import explore_device

    assert explore_device("cpu") == torch.device("cpu")
    assert explore_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("bogus", "cuda:x", "gpu", 3):
        with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
            explore_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no GPU is visible to this process; use device=cpu"):
            explore_device("cuda")


@pytest.mark.parametrize("epoch", ["3", -1, 1.5, True, 10**12])
def test_explore_refuses_an_epoch_that_is_not_an_epoch_number(tmp_path: Path, epoch: object) -> None:
    from cnnfeat.run.explore import finite_model

    f = _checkpoint(tmp_path / "x.ckpt", epoch=epoch)
    with pytest.raises(CheckpointError, match=r"is not an epoch number"):
        finite_model(f)


@pytest.mark.parametrize("text", ["seed: [1, 2\n", "seed: abc\n", "- a list\n"])
def test_a_broken_run_config_only_loses_the_untrained_network(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    from cnnfeat.run.explore import untrained_model

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(text)
    (tmp_path / "checkpoints").mkdir()
    f = _checkpoint(tmp_path / "checkpoints" / "last.ckpt", epoch=0)
    assert untrained_model(f) is None
    assert "No untrained network" in caplog.text or text.startswith("- ")


def test_a_sweep_summary_does_not_read_a_job_folder_linked_from_elsewhere(tmp_path: Path) -> None:
    from cnnfeat.run.hydra_callbacks import write_summary
    from cnnfeat.run.status import write_status

    sweep, private = tmp_path / "sweep", tmp_path / "private"
    (sweep / "0").mkdir(parents=True)
    private.mkdir()
    write_status(sweep / "0", "finished", metrics={"val/acc": 0.5})
    write_status(private, "failed", error="SECRET-TOKEN")
    (sweep / "1").symlink_to(private, target_is_directory=True)
    rows = write_summary(sweep)
    assert [r["job"] for r in rows] == [0]
    assert "SECRET-TOKEN" not in (sweep / "summary.md").read_text() + (sweep / "summary.json").read_text()


def test_a_looping_chain_of_causes_is_not_a_full_disk() -> None:
    """A sweep's failing job re-raises an exception whose context chain loops back to itself: the exit-code edge
    must still end (it hung on it)."""
    from cnnfeat.run.atomic import is_disk_full

    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert is_disk_full(a) is False
    c = OSError(errno.ENOSPC, "No space left on device")
    b.__cause__ = c
    assert is_disk_full(a) is True


def test_trainer_lightning_listed_by_help_builds_a_trainer() -> None:
    """``trainer=lightning`` (Lightning's own defaults, listed by --help) had no _target_: the run crashed reading
    current_epoch off a DictConfig and its status stayed 'running'."""
    from cnnfeat.run import lightning_api as pl

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer=lightning", "trainer.max_epochs=1"])
    trainer = instantiate_node(cfg.trainer, "trainer", logger=False, enable_checkpointing=False)
    assert isinstance(trainer, pl.Trainer) and trainer.max_epochs == 1
