"""Reproduce the lecture's 15-epoch table with ``experiment=seed`` for several seeds.

Writes benchmarks/results/reproduce_lecture.{json,md}: the per-epoch table of the first seed beside the
lecture's numbers, and the final accuracies of every seed (the seed-to-seed spread).

    python benchmarks/reproduce_lecture.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_config, write_json, write_markdown

from cnnfeat.lecture import LECTURE_LOG


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer.accelerator=gpu")
    args = p.parse_args()

    runs = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as d:
            r = run_config(["experiment=seed", "callbacks=none", f"seed={seed}", *args.overrides], Path(d))
        runs[seed] = r
        print(
            f"seed {seed}: final train {100 * r.epochs[-1]['train/acc']:.2f}% test "
            f"{100 * r.epochs[-1]['val/acc']:.2f}% ({r.fit_seconds:.0f} s)",
            flush=True,
        )

    first = runs[args.seeds[0]]
    md = [
        f"Per epoch, seed {args.seeds[0]} (`cnnfeat-train experiment=seed`), beside the lecture:",
        "",
        "| epoch | train acc | lecture | train avgLoss | lecture | valid (=test) acc | lecture |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, e in enumerate(first.epochs):
        lt, ll, lv = LECTURE_LOG[i] if i < len(LECTURE_LOG) else (float("nan"),) * 3
        md.append(
            f"| {i + 1} | {100 * e['train/acc']:.2f}% | {lt:.2f}% | {e['train/loss']:.4f} | {ll:.4f} | "
            f"{100 * e['val/acc']:.2f}% | {lv:.2f}% |"
        )
    finals = [100 * r.epochs[-1]["val/acc"] for r in runs.values()]
    trains = [100 * r.epochs[-1]["train/acc"] for r in runs.values()]
    md += [
        "",
        "Final epoch over seeds:",
        "",
        "| seed | train acc | test acc | fit time |",
        "|---:|---:|---:|---:|",
    ]
    for seed, r in runs.items():
        md.append(
            f"| {seed} | {100 * r.epochs[-1]['train/acc']:.2f}% | {100 * r.epochs[-1]['val/acc']:.2f}% | "
            f"{r.fit_seconds:.0f} s |"
        )
    spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
    md.append(f"| mean ± sd | {statistics.mean(trains):.2f}% | {statistics.mean(finals):.2f}% ± {spread:.2f} | |")
    m = machine()
    md.append(
        f"\n{m['machine']} CPU, {m['threads']} threads, torch {m['torch']}, Lightning {m['lightning']}"
        + (f", {' '.join(args.overrides)}" if args.overrides else "")
    )
    write_markdown("reproduce_lecture", md, echo=False)
    write_json("reproduce_lecture", {"meta": m, "seeds": args.seeds, "runs": runs})
    print("\n".join(md))


if __name__ == "__main__":
    main()
