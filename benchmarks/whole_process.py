"""Whole-process wall time of ``cnnfeat-train experiment=seed callbacks=none`` against a plain PyTorch script.

Both do the same work (benchmarks/plain_train.py: same data, network, optimizer, schedule, batch 128, the test
set evaluated every epoch and at the end). Each measurement is a fresh process timed from outside, start-up
included; the variants of one repeat run back to back (plain, cnnfeat, plain channels_last) and the median over
repeats is reported, because whole runs on these machines vary by about +-12%. Also measured: the import cost
(torch, torch + Lightning, ``cnnfeat.run.train``), cnnfeat's time from process start to the first training batch
and per epoch (from its log's timestamps), and a cProfile of a 2-epoch run (top functions by own time).

    python benchmarks/whole_process.py --epochs 2 15 --repeats 3
Results: benchmarks/results/whole_process.{json,md}.
"""

from __future__ import annotations

import argparse
import cProfile  # noqa: F401 -- documents that the profile below is cProfile's
import json
import os
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = Path(os.environ.get("CNNFEAT_DATA") or REPO.parent / "shared" / "data")
RAW = DATA / "FashionMNIST" / "raw"


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    if r.returncode:
        raise RuntimeError(f"{cmd} failed:\n{r.stderr[-3000:]}")
    return wall, r.stdout + r.stderr


def cnnfeat_cmd(epochs: int, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        *extra,
        "-m",
        "cnnfeat.run.train",
        "experiment=seed",
        "callbacks=none",
        "trainer=cpu",
        f"trainer.max_epochs={epochs}",
        f"hydra.run.dir={run_dir}",
        f"data.data_dir={DATA}",
    ]


def plain_cmd(epochs: int, channels_last: bool = False) -> list[str]:
    cmd = [sys.executable, str(REPO / "benchmarks" / "plain_train.py"), "--data", str(RAW), "--epochs", str(epochs)]
    return [*cmd, "--channels-last"] if channels_last else cmd


def log_times(train_log: Path, started: float) -> dict[str, object]:
    """From cnnfeat's train.log timestamps: seconds from process start to fit, and each epoch's duration."""
    stamps = []
    for line in train_log.read_text().splitlines():
        m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            stamps.append((t, line))
    fit_start = next(t for t, line in stamps if "Output directory" in line)
    epoch_ends = [t for t, line in stamps if ">>> End epoch" in line]
    test = next((t for t, line in stamps if "Test accuracy" in line), None)
    return {
        "start_to_fit_s": round(fit_start - started, 2),
        "epoch_s": [round(b - a, 2) for a, b in zip([fit_start, *epoch_ends[:-1]], epoch_ends, strict=True)],
        "last_epoch_to_test_done_s": round(test - epoch_ends[-1], 2) if test and epoch_ends else None,
    }


def import_costs(repeats: int) -> dict[str, float]:
    stmts = {
        "python": "pass",
        "torch": "import torch",
        "torch + pytorch_lightning": "import torch, pytorch_lightning",
        "cnnfeat.run.train": "import cnnfeat.run.train",
    }
    return {
        k: round(statistics.median(timed([sys.executable, "-c", s], REPO)[0] for _ in range(repeats)), 2)
        for k, s in stmts.items()
    }


def profile(epochs: int, tmp: Path, top: int = 25) -> list[str]:
    prof = tmp / "profile.out"
    timed(cnnfeat_cmd(epochs, tmp / "profiled", ("-m", "cProfile", "-o", str(prof))), REPO)
    stats = pstats.Stats(str(prof))
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # by own (total) time
    return [
        f"{tt:7.2f} s own {ct:7.2f} s cum {nc:>8} calls  {Path(f).name}:{line}({fn})"
        for (f, line, fn), (_, nc, tt, ct, _) in rows
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, nargs="+", default=[2, 15])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-profile", action="store_true")
    a = p.parse_args()
    out: dict[str, object] = {"imports_s": import_costs(a.repeats), "runs": {}}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for epochs in a.epochs:
            rows: dict[str, list[float]] = {"plain": [], "cnnfeat": [], "plain_channels_last": []}
            details = []
            for rep in range(a.repeats):
                rows["plain"].append(timed(plain_cmd(epochs), REPO)[0])
                run_dir = tmp / f"cnnfeat-{epochs}-{rep}"
                started = time.time()
                wall, _ = timed(cnnfeat_cmd(epochs, run_dir), REPO)
                rows["cnnfeat"].append(wall)
                details.append(log_times(run_dir / "train.log", started))
                rows["plain_channels_last"].append(timed(plain_cmd(epochs, True), REPO)[0])
                print(epochs, rep, {k: round(v[-1], 1) for k, v in rows.items()}, flush=True)
            med = {k: statistics.median(v) for k, v in rows.items()}
            out["runs"][str(epochs)] = {
                "wall_s": rows,
                "median_s": {k: round(v, 2) for k, v in med.items()},
                "speed_vs_plain": round(med["plain"] / med["cnnfeat"], 3),
                "speed_vs_plain_channels_last": round(med["plain_channels_last"] / med["cnnfeat"], 3),
                "cnnfeat_timeline": details,
            }
        if not a.no_profile:
            out["profile_2_epochs_top_own_time"] = profile(2, tmp)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "whole_process.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [
        "# Whole-process wall time: cnnfeat-train vs a plain PyTorch script",
        "",
        "| epochs | plain | cnnfeat | plain, channels_last | speed vs plain | vs plain channels_last |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for e, r in out["runs"].items():
        m = r["median_s"]
        md.append(
            f"| {e} | {m['plain']} s | {m['cnnfeat']} s | {m['plain_channels_last']} s | "
            f"{r['speed_vs_plain']}x | {r['speed_vs_plain_channels_last']}x |"
        )
    md += ["", f"Medians of {a.repeats} back-to-back repeats. Import costs (median): {out['imports_s']}", ""]
    if "profile_2_epochs_top_own_time" in out:
        md += [
            "Profile of a 2-epoch cnnfeat run, top functions by own time:",
            "```",
            *out["profile_2_epochs_top_own_time"],
            "```",
        ]
    (RESULTS / "whole_process.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
