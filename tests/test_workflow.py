"""Research workflow: explore a checkpoint, reuse with your own model, HParams, sweeps, DDP, TensorBoard over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from cnnfeat.run.train import CONFIG_DIR, train
from tests.conftest import REPO, read_events

MakeCfg = Callable[..., DictConfig]
SMALL_PROBES = [
    "callbacks.dead_relu.probe_size=200",
    "callbacks.top_patches.probe_size=300",
    "callbacks.umap.probe_size=200",
    "callbacks.top_patches.every_n_epochs=1",
]


def _run(
    args: list[str], cwd: Path, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    environ = None if env is None else {**os.environ, **env}
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environ)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def test_own_model_example_gets_every_picture(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    _run(
        [
            str(REPO / "examples" / "own_model.py"),
            "--epochs",
            "1",
            "--limit-batches",
            "20",
            "--probe",
            "300",
            "--out",
            str(tmp_path),
            "--data-dir",
            str(data_dir),
            "--cache-dir",
            str(cache_dir),
        ],
        cwd=tmp_path,
    )
    ev = read_events(tmp_path)
    for tag in (
        "filters/block1.conv",
        "filters/block2.conv",
        "feature_maps/block2.conv/relu/img22",
        "feature_maps/block1.conv/conv/img74",
        "top_patches/block2.conv",
        "umap/features",
        "umap/pixels",
    ):
        assert tag in ev["images"], tag
    assert "relu/dead_fraction/block1.relu" in ev["scalars"] and "umap/knn_acc" in ev["scalars"]


def test_explore_rebuilds_every_picture_from_per_epoch_checkpoints(
    make_cfg: MakeCfg, tmp_path: Path, data_dir: Path, cache_dir: Path
) -> None:
    run = tmp_path / "run"
    cfg = make_cfg(
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=10",
        "callbacks.model_checkpoint.save_top_k=-1",
        f"paths.output_dir={run}",
        *SMALL_PROBES,
    )
    train(cfg)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")  # what a CLI run leaves beside its checkpoints
    out = tmp_path / "explore"
    _run(
        [
            "-m",
            "cnnfeat.run.explore",
            f"ckpt={run / 'checkpoints'}",
            f"data.data_dir={data_dir}",
            f"data.cache_dir={cache_dir}",
            f"hydra.run.dir={out}",
            *SMALL_PROBES,
        ],
        cwd=tmp_path,
    )
    trained_events, explored_events = read_events(run), read_events(out)
    trained, explored = trained_events["images"], explored_events["images"]
    for tag in ("filters/conv2", "feature_maps/conv1/relu/img22", "top_patches/conv3", "umap/features"):
        assert [e.step for e in explored[tag]] == [0, 1, 2], tag
    for tag in ("relu/dead_fraction/all", "relu/zero_fraction/relu3", "umap/knn_acc"):  # one step axis, both tools
        assert explored_events["scalars"][tag] == trained_events["scalars"][tag], tag
    # the untrained network is re-created from the run's seed: its pictures are the training run's step 0
    assert explored["filters/conv1"][0].encoded_image_string == trained["filters/conv1"][0].encoded_image_string
    assert explored["top_patches/conv3"][2].encoded_image_string == trained["top_patches/conv3"][2].encoded_image_string
    assert Image.open(out / "umap_embedding.gif").n_frames == 3
    assert (out / "images" / "filters" / "conv1" / "step_002.png").is_file()


def test_explore_refuses_a_corrupt_checkpoint_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"\x80\x02 truncated")
    r = subprocess.run(
        [sys.executable, "-m", "cnnfeat.run.explore", f"ckpt={bad}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "broken.ckpt is not a readable checkpoint" in out and "Traceback" not in out


def test_hparams_tab_gets_config_and_final_metrics(make_cfg: MakeCfg, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    train(make_cfg("callbacks=none", "model.optimizer.lr=0.123"))
    summaries = {
        v.tag: v.metadata.plugin_data
        for f in tmp_path.glob("events.out.tfevents.*")
        for event in EventFileLoader(str(f)).Load()
        for v in event.summary.value
    }
    assert summaries["_hparams_/experiment"].plugin_name == "hparams"
    start = plugin_data_pb2.HParamsPluginData.FromString(summaries["_hparams_/session_start_info"].content)
    hparams = start.session_start_info.hparams
    assert hparams["model.optimizer/lr"].number_value == pytest.approx(0.123)
    assert hparams["data.batch_size"].number_value == 128 and hparams["status"].string_value == "finished"
    scalars = read_events(tmp_path)["scalars"]
    assert "hp/val/acc" in scalars and "hp/test/acc" in scalars


def test_optuna_sweep_runs_trials_and_reports_the_best(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    _run(
        [
            "-m",
            "cnnfeat.run.train",
            "-m",
            "hparams_search=optuna",
            "experiment=quick",
            "trainer=cpu",
            "hydra.sweeper.n_trials=2",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=10",
            f"data.data_dir={data_dir}",
            f"data.cache_dir={cache_dir}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
    )
    best = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_params" in best and "model.optimizer.lr" in best
    assert [r["status"] for r in json.loads((tmp_path / "sweep" / "summary.json").read_text())] == ["finished"] * 2


def test_slurm_launcher_config_composes() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.gpus_per_node == 1 and launcher.timeout_min == 120


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    """Metrics synced, pictures written once by rank 0, gathered top patches equal a single process's."""
    common = [
        "-m",
        "cnnfeat.run.train",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=10",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.enable_model_summary=false",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        *SMALL_PROBES,
    ]
    _run(
        [*common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'ddp'}"],
        cwd=tmp_path,
    )
    _run([*common, f"hydra.run.dir={tmp_path / 'single'}"], cwd=tmp_path)
    ddp, single = read_events(tmp_path / "ddp"), read_events(tmp_path / "single")
    assert [e.step for e in ddp["images"]["top_patches/conv3"]] == [0, 1], "one image per step: rank 0 only"
    assert (
        ddp["images"]["top_patches/conv3"][0].encoded_image_string
        == single["images"]["top_patches/conv3"][0].encoded_image_string
    ), "rank 0 renders the whole probe: the single process's top-k"
    assert [s for s, _ in ddp["scalars"]["relu/dead_fraction/all"]] == [0, 1], "written once per step, by rank 0"
    assert len(ddp["scalars"]["val/acc"]) == 1 and "umap/knn_acc" in ddp["scalars"]
    assert json.loads((tmp_path / "ddp" / "status.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_attribution_importance_and_relevance_under_ddp(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    """Issue 24's callbacks under DDP on two CPU processes: rank 0 renders the whole probe once per step, so every
    picture, importance number and overlap equals a single process's on the same weights (same seed, same data).

    Both runs use one torch thread: Lightning gives each DDP process its share of the cores, and a convolution summed
    in another order by another thread count moves an untrained network's IG completeness gap (a ratio of tiny
    logit differences) in the fifth digit; with the same thread count the numbers must be equal bit for bit."""
    one_thread = {"OMP_NUM_THREADS": "1"}
    common = [
        "-m",
        "cnnfeat.run.train",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=0",  # no training: both runs hold the seed's weights, so the numbers must agree
        "trainer.limit_val_batches=2",
        "test=false",
        "trainer.enable_model_summary=false",
        f"data.data_dir={data_dir}",
        f"data.cache_dir={cache_dir}",
        "callbacks=[none,attribution,importance,relevance]",
        "callbacks.attribution.image_ids=[22,193]",
        "callbacks.importance.probe_size=200",
        "callbacks.relevance.probe_size=200",
        "callbacks.relevance.path_check=false",
    ]
    _run(
        [*common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'ddp'}"],
        cwd=tmp_path,
        env=one_thread,
    )
    _run([*common, f"hydra.run.dir={tmp_path / 'single'}"], cwd=tmp_path, env=one_thread)
    ddp, single = read_events(tmp_path / "ddp"), read_events(tmp_path / "single")
    for tag in ("attribution/img22", "relevance/refs/conv3", "relevance/heatmaps/conv1"):
        assert [e.step for e in ddp["images"][tag]] == [e.step for e in single["images"][tag]] == [0], tag
        assert ddp["images"][tag][0].encoded_image_string == single["images"][tag][0].encoded_image_string, tag
    wanted = [t for t in single["scalars"] if t.startswith(("importance/", "relevance/", "attribution/"))]
    assert any(t.startswith("importance/conv2/unit") for t in wanted) and "relevance/overlap/conv3" in wanted
    for tag in wanted:
        assert ddp["scalars"][tag] == single["scalars"][tag], tag  # written once, by rank 0, the same values
    assert json.loads((tmp_path / "ddp" / "status.json").read_text())["status"] == "finished"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_serves_the_image_tags(make_cfg: MakeCfg, tmp_path: Path) -> None:
    train(make_cfg("trainer.limit_train_batches=5", *SMALL_PROBES))
    port = _free_port()
    tb = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        tags: dict = {}
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/images/tags", timeout=5) as r:
                    tags = json.loads(r.read())
                if tags and any(tags.values()):
                    break
            except OSError:
                pass
            time.sleep(1)
        served = {t for run in tags.values() for t in run}
        for tag in ("filters/conv1", "feature_maps/conv2/relu/img22", "top_patches/conv3", "umap/features"):
            assert tag in served, f"{tag} not served; TensorBoard has {sorted(served)[:8]}"
        run = next(iter(tags))
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/data/plugin/images/images?run={run}&tag=filters/conv1", timeout=5
        ) as r:
            assert [e["step"] for e in json.loads(r.read())] == [0, 1]
    finally:
        tb.terminate()
        tb.wait(timeout=30)
