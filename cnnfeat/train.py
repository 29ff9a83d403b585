"""Hydra entry point: compose the config, instantiate datamodule, model, callbacks, logger and trainer, fit.

``cnnfeat-train experiment=seed`` (or ``python -m cnnfeat.train ...``) reproduces the lecture.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from cnnfeat.callbacks.divergence import DivergenceGuard
from cnnfeat.checkpoints import check_compatible, read_checkpoint
from cnnfeat.data import DataError
from cnnfeat.models.alexnet import WeightsError

log = logging.getLogger("cnnfeat")
T = TypeVar("T")

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# ${pid:} in run directories: two runs started in the same second still get directories of their own
OmegaConf.register_new_resolver("pid", os.getpid, replace=True)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
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
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, model, trainer


@rank_zero_only
def write_status(run_dir: str | Path, status: str, **info: Any) -> Path:
    """``<run dir>/status.json``: running, finished, diverged, interrupted or failed (with details); rank 0 only."""
    path = Path(run_dir) / "status.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"status": status, **info}, indent=2, default=str))
    tmp.replace(path)
    return path


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path`` if given, else ``<run dir>/checkpoints/last.ckpt`` when ``resume=true``; checked to exist."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None and cfg.get("resume"):
        ckpt_path = str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(
                f"resume=true but {ckpt_path} does not exist: point hydra.run.dir at the run to "
                "resume (outputs/runs/DATE/TIME) or give ckpt_path=..."
            )
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} does not exist (expected a .ckpt file, e.g. "
            "outputs/runs/DATE/TIME/checkpoints/last.ckpt)"
        )
    return ckpt_path


HPARAM_METRICS = ("val/acc", "test/acc", "train/acc", "train/loss", "umap/knn_acc", "relu/dead_fraction/all")


def log_hparams(trainer: pl.Trainer, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """The run's config and final metrics in TensorBoard's HParams tab, so multirun jobs compare side by side."""
    params: dict[str, Any] = {"seed": cfg.get("seed"), "status": "diverged" if "diverged" in metrics else "finished"}
    if HydraConfig.initialized():  # not when composed without a Hydra app (tests, benchmarks)
        params["experiment"] = HydraConfig.get().runtime.choices.get("experiment") or "none"
    for section in ("model", "data", "trainer"):
        node = OmegaConf.to_container(cfg[section], resolve=True)
        params.update(
            {
                f"{section}.{k}": v
                for k, v in node.items()
                if not k.startswith("_")
                and (section != "trainer" or k in ("max_epochs", "precision", "accelerator", "devices"))
            }
        )
    hp_metrics = {f"hp/{k}": v for k, v in metrics.items() if k in HPARAM_METRICS}
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            lg.log_hyperparams(params, hp_metrics)
            lg.experiment.flush()


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (resuming if asked), then test the final weights; return the metrics and record the run's status.

    ``status.json`` in the run directory says how the run ended: ``finished``, ``diverged`` (non-finite loss,
    stopped cleanly by ``DivergenceGuard``; not tested), ``interrupted`` (SIGTERM/Ctrl-C) or ``failed``.
    """
    ckpt_path = resolve_ckpt_path(cfg)
    datamodule, model, trainer = build(cfg)
    if ckpt_path is not None:
        check_compatible(read_checkpoint(ckpt_path), model, ckpt_path)
    run_dir = cfg.paths.output_dir
    if trainer.is_global_zero:
        log.info("Output directory: %s", run_dir)
    write_status(run_dir, "running", resumed_from=ckpt_path)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except BaseException as e:  # SIGTERM and Ctrl-C arrive as SystemExit subclasses
        interrupted = isinstance(e, KeyboardInterrupt | SystemExit)
        write_status(
            run_dir,
            "interrupted" if interrupted else "failed",
            error=f"{type(e).__name__}: {e}",
            epoch=trainer.current_epoch,
            step=trainer.global_step,
        )
        if isinstance(e, SystemExit) and not e.code:  # Lightning's SIGTERMException carries no exit code
            log.error("Interrupted by SIGTERM; resume with resume=true hydra.run.dir=%s", run_dir)
            raise SystemExit(128 + signal.SIGTERM) from e
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    guard = next((c for c in trainer.callbacks if isinstance(c, DivergenceGuard)), None)
    if guard is not None and guard.diverged:
        write_status(run_dir, "diverged", **guard.diverged, metrics=metrics)
        log_hparams(trainer, cfg, {**metrics, "diverged": 1.0})
        return {**metrics, "diverged": 1.0}
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        if trainer.is_global_zero:
            log.info("Test accuracy (final weights): %.2f%%", 100 * metrics["test/acc"])
    log_hparams(trainer, cfg, metrics)
    write_status(run_dir, "finished", epoch=trainer.current_epoch, step=trainer.global_step, metrics=metrics)
    return metrics


#: mistakes a user can fix (data, weights, checkpoint, a config value): a message is enough, no traceback
USER_ERRORS = (DataError, WeightsError, FileNotFoundError, ValueError)


def run_cli(fn: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run an entry point; in a single run a user error ends it with its message and exit code 2.

    In a multirun the error is re-raised so that only that job fails; ``HYDRA_FULL_ERROR=1`` shows the
    traceback.
    """
    try:
        return fn(cfg)
    except USER_ERRORS as e:
        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        if multirun or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s\n(set HYDRA_FULL_ERROR=1 for the full traceback)", type(e).__name__, e)
        raise SystemExit(2) from None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; returns ``val/acc`` so that sweepers (e.g. Optuna) can optimise it."""
    return run_cli(train, cfg).get("val/acc")


if __name__ == "__main__":
    main()
