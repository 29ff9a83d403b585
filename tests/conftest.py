"""Shared fixtures: the real Fashion-MNIST files, a session-wide decode cache, and the real Hydra config."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import (
    HistogramEvent,
    HistogramValue,
    ImageEvent,
    TensorEvent,
)

from cnnfeat.data.fashion_mnist import ENV_DATA, FashionMNISTDataModule
from cnnfeat.report.events import event_files, records
from cnnfeat.run.cli import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own temporary directory: anything written to the working directory (a Trainer's
    default_root_dir, lightning_logs, a GIF) lands there, never in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real files: $CNNFEAT_DATA, else ../shared/data beside the repository."""
    d = Path(os.environ.get(ENV_DATA) or SHARED_DATA)
    if not d.exists():
        pytest.fail(f"Fashion-MNIST not found at {d}; set {ENV_DATA} to the directory holding the files")
    return d


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decode cache for the whole session, so the files are decoded once."""
    return tmp_path_factory.mktemp("cnnfeat-cache")


@pytest.fixture(scope="session")
def datamodule(data_dir: Path, cache_dir: Path) -> FashionMNISTDataModule:
    """A prepared and set-up DataModule (default split: 55k train / 5k val / 10k test)."""
    dm = FashionMNISTDataModule(data_dir=data_dir, cache_dir=cache_dir, download=False)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture
def make_cfg(tmp_path: Path, data_dir: Path, cache_dir: Path) -> Callable[..., DictConfig]:
    """Compose the real ``train`` config for a tiny CPU run writing into ``tmp_path`` (overrides last)."""

    def make(*overrides: str) -> DictConfig:
        base = [
            "trainer=cpu",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=4",
            "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2",
            "trainer.num_sanity_val_steps=0",
            "trainer.enable_model_summary=false",
            "callbacks.rich_progress_bar=null",
            "report=false",  # tests of the report ask for it
            f"data.data_dir={data_dir}",
            f"data.cache_dir={cache_dir}",
            "data.download=false",
            f"paths.root_dir={REPO}",
            f"paths.output_dir={tmp_path}",  # a test's own paths.output_dir=... comes later and wins
        ]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=[*base, *overrides])

    return make


def read_events(run_dir: Path | str) -> dict[str, dict]:
    """Every event under ``run_dir``, by kind and tag: ``{"scalars": {tag: [(step, value)]}, ...}``, images, histograms
    and tensors as TensorBoard's ``EventAccumulator`` gives them. Every write is kept (a step written twice is listed
    twice), in the order written across the run's files (``cnnfeat.report.events.records``)."""
    out: dict[str, dict] = {"scalars": {}, "images": {}, "histograms": {}, "tensors": {}}
    for r in records(event_files(run_dir)):
        v, kind = r.value, r.value.WhichOneof("value")
        if kind == "simple_value":
            out["scalars"].setdefault(r.tag, []).append((r.step, v.simple_value))
        elif kind == "image":
            i = v.image
            out["images"].setdefault(r.tag, []).append(
                ImageEvent(r.wall_time, r.step, i.encoded_image_string, i.width, i.height)
            )
        elif kind == "histo":
            h = v.histo
            value = HistogramValue(h.min, h.max, h.num, h.sum, h.sum_squares, list(h.bucket_limit), list(h.bucket))
            out["histograms"].setdefault(r.tag, []).append(HistogramEvent(r.wall_time, r.step, value))
        elif kind == "tensor":
            out["tensors"].setdefault(r.tag, []).append(TensorEvent(r.wall_time, r.step, v.tensor))
    return out
