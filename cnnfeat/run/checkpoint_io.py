"""Lightning checkpoint I/O that is atomic on every filesystem, never saves non-finite weights, loads safely.

Lightning's own ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in
``$TMPDIR``; when the run directory is on another filesystem the final "move" is a copy, so a kill in the
middle leaves a truncated ``last.ckpt`` (and a large orphan in ``$TMPDIR``). This plugin writes beside the
destination instead (:mod:`cnnfeat.run.atomic`), turns a failed write (e.g. a full disk) into a
:class:`~cnnfeat.errors.CheckpointWriteError` that leaves the previous file intact, refuses to save weights
that hold NaN or infinity (so neither ``last.ckpt`` nor the best checkpoint is ever a diverged network), and
loads with ``weights_only=True`` (nothing in a checkpoint file is executed).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import typing
from collections import defaultdict
from pathlib import Path
from typing import Any

import fsspec
import torch
from typing_extensions import override

from cnnfeat.errors import CheckpointWriteError, TrainingDiverged
from cnnfeat.run.atomic import atomic_write, is_disk_full
from cnnfeat.run.lightning_api import TorchCheckpointIO


def omegaconf_allowed() -> contextlib.AbstractContextManager:
    """``torch.load(weights_only=True)`` that also reads OmegaConf containers (plain data, no code runs): checkpoints
    written before the data configs converted their arguments hold ``data.augment`` as a ``DictConfig``."""
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    allowed = [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any, dict, list, defaultdict]
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5: such a checkpoint is refused, naming why
        return contextlib.nullcontext()
    return torch.serialization.safe_globals(allowed)


_LIGHTNING_TAKES_WEIGHTS_ONLY = "weights_only" in inspect.signature(TorchCheckpointIO.load_checkpoint).parameters


def nonfinite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors in a state dict that hold NaN or infinity."""
    return [
        k
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with same-directory atomic saves, a finite-weights check and safe loading."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            epoch, step = int(checkpoint.get("epoch", 0)) + 1, int(checkpoint.get("global_step", 0))
            raise TrainingDiverged(
                f"The weights hold NaN or infinite values ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
                f"at epoch {epoch}, step {step}, so {path.name} was not written; the previous checkpoints are "
                "kept. Try a smaller model.optimizer.lr or gradient clipping (trainer.gradient_clip_val=1.0).",
                epoch=epoch,
                step=step,
                loss=math.nan,
            )
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, f))
        except (OSError, RuntimeError) as e:
            why = "the disk is full" if is_disk_full(e) else f"{type(e).__name__}: {e}"
            raise CheckpointWriteError(
                f"Could not write the checkpoint {path} ({why}); the previous checkpoint there is intact. "
                "Free space or point hydra.run.dir at another disk, then resume with resume=true."
            ) from e

    @override
    def load_checkpoint(
        self, path: Any, map_location: Any | None = lambda storage, loc: storage, weights_only: bool | None = True
    ) -> dict[str, Any]:
        """Load with ``weights_only=True`` unless the caller explicitly asks otherwise."""
        weights_only = True if weights_only is None else weights_only
        with omegaconf_allowed():
            if _LIGHTNING_TAKES_WEIGHTS_ONLY:
                return super().load_checkpoint(path, map_location, weights_only=weights_only)
            # Lightning < 2.6 takes no weights_only here and loads with weights_only=False: open the file ourselves
            with fsspec.open(path, "rb") as f:
                return torch.load(f, map_location=map_location, weights_only=weights_only)
