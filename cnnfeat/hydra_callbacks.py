"""Hydra callbacks: a summary of every job of a multirun (status and final metrics)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("cnnfeat")

_COLUMNS = ("val/acc", "test/acc", "train/loss")


def summarize_sweep(sweep_dir: Path | str) -> list[dict[str, Any]]:
    """One row per job directory: job number, overrides, status (``missing`` if it never wrote one), metrics."""
    rows = []
    for job in sorted(
        (p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    ):
        status_file, overrides_file = job / "status.json", job / ".hydra" / "overrides.yaml"
        status = json.loads(status_file.read_text()) if status_file.is_file() else {"status": "missing"}
        overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
        rows.append({"job": int(job.name), "overrides": overrides, **status})
    return rows


class MultirunSummary(Callback):
    """Writes ``summary.json`` and ``summary.md`` into the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = summarize_sweep(sweep_dir)
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2, default=str))
        md = ["| job | overrides | status | " + " | ".join(_COLUMNS) + " |", "|---|---|---|" + "---:|" * len(_COLUMNS)]
        for r in rows:
            m = r.get("metrics", {})
            cells = [f"{m[c]:.4f}" if c in m else "" for c in _COLUMNS]
            md.append(f"| {r['job']} | {' '.join(r['overrides'])} | {r['status']} | " + " | ".join(cells) + " |")
        (sweep_dir / "summary.md").write_text("\n".join(md) + "\n")
        counts = {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}
        log.info(
            "Multirun summary (%s): %s",
            ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
            sweep_dir / "summary.md",
        )
