"""Interruption and exact resume, determinism, divergence in sweeps, safe checkpoint loading, run directories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from cnnfeat.callbacks import EmbeddingCallback
from cnnfeat.run.train import build, train
from tests.conftest import read_events
from tests.helpers.procs import Proc

MakeCfg = Callable[..., DictConfig]
SMALL = [
    "trainer.limit_train_batches=40",
    "trainer.limit_val_batches=2",
    "trainer.deterministic=true",
    "callbacks=none",
    "callbacks.rich_progress_bar=null",
]


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def _cli(run_dir: Path, data_dir: Path, cache_dir: Path, *args: str) -> Proc:
    return Proc(
        "cnnfeat.run.train",
        "trainer=cpu",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
        "trainer.enable_model_summary=false",
        "test=false",
        "report=false",
        *SMALL,
        "callbacks.progress_log.every_n_steps=50",
        *args,
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_mid_epoch_then_resumed_equals_an_uninterrupted_run(
    tmp_path: Path, data_dir: Path, cache_dir: Path, sig: signal.Signals
) -> None:
    """Resume restarts the interrupted epoch from ``last.ckpt`` (the end of the last completed epoch) with the
    RNG states saved there, so the final weights equal those of a run that was never stopped."""
    epochs = ["trainer.max_epochs=3", "trainer.limit_train_batches=200"]
    ref = _cli(tmp_path / "ref", data_dir, cache_dir, *epochs)
    run = _cli(tmp_path / "run", data_dir, cache_dir, *epochs)
    run.wait_for_line("epoch 2/3: batch 100/200")  # the progress log: well into epoch 2
    run.p.send_signal(sig)
    assert run.wait(timeout=60) == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 200, "last.ckpt is the end of epoch 1"
    status = json.loads((tmp_path / "run" / "status.json").read_text())["status"]
    assert status == ("interrupted" if sig == signal.SIGTERM else "running")  # SIGKILL leaves no chance to write

    resumed = _cli(tmp_path / "run", data_dir, cache_dir, *epochs, "resume=true")
    assert resumed.wait(timeout=240) == 0, resumed.output[-2000:]
    assert ref.wait(timeout=240) == 0, ref.output[-2000:]
    a, b = _state(tmp_path / "ref"), _state(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "finished"


def test_callback_state_survives_resume(make_cfg: MakeCfg, tmp_path: Path) -> None:
    umap = [
        "callbacks=default",
        "~callbacks.filters",
        "~callbacks.feature_maps",
        "~callbacks.dead_relu",
        "~callbacks.top_patches",
        "callbacks.umap.probe_size=200",
        "callbacks.rich_progress_bar=null",
        "trainer.limit_train_batches=10",
    ]
    train(make_cfg(*umap))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("EmbeddingCallback") for k in ckpt["callbacks"]), "the UMAP trajectory is checkpointed"
    train(make_cfg(*umap, "trainer.max_epochs=2", "resume=true"))
    from PIL import Image

    assert Image.open(tmp_path / "umap_embedding.gif").n_frames == 3, "untrained + epoch 1 (restored) + epoch 2"
    steps = [e.step for e in read_events(tmp_path)["images"]["umap/features"]]
    assert sorted(steps) == [0, 1, 2], "the resumed fit does not redraw step 0 from trained weights"


def test_same_seed_same_metrics_and_pictures(make_cfg: MakeCfg, tmp_path: Path) -> None:
    def run(sub: str) -> tuple[dict, dict, EmbeddingCallback]:
        cfg = make_cfg(
            "trainer.deterministic=true",
            "trainer.limit_train_batches=15",
            "callbacks.umap.probe_size=200",
            "callbacks.top_patches.probe_size=300",
            "callbacks.dead_relu.probe_size=300",
            f"paths.output_dir={tmp_path / sub}",
        )
        dm, model, trainer = build(cfg)
        trainer.fit(model, datamodule=dm)
        cb = next(c for c in trainer.callbacks if isinstance(c, EmbeddingCallback))
        ev = read_events(tmp_path / sub)
        return ev["scalars"], {t: [e.encoded_image_string for e in v] for t, v in ev["images"].items()}, cb

    (s1, i1, c1), (s2, i2, c2) = run("a"), run("b")
    assert "val/acc" in s1 and "umap/features" in i1 and len(c1.embeddings) == 2, "both runs logged to their dirs"
    assert {t: [v for _, v in s] for t, s in s1.items()} == {t: [v for _, v in s] for t, s in s2.items()}
    assert i1 == i2, "every picture, byte for byte"
    assert all(np.array_equal(c1.embeddings[k], c2.embeddings[k]) for k in c1.embeddings)


def test_divergence_stops_cleanly_and_the_sweep_goes_on(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "cnnfeat.run.train",
        "-m",
        "trainer=cpu",
        "callbacks=none",
        "model.optimizer.lr=0.05,50",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=30",
        "trainer.limit_val_batches=2",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        f"hydra.sweep.dir={tmp_path}",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]  # a diverged job is a result of the sweep, not a failure
    assert "Training diverged: the loss is" in r.stdout + r.stderr and "Traceback" not in r.stderr
    statuses = [json.loads((tmp_path / j / "status.json").read_text()) for j in ("0", "1")]
    assert [s["status"] for s in statuses] == ["finished", "diverged"]
    assert statuses[1]["epoch"] == 1 and statuses[1]["loss"] in ("nan", "inf", "-inf")
    assert "train/loss" in read_events(tmp_path / "1")["scalars"] or (tmp_path / "1" / "train.log").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(j["job"], j["status"]) for j in summary] == [(0, "finished"), (1, "diverged")]
    assert "diverged" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"definitely not a checkpoint", r"is not a readable checkpoint"),
        ("unrelated", r"was not saved from SmallCNN: missing \[.*'conv1.weight'.*\], unexpected \['layer.weight'\]"),
    ],
)
def test_corrupt_or_unrelated_checkpoint_is_refused(
    make_cfg: MakeCfg, tmp_path: Path, content: object, message: str
) -> None:
    bad = tmp_path / "bad.ckpt"
    if content == "unrelated":
        torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "epoch": 0}, bad)
    else:
        bad.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        train(make_cfg(f"ckpt_path={bad}"))


def test_two_runs_in_the_same_second_get_their_own_directories(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "cnnfeat.run.train",
        "experiment=quick",
        "trainer=cpu",
        "trainer.limit_train_batches=2",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        "trainer.enable_model_summary=false",
    ]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    runs = list((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 2 and all((r / "status.json").is_file() for r in runs)


def test_event_files_are_flushed_when_a_run_fails(make_cfg: MakeCfg, tmp_path: Path) -> None:
    class Boom(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch == 1:
                raise RuntimeError("boom")

    cfg = make_cfg(*SMALL, "trainer.max_epochs=3")
    dm, model, trainer = build(cfg)
    trainer.callbacks.append(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, datamodule=dm)
    assert len(read_events(tmp_path)["scalars"]["val/acc"]) == 1, "epoch 1's scalars reached the disk"


def test_status_file_of_a_finished_run(make_cfg: MakeCfg, tmp_path: Path) -> None:
    train(make_cfg(*SMALL))
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "finished" and 0 <= status["metrics"]["test/acc"] <= 1
    assert os.path.getsize(tmp_path / "checkpoints" / "last.ckpt") > 0
