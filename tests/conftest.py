"""Shared fixtures: the real Fashion-MNIST files, a session-wide decode cache, and the real Hydra config."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnnfeat.cli import CONFIG_DIR
from cnnfeat.data import ENV_DATA, FashionMNISTDataModule

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
    """Every event under ``run_dir``, by kind and tag: ``{"scalars": {tag: [(step, value)]}, ...}``."""
    out: dict[str, dict] = {"scalars": {}, "images": {}, "histograms": {}, "tensors": {}}
    for f in sorted(glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True)):
        ea = EventAccumulator(f, size_guidance={"images": 0, "scalars": 0, "histograms": 0, "tensors": 0})
        ea.Reload()
        tags = ea.Tags()
        for tag in tags.get("scalars", []):
            out["scalars"].setdefault(tag, []).extend((e.step, e.value) for e in ea.Scalars(tag))
        for tag in tags.get("images", []):
            out["images"].setdefault(tag, []).extend(ea.Images(tag))
        for tag in tags.get("histograms", []):
            out["histograms"].setdefault(tag, []).extend(ea.Histograms(tag))
        for tag in tags.get("tensors", []):
            out["tensors"].setdefault(tag, []).extend(ea.Tensors(tag))
    return out
