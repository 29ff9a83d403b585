"""Hydra callbacks: a summary of every job of a multirun, and one live process per run directory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cnnfeat.errors import CnnfeatError, RunDirectoryBusy
from cnnfeat.report import write_sweep_report
from cnnfeat.run.atomic import atomic_write, is_disk_full, json_safe
from cnnfeat.run.lightning_api import rank_zero_only
from cnnfeat.run.status import EXIT_USER_ERROR, RunLock, read_status, write_status

log = logging.getLogger("cnnfeat")

_COLUMNS = ("val/acc", "test/acc", "train/loss")


def summarize_sweep(sweep_dir: Path | str) -> list[dict[str, Any]]:
    """One row per job directory: job number, overrides, status (``missing`` if it never wrote one), metrics."""
    rows = []
    jobs = (p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.is_symlink() and p.name.isdigit())
    for job in sorted(jobs, key=lambda p: int(p.name)):  # a linked job folder is not this sweep's: not read
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


#: room a run directory must have before Hydra records its config there (config, hydra.yaml, overrides, log start)
RECORD_ROOM = 64 * 1024


def claim(directory: str | Path, what: str) -> None:
    """Lock ``directory`` for this process and check it has room for Hydra's record, before anything is written.

    A live process already holding it, or a directory that cannot be written (a full disk, no permission),
    ends the program here with one line on stderr and exit code 2: Hydra's logging is not set up yet, and
    Hydra would otherwise write its record into a live run's folder or fail with a traceback.
    """
    try:
        RunLock.acquire(directory)
        probe = Path(directory).resolve() / f".room-{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(bytes(RECORD_ROOM))
                f.flush()
                os.fsync(f.fileno())
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    except RunDirectoryBusy as e:
        sys.stderr.write(f"RunDirectoryBusy: {e}\n")
        raise SystemExit(EXIT_USER_ERROR) from None
    except OSError as e:
        why = "the disk is full" if is_disk_full(e) else f"{e.strerror or e}"
        sys.stderr.write(
            f"Cannot write the {what} {directory} ({why}); nothing was run. Free space, or choose another directory "
            f"({'hydra.sweep.dir' if what == 'sweep directory' else 'hydra.run.dir'}=... or paths.log_dir=...).\n"
        )
        raise SystemExit(EXIT_USER_ERROR) from None


class RunDirectoryLock(Callback):
    """Locks the run directory (or a multirun's sweep directory) before Hydra writes its config and log there.

    Without it, a second process pointed at a live run's or sweep's directory would overwrite that run's
    recorded config (``.hydra/config.yaml``, ``overrides.yaml``, ``hydra.yaml``) before it could be refused,
    and a full disk would end in Hydra's traceback. Each job of a multirun is then locked by ``train`` itself.
    DDP worker processes (rank > 0) share rank 0's directory.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank == 0:
            claim(config.hydra.run.dir, "run directory")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        RunLock.release_all()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank == 0:
            claim(config.hydra.sweep.dir, "sweep directory")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        RunLock.release_all()
