"""End to end through the composed Hydra config: a real Trainer, TensorBoard events read back, checkpoints."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf

from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
from cnnfeat.errors import CheckpointError, ConfigError
from cnnfeat.models import SmallCNN
from cnnfeat.run.train import train
from tests.conftest import read_events

MakeCfg = Callable[..., DictConfig]


def test_one_epoch_logs_scalars_checkpoints_and_console_line(
    make_cfg: MakeCfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_cfg("trainer.max_epochs=2")
    with caplog.at_level(logging.INFO, logger="cnnfeat"):
        metrics = train(cfg)
    assert 0.0 <= metrics["val/acc"] <= 1.0 and 0.0 <= metrics["test/acc"] <= 1.0

    ev = read_events(tmp_path)["scalars"]
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "test/acc"):
        assert tag in ev, f"{tag} missing from {sorted(ev)}"
    assert len(ev["val/acc"]) == 2 and len(ev["train/loss"]) == 2
    assert [v for _, v in ev["lr"]] == pytest.approx([0.2, 0.2])

    lines = [r.getMessage() for r in caplog.records if r.name == "cnnfeat"]
    assert any(line.startswith(">>> End epoch 1, train accuracy = ") and "train avgLoss = " in line for line in lines)
    assert any(line.startswith(">>> valid accuracy = ") for line in lines)

    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert len(list(ckpts.glob("epoch*-val_acc*.ckpt"))) == 1


def test_checkpoint_reloads_with_primitive_hparams(make_cfg: MakeCfg, tmp_path: Path) -> None:
    cfg = make_cfg("model.optimizer.lr=0.1", "model.conv_bias_init=0.01")
    train(cfg)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, weights_only=True)  # primitives only: no pickled classes or DictConfigs
    assert raw["hyper_parameters"]["optimizer"] == {"_target_": "torch.optim.SGD", "lr": 0.1}
    model = SmallCNN.load_from_checkpoint(ckpt, weights_only=True).eval()
    assert model.hparams.conv_bias_init == 0.01
    state = raw["state_dict"]
    x = torch.rand(4, 1, 28, 28)
    fresh = SmallCNN(**raw["hyper_parameters"]).eval()
    fresh.load_state_dict(state)
    assert torch.allclose(model(x), fresh(x))


def test_resume_from_checkpoint_continues_training(make_cfg: MakeCfg, tmp_path: Path) -> None:
    train(make_cfg())
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4  # 4 batches per epoch
    train(make_cfg("trainer.max_epochs=2", f"ckpt_path={last}"))
    assert torch.load(last, weights_only=True)["global_step"] == 8  # exactly one more epoch
    epochs = [s for s, _ in read_events(tmp_path)["scalars"]["val/acc"]]
    assert len(epochs) == 2


def test_unknown_config_option_names_the_choices(make_cfg: MakeCfg) -> None:
    with pytest.raises(MissingConfigException, match=r"Could not find 'model/resnet'"):
        make_cfg("model=resnet")


def test_bad_learning_rate_fails_before_training(make_cfg: MakeCfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.optimizer.lr must be a positive number, got -0.5"):
        train(make_cfg("model.optimizer.lr=-0.5"))
    assert not (tmp_path / "checkpoints").exists()


def test_missing_checkpoint_is_a_clear_error(make_cfg: MakeCfg, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"ckpt_path=.*nope.ckpt does not exist"):
        train(make_cfg(f"ckpt_path={tmp_path / 'nope.ckpt'}"))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "cnnfeat.run.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_run_and_multirun_write_where_documented(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    common = [
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        "trainer=cpu",
        "experiment=quick",
        "trainer.limit_train_batches=3",
        "trainer.enable_model_summary=false",
    ]
    r = _cli(*common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert "train/loss" in read_events(runs[0])["scalars"]
    assert ">>> End epoch 1, train accuracy" in (runs[0] / "train.log").read_text()

    r = _cli("-m", *common, "model.optimizer.lr=0.05,0.1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted((tmp_path / "outputs" / "multirun").glob("*/*/[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1"]
    lrs = [read_events(j)["scalars"]["lr"][0][1] for j in jobs]
    assert lrs == pytest.approx([0.05, 0.1])


def test_cli_unknown_option_and_bad_lr_messages(tmp_path: Path) -> None:
    r = _cli("model=resnet", cwd=tmp_path)
    assert r.returncode != 0
    assert "Could not find 'model/resnet'" in r.stderr and "small_cnn" in r.stderr
    r = _cli("trainer=cpu", "model.optimizer.lr=0", cwd=tmp_path)
    assert r.returncode == 2 and "model.optimizer.lr must be a positive number, got 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_every_trainer_argument_can_be_overridden(make_cfg: MakeCfg) -> None:
    """``trainer.NAME=VALUE`` must work for any Trainer argument, so the preset lists them all."""
    import inspect

    import pytorch_lightning as pl

    cfg = make_cfg()
    params = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "callbacks", "logger"}
    assert params <= set(cfg.trainer), f"missing from conf/trainer/default.yaml: {params - set(cfg.trainer)}"


class _StepRecorder(pl.Callback):
    """(batch size, loss) of every training step, to average the way a plain loop would."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append((len(batch[1]), float(outputs["loss"])))


def test_epoch_metrics_are_exact_batch_weighted_averages(datamodule: FashionMNISTDataModule) -> None:
    """train/loss is registered once per epoch, yet must equal the mean over every step of the epoch."""
    rec = _StepRecorder()
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=7,
        limit_val_batches=3,
        num_sanity_val_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rec],
    )
    model = SmallCNN()
    trainer.fit(model, datamodule=datamodule)
    last = rec.rows[-7:]
    expected = sum(n * loss for n, loss in last) / sum(n for n, _ in last)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(expected, rel=1e-5)
    # validation covers exactly the 3 limited batches of the last epoch (not the sanity-check batch)
    ref = pl.Trainer(limit_val_batches=3, logger=False, enable_progress_bar=False, enable_model_summary=False)
    val = ref.validate(model, datamodule=datamodule, verbose=False)[0]
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(val["val/acc"])
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(val["val/loss"], rel=1e-5)


def test_cli_missing_data_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    r = _cli(
        "trainer=cpu",
        f"data.data_dir={tmp_path / 'nothing'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.download=false",
        cwd=tmp_path,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Fashion-MNIST files not found" in out and "CNNFEAT_DATA" in out
    assert "apt install dataset-fashion-mnist" in out and "Traceback" not in out


@pytest.mark.parametrize(
    "switch",
    [
        "trainer.enable_progress_bar=false",
        "trainer.logger=false",
        "trainer.enable_checkpointing=false",
        "trainer.fast_dev_run=true",
    ],
)
def test_lightning_switches_work_with_the_default_callbacks(make_cfg: MakeCfg, tmp_path: Path, switch: str) -> None:
    """The first overrides a Lightning user types work with every default callback, the progress bar included."""
    cfg = make_cfg(
        switch,
        "callbacks.dead_relu.probe_size=200",
        "callbacks.top_patches.probe_size=200",
        "callbacks.umap.probe_size=200",
        "trainer.limit_train_batches=2",
    )
    cfg.callbacks.rich_progress_bar = OmegaConf.create({"_target_": "pytorch_lightning.callbacks.RichProgressBar"})
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    events = read_events(tmp_path)["scalars"]
    ckpts = list((tmp_path / "checkpoints").glob("*.ckpt"))
    if switch in ("trainer.logger=false", "trainer.fast_dev_run=true"):
        assert not events, "no logger, no event files"
    else:
        assert "val/acc" in events
    assert bool(ckpts) == (switch in ("trainer.enable_progress_bar=false", "trainer.logger=false"))
