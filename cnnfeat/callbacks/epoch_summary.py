"""One console line per epoch in the lecture's style."""

from __future__ import annotations

import logging

from typing_extensions import override

from cnnfeat.run import lightning_api as pl

log = logging.getLogger("cnnfeat")


def _pct(metrics: dict, key: str) -> str:
    return f"{100 * float(metrics[key]):.2f}%" if key in metrics else "n/a"


def _num(metrics: dict, key: str) -> str:
    return f"{float(metrics[key]):.4f}" if key in metrics else "n/a"


class EpochSummary(pl.Callback):
    """Logs ``>>> End epoch N, train accuracy = .., train avgLoss = ..`` and the validation line.

    Reads ``train/acc``, ``train/loss``, ``val/acc`` and ``val/loss`` from ``trainer.callback_metrics``
    (epoch averages), so it works for any module that logs those names. Output goes to the ``cnnfeat``
    logger, which the training entry point shows on the console and in the run's log file.
    """

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = trainer.callback_metrics  # on every rank: under DDP reading them is a collective (synced metrics)
        if not trainer.is_global_zero:
            return
        log.info(
            ">>> End epoch %d, train accuracy = %s, train avgLoss = %s",
            trainer.current_epoch + 1,
            _pct(m, "train/acc"),
            _num(m, "train/loss"),
        )
        if "val/acc" in m:
            log.info(">>> valid accuracy = %s, valid avgLoss = %s", _pct(m, "val/acc"), _num(m, "val/loss"))
