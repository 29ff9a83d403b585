"""Stop a run whose loss has become NaN or infinite, at once and with a message instead of a stack trace."""

from __future__ import annotations

import math
from typing import Any

import torch
from typing_extensions import override

from cnnfeat.errors import TrainingDiverged, check_int
from cnnfeat.run import lightning_api as pl


class DivergenceGuard(pl.Callback):
    """Checks the training loss every ``check_every_n_steps`` steps; a non-finite loss stops the fit at once.

    It raises :class:`~cnnfeat.errors.TrainingDiverged` (holding epoch, step and loss) in the step where the
    loss stopped being finite, so no checkpoint of the diverged weights is written at the end of that epoch;
    ``diverged`` keeps the same details. The entry point marks the run ``diverged`` in ``status.json``,
    keeps its logs and earlier checkpoints, skips testing and exits with code 3; the other jobs of a multirun
    go on. On a GPU a check forces a device sync, so check every few steps there. A dying-ReLU network stuck
    at a finite loss (ln 10 = 2.30) is not divergence and trains to the end.
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        check_int("check_every_n_steps", check_every_n_steps)
        self.check_every_n_steps = check_every_n_steps
        self.diverged: dict[str, Any] | None = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.diverged is not None or trainer.global_step % self.check_every_n_steps:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or bool(torch.isfinite(loss).all()):
            return
        value = float(loss.detach().float().mean())
        self.diverged = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step, "loss": value}
        raise TrainingDiverged(
            f"Training diverged: the loss is {'NaN' if math.isnan(value) else value} at epoch "
            f"{self.diverged['epoch']}, step {self.diverged['step']}. Stopping this run; its logs and the checkpoints "
            f"of earlier epochs are kept. Try a smaller model.optimizer.lr (now {_lr(trainer)}) or gradient "
            "clipping (trainer.gradient_clip_val=1.0).",
            **self.diverged,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"diverged": self.diverged}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diverged = state_dict.get("diverged")


def _lr(trainer: pl.Trainer) -> float | str:
    try:
        return trainer.optimizers[0].param_groups[0]["lr"]
    except (IndexError, KeyError, AttributeError):
        return "?"
