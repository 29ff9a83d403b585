"""Progress as log lines (rate and ETA) when no terminal shows a progress bar: nohup, SLURM, pipes, CI."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from typing_extensions import override

from cnnfeat.callbacks.base import check_bool, check_number
from cnnfeat.errors import check_int
from cnnfeat.run import lightning_api as pl
from cnnfeat.run.progress import format_eta

log = logging.getLogger("cnnfeat")


class ProgressLog(pl.Callback):
    """Logs ``epoch E/N: batch B/M (P%), R img/s, ETA T`` to the ``cnnfeat`` logger (console and ``train.log``).

    A line is written every ``every_s`` seconds, or every ``every_n_steps`` training batches when that is
    set, during training. By default only when standard output is not a terminal (where the Rich bar is
    invisible, e.g. under ``nohup``, SLURM or a pipe); ``always=true`` writes them on a terminal too.
    """

    def __init__(self, every_s: float = 30.0, every_n_steps: int | None = None, always: bool = False) -> None:
        check_number("every_s", every_s, 0, above=True)
        check_int("every_n_steps", every_n_steps, allow_none=True)
        check_bool("always", always)
        self.every_s, self.every_n_steps, self.always = every_s, every_n_steps, always
        self._last = 0.0
        self._epoch_start = 0.0
        self._images = 0

    def _active(self, trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero and (self.always or not sys.stdout.isatty())

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last = time.perf_counter()
        self._images = 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active(trainer):
            return
        x = batch[0] if isinstance(batch, list | tuple) and batch else None
        self._images += len(x) if hasattr(x, "__len__") else 1
        now, done = time.perf_counter(), batch_idx + 1
        due = done % self.every_n_steps == 0 if self.every_n_steps else now - self._last >= self.every_s
        if not due:
            return
        self._last = now
        total = trainer.num_training_batches
        elapsed = max(now - self._epoch_start, 1e-9)
        finite = isinstance(total, int) and total > 0
        eta = (total - done) * elapsed / done if finite else float("nan")
        log.info(
            "epoch %d/%s: batch %d/%s%s, %.0f img/s, epoch ETA %s",
            trainer.current_epoch + 1,
            trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?",
            done,
            total if finite else "?",
            f" ({100 * done / total:.0f}%)" if finite else "",
            self._images / elapsed,
            format_eta(eta),
        )
