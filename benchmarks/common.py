"""Helpers shared by the benchmark scripts: run the real composed config in-process and read results back."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from cnnfeat.callbacks import VisualizationCallback
from cnnfeat.report.figures import read_scalars
from cnnfeat.run.train import CONFIG_DIR, build

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class RunResult:
    overrides: list[str]
    fit_seconds: float
    test_acc: float
    epochs: list[dict[str, float]]  # per epoch: train/acc, train/loss, val/acc, val/loss
    callback_seconds: dict[str, list[float]] = field(default_factory=dict)  # each render (untrained + epochs)
    end_seconds: dict[str, float] = field(default_factory=dict)  # each callback's end of fit (finish, GIF, ...)
    path_seconds: dict[str, float] = field(default_factory=dict)  # of the renders: relevance's path check


def compose_config(overrides: list[str], out: Path) -> DictConfig:
    """The real ``train`` config with ``overrides``, writing into ``out``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.root_dir = str(out)
    return cfg


def run_config(overrides: list[str], out: Path) -> RunResult:
    """Compose ``train`` with ``overrides``, fit (timed) and test; per-epoch metrics from the event files."""
    cfg = compose_config(overrides, out)
    dm, model, trainer = build(cfg)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_seconds = time.perf_counter() - start
    test_acc = float("nan")
    if cfg.get("test"):
        test_acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    sc = read_scalars(out)
    keys = ("train/acc", "train/loss", "val/acc", "val/loss")
    n = len(sc.get("train/acc", []))
    epochs = [{k: sc[k][i][1] for k in keys if k in sc and i < len(sc[k])} for i in range(n)]
    viz = [cb for cb in trainer.callbacks if isinstance(cb, VisualizationCallback)]
    cb_seconds = {type(cb).__name__: cb.seconds for cb in viz}
    end = {type(cb).__name__: cb.end_seconds for cb in viz}
    path = {type(cb).__name__: sum(cb.path_seconds) for cb in viz if hasattr(cb, "path_seconds")}
    return RunResult(list(overrides), fit_seconds, test_acc, epochs, cb_seconds, end, path)


def machine() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=lambda o: o.__dict__))
    return path


def write_markdown(name: str, lines: list[str], echo: bool = True) -> Path:
    """``results/<name>.md`` from ``lines`` (one per line); ``echo`` prints it too."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))
    return path
