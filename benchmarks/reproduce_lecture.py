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
from common import RESULTS, machine, run_config, write_json

# The lecture's printed log: (train accuracy %, train avgLoss, valid accuracy %) per epoch.
LECTURE = [
    (51.77, 1.2684, 79.38),
    (83.00, 0.4497, 83.78),
    (87.29, 0.3438, 86.31),
    (88.06, 0.3190, 87.02),
    (88.74, 0.3009, 87.21),
    (89.88, 0.2700, 88.87),
    (90.16, 0.2609, 88.85),
    (90.49, 0.2507, 89.60),
    (91.26, 0.2361, 89.53),
    (91.39, 0.2317, 89.70),
    (91.48, 0.2283, 89.59),
    (91.86, 0.2188, 90.00),
    (91.97, 0.2167, 90.13),
    (92.05, 0.2143, 90.28),
    (92.17, 0.2093, 90.39),
]


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
        lt, ll, lv = LECTURE[i] if i < len(LECTURE) else (float("nan"),) * 3
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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reproduce_lecture.md").write_text("\n".join(md) + "\n")
    write_json("reproduce_lecture", {"meta": m, "seeds": args.seeds, "runs": runs})
    print("\n".join(md))


if __name__ == "__main__":
    main()
