"""Hydra entry point: compose the config, instantiate datamodule, model, callbacks, logger and trainer, fit.

``cnnfeat-train experiment=seed`` (or ``python -m cnnfeat.run.train ...``) reproduces the lecture. How a run can
end, and the exit code and ``status.json`` of each ending, are described in README ("Resuming and failures").
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cnnfeat.errors import CheckpointError, ConfigError, TrainingDiverged
from cnnfeat.report import report_at_end
from cnnfeat.run import lightning_api as pl
from cnnfeat.run.checkpoint_io import AtomicCheckpointIO
from cnnfeat.run.checkpoints import check_compatible, read_checkpoint
from cnnfeat.run.cli import (
    CONFIG_DIR,
    entry_point,
    instantiate_group,
    instantiate_node,
    is_multirun,
    run_cli,
    sigterm_raises,
)
from cnnfeat.run.lightning_api import (
    CheckpointIO,
    LearningRateMonitor,
    ModelCheckpoint,
    ProgressBar,
    TensorBoardLogger,
    rank_zero_only,
)
from cnnfeat.run.resume import ApplyOverrides, RecordConfig, check_resume, saved_training_config, training_config
from cnnfeat.run.status import EXIT_DIVERGED, EXIT_SIGINT, EXIT_SIGTERM, RunLock, read_status, write_status

__all__ = ["CONFIG_DIR", "build", "main", "train"]

log = logging.getLogger("cnnfeat")

_INT_ARGS = (
    "max_epochs",
    "min_epochs",
    "max_steps",
    "min_steps",
    "num_sanity_val_steps",
    "log_every_n_steps",
    "check_val_every_n_epoch",
    "accumulate_grad_batches",
    "num_nodes",
)
_NUMBER_ARGS = (
    "limit_train_batches",
    "limit_val_batches",
    "limit_test_batches",
    "limit_predict_batches",
    "overfit_batches",
    "val_check_interval",
    "gradient_clip_val",
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(cfg: DictConfig) -> None:
    """Fail before anything is built on values of the wrong type (with the key's name)."""
    seed = cfg.get("seed")
    if seed is not None and not _is_int(seed):
        raise ConfigError(f"seed must be an integer or null, got {seed!r}")
    trainer = cfg.get("trainer") or {}
    for key in _INT_ARGS:
        v = trainer.get(key)
        if v is not None and not _is_int(v):
            raise ConfigError(f"trainer.{key} must be an integer, got {v!r}")
    for key in _NUMBER_ARGS:
        v = trainer.get(key)
        if v is not None and not (_is_int(v) or (isinstance(v, float) and math.isfinite(v))):
            raise ConfigError(f"trainer.{key} must be a number, got {v!r}")
    if cfg.get("resume_overrides", "refuse") not in ("refuse", "allow"):
        raise ConfigError(f"resume_overrides must be 'refuse' or 'allow', got {cfg.get('resume_overrides')!r}")


def _callbacks_for(trainer_cfg: DictConfig, callbacks: list[Any], loggers: list[Any]) -> list[Any]:
    """Drop callbacks that a Trainer switch turns off, instead of letting Lightning refuse the combination."""
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if trainer_cfg.get("enable_checkpointing") is False:
        callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
    if trainer_cfg.get("enable_progress_bar") is False:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Check, seed, then instantiate the datamodule, model and trainer (with callbacks and loggers) from ``cfg``.

    Checkpoints are written by :class:`~cnnfeat.run.checkpoint_io.AtomicCheckpointIO` unless the config names
    another ``CheckpointIO`` in ``trainer.plugins``.
    """
    check_config(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate_node(cfg.data, "data")
    model = instantiate_node(cfg.model, "model")
    loggers = [] if cfg.trainer.get("logger") is False else instantiate_group(cfg.get("logger"), "logger")
    callbacks = _callbacks_for(cfg.trainer, instantiate_group(cfg.get("callbacks")), loggers)
    plugins = [instantiate_node(p, "trainer.plugins") for p in (cfg.trainer.get("plugins") or [])]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    trainer = instantiate_node(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False, plugins=plugins)
    return datamodule, model, trainer


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path`` if given, else ``<run dir>/checkpoints/last.ckpt`` when ``resume=true``; checked to exist."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None and cfg.get("resume"):
        ckpt_path = str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
        if not Path(ckpt_path).is_file():
            raise CheckpointError(
                f"resume=true but {ckpt_path} does not exist: point hydra.run.dir at the run to "
                "resume (outputs/runs/DATE/TIME-PID) or give ckpt_path=..."
            )
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise CheckpointError(
            f"ckpt_path={ckpt_path} does not exist (expected a .ckpt file, e.g. "
            "outputs/runs/DATE/TIME-PID/checkpoints/last.ckpt)"
        )
    return ckpt_path


def prepare_resume(cfg: DictConfig, ckpt_path: str, model: pl.LightningModule, trainer: pl.Trainer) -> list[str]:
    """Check a checkpoint before resuming from it; with ``resume_overrides=allow`` arrange for new values to apply.

    Returns the changed training settings (empty when the config is the checkpoint's own).
    """
    ckpt = read_checkpoint(ckpt_path)
    check_compatible(ckpt, model, ckpt_path)
    saved = saved_training_config(ckpt, ckpt_path)
    if saved is None:
        return []
    new = training_config(cfg)
    changes = check_resume(saved, new, cfg.get("resume_overrides") == "allow", ckpt_path)
    if changes:
        log.warning("Resuming with changed settings:\n  %s", "\n  ".join(changes))
        saved_lr = (saved.get("model", {}).get("optimizer") or {}).get("lr")
        optimizer, scheduler = new["model"].get("optimizer") or {}, new["model"].get("scheduler")
        trainer.callbacks.append(ApplyOverrides(optimizer, scheduler, saved_lr))
    return changes


def check_classes(datamodule: pl.LightningDataModule, model: pl.LightningModule) -> None:
    """Refuse a model with fewer outputs than the data has classes (labels would be out of range)."""
    data_n, model_n = getattr(datamodule, "num_classes", None), getattr(model, "num_classes", None)
    if _is_int(data_n) and _is_int(model_n) and model_n < data_n:
        raise ConfigError(
            f"model.num_classes={model_n}, but the data has {data_n} classes: the model needs at least {data_n} outputs"
        )


HPARAM_METRICS = ("val/acc", "test/acc", "train/acc", "train/loss", "umap/knn_acc", "relu/dead_fraction/all")


def log_hparams(trainer: pl.Trainer, cfg: DictConfig, metrics: dict[str, float], status: str) -> None:
    """The run's config and final metrics in TensorBoard's HParams tab, so multirun jobs compare side by side."""
    params: dict[str, Any] = {"seed": cfg.get("seed"), "status": status}
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
    hp_metrics = {f"hp/{k}": v for k, v in metrics.items() if k in HPARAM_METRICS and math.isfinite(v)}
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            lg.log_hyperparams(params, hp_metrics)
            lg.experiment.flush()


def _metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (resuming if asked), then test the final weights; return the metrics and record how the run ended.

    ``status.json`` in the run directory: ``running`` while it trains, then ``finished``, ``diverged``
    (the returned metrics then hold ``diverged: 1.0``), ``interrupted`` or ``failed``. A resume that is refused
    (missing, foreign or unsafe checkpoint, a changed config without ``resume_overrides=allow``) leaves the
    run's record untouched. Only one live process may write into a run directory.
    """
    run_dir = Path(cfg.paths.output_dir)
    rank0 = rank_zero_only.rank == 0
    lock = RunLock.acquire(run_dir) if rank0 and not RunLock.is_held(run_dir) else None
    status = rank_zero_only(write_status)
    started = False
    trainer: pl.Trainer | None = None
    try:
        with sigterm_raises() as signals:
            ckpt_path = resolve_ckpt_path(cfg)
            if ckpt_path is None:
                status(run_dir, "running")
                started = True
            datamodule, model, trainer = build(cfg)
            trainer.callbacks.append(RecordConfig(training_config(cfg)))
            check_classes(datamodule, model)
            if ckpt_path is not None:
                changes = prepare_resume(cfg, ckpt_path, model, trainer)
                previous = {k: v for k, v in (read_status(run_dir) or {}).items() if k != "previous"}
                status(run_dir, "running", resumed_from=ckpt_path, changes=changes, previous=previous or None)
                started = True
            if trainer.is_global_zero:
                log.info("Output directory: %s", run_dir)
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)  # AtomicCheckpointIO: weights_only
            metrics = _metrics(trainer)
            if cfg.get("test"):
                if trainer.is_global_zero:
                    log.info("Testing the final weights on the test set")
                trainer.test(model, datamodule=datamodule, verbose=False)
                metrics.update({k: v for k, v in _metrics(trainer).items() if k.startswith("test/")})
                if trainer.is_global_zero:
                    log.info("Test accuracy (final weights): %.2f%%", 100 * metrics["test/acc"])
            if signals["sigterm"]:  # arrived too late for Lightning to stop a loop: still an interrupted run
                raise SystemExit(EXIT_SIGTERM)
    except TrainingDiverged as e:
        metrics = {**_metrics(trainer), "diverged": 1.0} if trainer is not None else {"diverged": 1.0}
        log.error("%s", e)
        status(run_dir, "diverged", epoch=e.epoch, step=e.step, loss=e.loss, error=str(e), metrics=metrics)
        if trainer is not None:
            log_hparams(trainer, cfg, metrics, "diverged")
        if cfg.get("report", True) and rank0:
            report_at_end(run_dir)
        return metrics
    except BaseException as e:
        if started:
            interrupted = isinstance(e, KeyboardInterrupt | SystemExit)
            status(
                run_dir,
                "interrupted" if interrupted else "failed",
                error=f"{type(e).__name__}: {e}",
                epoch=getattr(trainer, "current_epoch", None),  # None too where no Trainer was built
                step=getattr(trainer, "global_step", None),
            )
        if isinstance(e, SystemExit) and e.code in (None, 0, EXIT_SIGTERM):  # Lightning's SIGTERMException
            log.error("Interrupted by SIGTERM; resume with resume=true hydra.run.dir=%s", run_dir)
            raise SystemExit(EXIT_SIGTERM) from e
        if isinstance(e, SystemExit) and isinstance(e.__context__, KeyboardInterrupt):  # Lightning's Ctrl-C exit
            raise SystemExit(EXIT_SIGINT) from e
        raise
    finally:
        if lock is not None:
            lock.release()
    log_hparams(trainer, cfg, metrics, "finished")
    status(run_dir, "finished", epoch=trainer.current_epoch, step=trainer.global_step, metrics=metrics)
    if cfg.get("report", True) and rank0:
        report_at_end(run_dir)
    return metrics


def _main(cfg: DictConfig) -> float | None:
    """Train and turn a diverged single run into exit code 3 (a multirun goes on to its next job)."""
    metrics = train(cfg)
    if metrics.get("diverged") and not is_multirun():
        raise SystemExit(EXIT_DIVERGED)
    return math.nan if metrics.get("diverged") else metrics.get("val/acc")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Train; returns ``val/acc`` (NaN for a diverged job) so that sweepers (e.g. Optuna) can optimise it."""
    return run_cli(_main, cfg)


#: ``cnnfeat-train``: Hydra's refusals of the command line exit with code 2 too (see ``cnnfeat.run.cli.entry_point``)
main = entry_point(hydra_main, "cnnfeat-train")


if __name__ == "__main__":
    main()
