"""Faithful resume: compare a resumed run's config with the one its checkpoint was trained under.

Every checkpoint written by ``cnnfeat-train`` carries the training-relevant part of its config
(:func:`training_config`: the model, the data's split and batching, the seed, and the Trainer arguments that
change the optimisation). A resume whose config differs there is refused with the list of differences,
unless ``resume_overrides=allow``; then the new values really apply: the model and data are built from the
new config, and :class:`ApplyOverrides` sets the new optimizer and scheduler values on the *restored*
optimizer and scheduler (a new learning rate is scaled by the schedule's progress so far). A different
optimizer or scheduler class cannot continue the saved state and is always refused.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from typing_extensions import override

from cnnfeat.errors import CheckpointError
from cnnfeat.run import lightning_api as pl

log = logging.getLogger("cnnfeat")

#: data settings that do not change training (where files are, how fast they load)
DATA_RUNTIME_KEYS = frozenset(
    {
        "data_dir",
        "cache_dir",
        "num_workers",
        "pin_memory",
        "download",
        "eval_batch_size",
        "device",
        "extract_batch_size",
        "root",
        "in_memory",
        "max_memory_mb",
        "_convert_",  # how Hydra hands the arguments over (added to the data configs later), not what they are
        # facts of the data set the DataModule checks against its files (a model built for others fails to load)
        "in_channels",
        "image_size",
        "num_classes",
    }
)
#: settings added after checkpoints were written without them, with the value such a checkpoint was trained with
IMPLIED = {"model.in_channels": 1, "model.image_size": 28}
#: settings whose default was ``{}`` before it became ``null`` (the same: nothing)
EMPTY_IS_NONE = ("data.augment",)
#: Trainer arguments that change the optimisation itself
TRAINER_KEYS = ("precision", "gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")
CONFIG_KEY = "cnnfeat_config"


def _plain(node: Any) -> Any:
    """A config node as plain values, resolving what can be resolved (unresolvable values stay as written)."""
    if isinstance(node, DictConfig):
        out = {}
        for k in node:
            try:
                out[k] = _plain(node[k])
            except Exception:  # an interpolation that needs the Hydra runtime (e.g. ${hydra:...})
                out[k] = OmegaConf.to_container(node, resolve=False)[k]
        return out
    if OmegaConf.is_list(node):
        return [_plain(v) for v in node]
    return node


def training_config(cfg: DictConfig) -> dict[str, Any]:
    """The parts of a run config that determine what training does (see the module docstring)."""
    data = _plain(cfg.get("data") or OmegaConf.create({}))
    trainer = _plain(cfg.get("trainer") or OmegaConf.create({}))
    return {
        "model": _plain(cfg.get("model") or OmegaConf.create({})),
        "data": {k: v for k, v in data.items() if k not in DATA_RUNTIME_KEYS},
        "seed": cfg.get("seed"),
        "trainer": {k: trainer.get(k) for k in TRAINER_KEYS},
    }


def saved_training_config(ckpt: Mapping[str, Any], ckpt_path: str | Path) -> dict[str, Any] | None:
    """The training config a checkpoint was written under: its own record, else its run's ``.hydra/config.yaml``."""
    if CONFIG_KEY in ckpt:
        return ckpt[CONFIG_KEY]
    recorded = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
    return training_config(OmegaConf.load(recorded)) if recorded.is_file() else None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): d}


def differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, new value)`` for every training-relevant setting that differs."""
    a, b = _flatten(saved), _flatten(new)
    for d in (a, b):
        for key in EMPTY_IS_NONE:
            if d.get(key) == {}:
                d[key] = None
    missing = object()
    rows = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, IMPLIED.get(key, missing) if key in b else missing), b.get(key, missing)
        if va != vb:
            rows.append((key, None if va is missing else va, None if vb is missing else vb))
    return rows


def check_resume(saved: Mapping[str, Any], new: Mapping[str, Any], allow: bool, ckpt_path: str) -> list[str]:
    """Refuse a resume whose training config differs (unless ``allow``); return the differences as lines."""
    rows = differences(saved, new)
    lines = [f"{k}: {va!r} -> {vb!r}" for k, va, vb in rows]
    if not rows:
        return []
    classes = [k for k, _, _ in rows if k in ("model.optimizer._target_", "model.scheduler._target_", "model._target_")]
    if classes:
        raise CheckpointError(
            f"Cannot resume {ckpt_path}: {', '.join(classes)} changed ({'; '.join(lines)}). The saved optimizer and "
            "scheduler state belong to the old classes; start a new run instead."
        )
    if not allow:
        raise CheckpointError(
            f"Refusing to resume {ckpt_path} with a different training config:\n  "
            + "\n  ".join(lines)
            + "\nResume with the run's own settings, or pass resume_overrides=allow to continue with the new values "
            "(they are then applied to the restored optimizer and recorded beside the original config)."
        )
    return lines


class ApplyOverrides(pl.Callback):
    """After a resume restored the optimizer and scheduler, set the new config's values on them."""

    def __init__(self, optimizer: Mapping[str, Any], scheduler: Mapping[str, Any] | None, saved_lr: float | None):
        self.optimizer = {k: v for k, v in optimizer.items() if k != "_target_"}
        self.scheduler = {k: v for k, v in (scheduler or {}).items() if k != "_target_"}
        self.saved_lr = saved_lr

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        new_lr = self.optimizer.get("lr")
        ratio = new_lr / self.saved_lr if new_lr is not None and self.saved_lr else 1.0
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                for key, value in self.optimizer.items():
                    if key == "lr":
                        group["lr"] = group["lr"] * ratio
                        if "initial_lr" in group:
                            group["initial_lr"] = value
                    elif key in group:
                        group[key] = tuple(value) if isinstance(group[key], tuple) else value
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            if hasattr(sched, "base_lrs"):
                sched.base_lrs = [b * ratio for b in sched.base_lrs]
            for key, value in self.scheduler.items():
                if hasattr(sched, key):
                    old = getattr(sched, key)
                    setattr(sched, key, collections.Counter(value) if isinstance(old, collections.Counter) else value)
        log.info(
            "Resumed with new values: optimizer %s, scheduler %s (lr now %s)",
            self.optimizer,
            self.scheduler or "unchanged",
            [g["lr"] for o in trainer.optimizers for g in o.param_groups],
        )


class RecordConfig(pl.Callback):
    """Writes the run's training config into every checkpoint (``checkpoint["cnnfeat_config"]``)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config
