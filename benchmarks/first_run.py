"""What the first UMAP costs in a new environment, and what cnnfeat's lazy pynndescent import saves.

umap-learn's compiled (numba) functions are cached on disk after their first compilation; a new environment
has no cache. Each measurement is a fresh process timing ``import cnnfeat.embedding`` + its first ``fit_umap``
on 2,000 x 100 points (the UMAP callback's probe), in four settings: a cold numba cache (an empty
``NUMBA_CACHE_DIR``: what a new environment pays) and a warm one, each with cnnfeat's pynndescent stand-ins
and without them (``CNNFEAT_LAZY_PYNNDESCENT=0``, i.e. before this change). ``--fresh-venv`` also measures
once in a brand-new virtual environment (torch from this machine's disk, cnnfeat and its dependencies from
the index), which additionally pays Python's bytecode compilation.

    python benchmarks/first_run.py --repeats 3 [--fresh-venv]
Results: benchmarks/results/first_run.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SNIPPET = """
import time
t0 = time.perf_counter()
import numpy as np
from cnnfeat.embedding import fit_umap
x = np.random.RandomState(0).randn(2000, 100).astype("float32")
t1 = time.perf_counter()
fit_umap(x, random_state=0)
t2 = time.perf_counter()
fit_umap(x, random_state=0)
t3 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f} {t3 - t2:.2f}")
"""


def measure(python: str, cache_dir: Path, lazy: bool) -> dict[str, float]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "CNNFEAT_LAZY_PYNNDESCENT": "1" if lazy else "0"}
    start = time.perf_counter()
    r = subprocess.run([python, "-c", SNIPPET], env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    imports, first, second = (float(v) for v in r.stdout.split())
    return {"process_s": round(wall, 2), "import_s": imports, "first_fit_s": first, "second_fit_s": second}


def fresh_venv(tmp: Path) -> dict[str, float]:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.14.1", "torchvision==0.29.1"], check=True)
    subprocess.run([*pip, str(REPO)], check=True)
    return measure(str(venv / "bin" / "python"), tmp / "numba-cache-fresh", lazy=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fresh-venv", action="store_true")
    a = p.parse_args()
    rows: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for rep in range(a.repeats):
            for lazy in (True, False):  # back to back: cold then warm, each setting with its own cache
                cache = tmp / f"cache-{lazy}-{rep}"
                rows.setdefault(f"cold, lazy={lazy}", []).append(measure(sys.executable, cache, lazy))
                rows.setdefault(f"warm, lazy={lazy}", []).append(measure(sys.executable, cache, lazy))
            print(rep, {k: v[-1]["process_s"] for k, v in rows.items()}, flush=True)
        out: dict[str, object] = {
            "median": {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()},
            "runs": rows,
        }
        if a.fresh_venv:
            out["fresh_venv"] = fresh_venv(tmp)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "first_run.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [
        "# The first UMAP in a new environment",
        "",
        "| numba cache | pynndescent | whole process | imports | first fit | second fit |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for k, m in out["median"].items():
        cache, lazy = k.split(", ")
        md.append(
            f"| {cache} | {'on first use (cnnfeat)' if lazy == 'lazy=True' else 'imported with umap'} | "
            f"{m['process_s']:.1f} s | {m['import_s']:.1f} s | {m['first_fit_s']:.1f} s | {m['second_fit_s']:.1f} s |"
        )
    md += ["", f"Medians of {a.repeats} repeats, each a fresh process."]
    if "fresh_venv" in out:
        f = out["fresh_venv"]
        md.append(
            f"A brand-new virtual environment: {f['process_s']:.1f} s for the process ({f['import_s']:.1f} s "
            f"imports, {f['first_fit_s']:.1f} s first fit)."
        )
    (RESULTS / "first_run.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
