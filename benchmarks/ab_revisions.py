"""Two revisions of cnnfeat back to back: the same ``experiment=seed`` fit with the same callbacks, old and new in turn.

Each run is a fresh process that imports cnnfeat from one git worktree (``--old`` and ``--new`` are checkouts, e.g.
``git worktree add /tmp/old <sha>``), fits, tests and prints the fit time and each callback's seconds; the runs
alternate old, new, old, new for every variant and repeat, so machine drift falls on both. The summary is a table
of medians per callback (renders and end of fit) and the share of the ``none`` fit quoted from
``--none-seconds`` (measured by ``callback_overhead.py`` on the same machine), plus whether the per-epoch training
metrics of old and new are identical.

    git worktree add /tmp/old ff9cbfd && git worktree add /tmp/new HEAD
    python benchmarks/ab_revisions.py --old /tmp/old --new /tmp/new --repeats 2 --tag issue22_session
    python benchmarks/ab_revisions.py --summarise benchmarks/results/ab_issue22_session.jsonl   # table only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "default": "callbacks=default",
    "seed": "callbacks=[default,representations,atlas,attribution,importance,relevance]",
}


def one(tree: str, variant: str) -> dict:
    """Fit ``variant`` with the cnnfeat of ``tree`` (this process must not have imported cnnfeat yet)."""
    sys.path.insert(0, tree)
    sys.path.insert(0, str(Path(tree) / "benchmarks"))
    from common import run_config

    import cnnfeat

    if not cnnfeat.__file__.startswith(tree):
        raise SystemExit(f"imported {cnnfeat.__file__}, not the tree {tree}")
    with tempfile.TemporaryDirectory() as d:
        r = run_config(["experiment=seed", VARIANTS[variant]], Path(d))
    renders = {k: sum(v) for k, v in r.callback_seconds.items()}
    return {
        "tree": tree,
        "variant": variant,
        "fit": r.fit_seconds,
        "test": r.test_acc,
        "renders": renders,
        "end": r.end_seconds,
        "path": r.path_seconds,
        "epochs": r.epochs,
    }


def summarise(rows: list[dict], old: str, new: str, none_seconds: float | None) -> list[str]:
    out = []
    for variant in VARIANTS:
        got = {t: [r for r in rows if r["variant"] == variant and r["tree"] == t] for t in (old, new)}
        if not got[old] or not got[new]:
            continue
        same = all(r["epochs"] == got[old][0]["epochs"] for t in (old, new) for r in got[t])
        out += [f"## `{variant}` ({len(got[old])} old / {len(got[new])} new runs, alternating; medians)", ""]
        out += [
            "| callback | old renders | new renders | old end of fit | new end of fit |",
            "|---|---:|---:|---:|---:|",
        ]
        names = sorted({n for r in got[old] + got[new] for n in r["renders"]})
        total = {}
        for t in (old, new):
            total[t] = statistics.median(sum(r["renders"].values()) + sum(r["end"].values()) for r in got[t])
        for n in names:
            cells = [
                statistics.median(r[k].get(n, 0.0) for r in got[t]) for k in ("renders", "end") for t in (old, new)
            ]
            out.append(f"| {n} | {cells[0]:.2f} s | {cells[1]:.2f} s | {cells[2]:.2f} s | {cells[3]:.2f} s |")
        fits = {t: statistics.median(r["fit"] for r in got[t]) for t in (old, new)}
        out += [""]
        share = ""
        if none_seconds:
            old_share, new_share = 100 * total[old] / none_seconds, 100 * total[new] / none_seconds
            share = f" = {old_share:.1f}% -> {new_share:.1f}% of a {none_seconds:.1f} s `none` fit"
        out.append(
            f"Inside the callbacks: {total[old]:.1f} s old, {total[new]:.1f} s new{share}. "
            f"Fit: {fits[old]:.1f} s old, {fits[new]:.1f} s new. Identical training metrics: {'yes' if same else 'NO'}."
        )
        out.append("")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old")
    p.add_argument("--new")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default="seed,default")
    p.add_argument("--none-seconds", type=float, default=None, help="the callbacks=none fit, for shares")
    p.add_argument("--tag", default="ab")
    p.add_argument("--one", nargs=2, metavar=("TREE", "VARIANT"), help=argparse.SUPPRESS)
    p.add_argument("--summarise", type=Path, help="a JSONL file of earlier runs: write the table only")
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(*args.one)))
        return
    if args.summarise:
        rows = [json.loads(line) for line in args.summarise.read_text().splitlines() if line.strip()]
        trees = list(dict.fromkeys(r["tree"] for r in rows))
        old, new = args.old or trees[0], args.new or trees[1]
        print("\n".join(summarise(rows, old, new, args.none_seconds)))
        return
    RESULTS.mkdir(exist_ok=True)
    jsonl = RESULTS / f"ab_{args.tag}.jsonl"
    rows: list[dict] = []
    for rep in range(args.repeats):
        for variant in args.variants.split(","):
            for tree in (args.old, args.new):
                r = subprocess.run(
                    [sys.executable, __file__, "--one", tree, variant],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
                line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{tree} {variant} failed:\n{r.stderr[-3000:]}")
                rows.append(json.loads(line[len("RESULT ") :]))
                with jsonl.open("a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
                print(f"repeat {rep} {variant} {tree}: fit {rows[-1]['fit']:.1f} s", flush=True)
    md = [
        f"# `{args.old}` against `{args.new}`, back to back",
        "",
        *summarise(rows, args.old, args.new, args.none_seconds),
    ]
    (RESULTS / f"ab_{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
