"""Hydra callbacks: a summary of every job of a multirun, and one live process per run directory."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cnnfeat.atomic import atomic_write
from cnnfeat.errors import CnnfeatError, RunDirectoryBusy
from cnnfeat.lightning_api import rank_zero_only
from cnnfeat.report import write_sweep_report
from cnnfeat.status import EXIT_USER_ERROR, RunLock, json_safe, read_status, write_status

log = logging.getLogger("cnnfeat")

_COLUMNS = ("val/acc", "test/acc", "train/loss")


def summarize_sweep(sweep_dir: Path | str) -> list[dict[str, Any]]:
    """One row per job directory: job number, overrides, status (``missing`` if it never wrote one), metrics."""
    rows = []
    for job in sorted(
        (p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    ):
        overrides_file = job / ".hydra" / "overrides.yaml"
        status = read_status(job) or {"status": "missing"}
        overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
        rows.append({"job": int(job.name), "overrides": overrides, **status})
    return rows


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else str(value or "")


def write_summary(sweep_dir: Path | str) -> list[dict[str, Any]]:
    """``summary.json`` and ``summary.md`` in the sweep directory, from every job's ``status.json``."""
    sweep_dir = Path(sweep_dir)
    rows = summarize_sweep(sweep_dir)
    text = json.dumps(json_safe(rows), indent=2, allow_nan=False) + "\n"
    atomic_write(sweep_dir / "summary.json", lambda f: f.write(text.encode()))
    md = [
        "| job | overrides | status | " + " | ".join(_COLUMNS) + " | error |",
        "|---|---|---|" + "---:|" * len(_COLUMNS) + "---|",
    ]
    for r in rows:
        m = r.get("metrics") or {}
        cells = [_cell(m.get(c)) for c in _COLUMNS]
        error = str(r.get("error", "")).splitlines()[0][:120] if r.get("error") else ""
        md.append(f"| {r['job']} | {' '.join(r['overrides'])} | {r['status']} | " + " | ".join(cells) + f" | {error} |")
    atomic_write(sweep_dir / "summary.md", lambda f: f.write(("\n".join(md) + "\n").encode()))
    return rows


class MultirunSummary(Callback):
    """Writes ``summary.json`` and ``summary.md`` into the sweep directory after every job and at the end.

    Written after each job, so a sweep that stops early (a failing job makes Hydra raise at the end of its
    batch) still has its summary; a job that failed before it could write its own ``status.json`` is
    recorded as ``failed`` with Hydra's error.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED and read_status(job_dir) is None:
            try:
                job_return.return_value  # noqa: B018 -- raises the job's exception
            except Exception as err:
                write_status(job_dir, "failed", error=f"{type(err).__name__}: {err}")
        write_summary(job_dir.parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = write_summary(sweep_dir)
        if config.get("report", True):
            try:  # an index of the jobs' reports (each job wrote its own)
                write_sweep_report(sweep_dir, jobs_too=False)
            except (CnnfeatError, OSError) as e:
                log.warning("No multirun report: %s", e)
        counts = {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}
        log.info(
            "Multirun summary (%s): %s",
            ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
            sweep_dir / "summary.md",
        )


class RunDirectoryLock(Callback):
    """Locks an explicitly given ``hydra.run.dir`` before Hydra writes its config and log there.

    Without it, a second process pointed at a live run's directory would overwrite that run's recorded
    config before ``train`` could refuse it. Automatic directories carry the process ID and need no lock
    at this point (``train`` locks them too). DDP worker processes (rank > 0) share rank 0's directory.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        explicit = any(str(o).startswith("hydra.run.dir=") for o in config.hydra.overrides.hydra)
        if explicit and rank_zero_only.rank == 0:
            try:
                RunLock.acquire(config.hydra.run.dir)
            except RunDirectoryBusy as e:  # Hydra's logging is not set up yet: say it on stderr, exit 2
                sys.stderr.write(f"RunDirectoryBusy: {e}\n")
                raise SystemExit(EXIT_USER_ERROR) from None

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        RunLock.release_all()
