"""Experiment presets compose as documented; the dying-ReLU multirun and its figure work end to end."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from cnnfeat.report.figures import dead_relu_figure, multirun_jobs, read_scalars
from cnnfeat.run.train import CONFIG_DIR

MakeCfg = Callable[..., DictConfig]


def test_seed_experiment_is_the_lecture_recipe() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=seed"])  # nothing else on top
    assert cfg.trainer.max_epochs == 15 and cfg.data.batch_size == 128 and cfg.data.val_on_test
    assert cfg.model.optimizer == {"_target_": "torch.optim.SGD", "lr": 0.2}
    assert cfg.model.scheduler.milestones == [2, 5, 8, 11, 14] and cfg.model.scheduler.gamma == 0.5
    assert cfg.model.input_mean is None and cfg.model.input_std is None
    assert {"filters", "feature_maps", "dead_relu", "top_patches"} <= set(cfg.callbacks)


def test_quick_and_dying_relu_experiments(make_cfg: MakeCfg) -> None:
    quick = make_cfg("experiment=quick")
    assert quick.trainer.max_epochs == 1 and "filters" not in quick.callbacks
    dying = make_cfg("experiment=dying_relu")
    assert dying.model.scheduler is None and "dead_relu" in dying.callbacks and "filters" not in dying.callbacks
    transfer, transfer_quick = make_cfg("experiment=transfer"), make_cfg("experiment=transfer_quick")
    assert transfer_quick.data.max_images == 2000 and transfer_quick.trainer.max_epochs == 1
    for key in ("model", "callbacks", "backbone"):
        assert transfer_quick[key] == transfer[key], f"transfer_quick changes only the data size and epochs: {key}"
    assert make_cfg("callbacks=none").callbacks.keys() == {
        "model_checkpoint",
        "last_checkpoint",
        "lr_monitor",
        "progress_log",
        "rich_progress_bar",
        "epoch_summary",
        "divergence_guard",
    }


def test_dying_relu_multirun_and_figure(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    args = [
        sys.executable,
        "-m",
        "cnnfeat.run.train",
        "-m",
        "experiment=dying_relu",
        "trainer=cpu",
        "model.optimizer.lr=0.02,3.0",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=60",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "callbacks.dead_relu.probe_size=300",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = multirun_jobs(tmp_path / "sweep")
    assert list(jobs) == ["model.optimizer.lr=0.02", "model.optimizer.lr=3.0"]
    final = {lbl: read_scalars(job, "relu/dead_fraction/all")["relu/dead_fraction/all"] for lbl, job in jobs.items()}
    assert all(len(v) == 3 for v in final.values()), "untrained + 2 epochs"
    low, high = final["model.optimizer.lr=0.02"][-1][1], final["model.optimizer.lr=3.0"][-1][1]
    assert high > low, f"dead fraction must grow with the learning rate ({low} -> {high})"

    png = dead_relu_figure(tmp_path / "sweep", tmp_path / "dead.png")
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.shape[0] > 300 and pixels.std() > 10, "the figure must not be blank"
