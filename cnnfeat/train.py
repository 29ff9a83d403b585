"""Hydra entry point: compose the config, instantiate datamodule, model, callbacks, logger and trainer, fit.

``cnnfeat-train experiment=seed`` (or ``python -m cnnfeat.train ...``) reproduces the lecture.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger("cnnfeat")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _instantiate_all(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group; ``null`` entries are skipped."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Seed, then instantiate the datamodule, model and trainer (with callbacks and loggers) from ``cfg``."""
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, model, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (resuming from ``cfg.ckpt_path`` if set), then test the final weights; return the metrics."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} does not exist (expected a .ckpt file, e.g. "
            "outputs/runs/DATE/TIME/checkpoints/last.ckpt)"
        )
    datamodule, model, trainer = build(cfg)
    log.info("Output directory: %s", cfg.paths.output_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        log.info("Test accuracy (final weights): %.2f%%", 100 * metrics["test/acc"])
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; returns ``val/acc`` so that sweepers (e.g. Optuna) can optimise it."""
    return train(cfg).get("val/acc")


if __name__ == "__main__":
    main()
