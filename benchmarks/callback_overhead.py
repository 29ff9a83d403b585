"""What the visualisation callbacks cost: the same ``experiment=seed`` run with and without them.

Each variant is a list of Hydra overrides; runs are interleaved (A, B, A, B, ...) to spread machine noise.
Reports fit wall time per variant, the overhead against ``none``, the seconds each callback spent, and
checks that the callbacks do not change training (identical per-epoch metrics for the same seed).

    python benchmarks/callback_overhead.py                      # none vs default
    python benchmarks/callback_overhead.py --variant viz="~callbacks.umap" --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_config, write_json, write_markdown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=OVERRIDES (space-separated), compared with 'none' (callbacks=none)",
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tag", default="")
    p.add_argument("overrides", nargs="*", help="overrides for every variant, e.g. trainer.max_epochs=3")
    args = p.parse_args()
    variants = {"none": ["callbacks=none"]}
    for v in args.variant or ["default=callbacks=default"]:
        name, _, ov = v.partition("=")
        variants[name] = ov.split()

    runs: dict[str, list] = {k: [] for k in variants}
    for r in range(args.repeats):
        for name, ov in variants.items():
            with tempfile.TemporaryDirectory() as d:
                res = run_config(["experiment=seed", *args.overrides, *ov], Path(d))
            runs[name].append(res)
            print(f"repeat {r} {name}: fit {res.fit_seconds:.1f} s, test {100 * res.test_acc:.2f}%", flush=True)

    base = statistics.median(x.fit_seconds for x in runs["none"])
    ref_epochs = runs["none"][0].epochs
    md = [
        "| callbacks | fit wall time | wall-time overhead | time inside callbacks | identical metrics |",
        "|---|---:|---:|---:|---|",
    ]
    for name, rs in runs.items():
        t = statistics.median(x.fit_seconds for x in rs)
        inside = statistics.median(
            sum(sum(v) for v in x.callback_seconds.values()) + sum(x.end_seconds.values()) for x in rs
        )
        same = all(x.epochs == ref_epochs for x in rs)
        md.append(
            f"| {name} ({' '.join(variants[name])}) | {t:.1f} s | {100 * (t / base - 1):+.1f}% | "
            f"{inside:.1f} s = {100 * inside / base:.1f}% of `none` | {'yes' if same else 'NO'} |"
        )
    md.append(
        "\nWall-time overhead compares whole fits and carries the machine's run-to-run noise (a few %); "
        "time inside callbacks is measured around each render and the end of fit (GIF, Projector, summaries) and is "
        "the more precise cost."
    )
    md += [
        "",
        "Seconds spent per callback (median over repeats; renders = untrained + scheduled epochs; end of fit apart):",
        "",
        "| variant | callback | renders | renders total | per render | end of fit |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, rs in runs.items():
        for cb in rs[0].callback_seconds:
            totals = [sum(x.callback_seconds[cb]) for x in rs]
            n = len(rs[0].callback_seconds[cb])
            end = statistics.median(x.end_seconds.get(cb, 0.0) for x in rs)
            md.append(
                f"| {name} | {cb} | {n} | {statistics.median(totals):.2f} s | "
                f"{statistics.median(totals) / max(n, 1):.3f} s | {end:.2f} s |"
            )
    for name, rs in runs.items():
        for cb in rs[0].path_seconds:
            path = statistics.median(x.path_seconds[cb] for x in rs)
            rest = statistics.median(sum(x.callback_seconds[cb]) - x.path_seconds[cb] for x in rs)
            md.append(
                f"\n{name}: {cb}'s renders without its path check (last epoch): {rest:.2f} s = "
                f"{100 * rest / base:.1f}% of `none`; the path check {path:.2f} s = {100 * path / base:.1f}%"
            )
    m = machine()
    md.append(
        f"\n{m['machine']} CPU, {m['threads']} threads, torch {m['torch']}, Lightning {m['lightning']}; "
        f"{args.repeats} repeat(s); extra overrides: {' '.join(args.overrides) or 'none'}"
    )
    stem = "callback_overhead" + (f"_{args.tag}" if args.tag else "")
    write_markdown(stem, md, echo=False)
    write_json(stem, {"meta": m, "variants": variants, "runs": runs})
    print("\n".join(md))


if __name__ == "__main__":
    main()
