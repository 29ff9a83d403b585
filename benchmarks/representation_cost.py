"""What the representation callbacks (CKA, linear probes, unit history) add to the 15-epoch seed run.

Each run is its own process: ``experiment=seed`` as shipped (``callbacks=default``: the base), then the same with
``representations`` added (defaults: minibatch CKA over blocks of 250, conv maps pooled 4x4, probes every 4th
epoch) and with ``exact=true``, back to back, repeated; medians are reported. Added wall time = the variant's fit
time minus the base's of the same repeat; the time inside the callback comes from its own timers (every render
and the end-of-fit summary) and is the more precise number on a noisy machine. Memory: the callback's own peak
(resident memory sampled every 5 ms during each render and the summary, minus the resident memory when its first
render started, so what it keeps between epochs counts too) and the difference of whole-process peaks.

    python benchmarks/representation_cost.py                  # the real measurement (~25 min on 2 cores)
    python benchmarks/representation_cost.py --smoke          # 1 epoch of 30 batches: proves it runs
    python benchmarks/representation_cost.py --base none      # against callbacks=none instead
    python benchmarks/representation_cost.py --variant b500="callbacks.representations.block_size=500"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compose_config, machine, write_json, write_markdown

SMOKE = ["trainer.max_epochs=1", "trainer.limit_train_batches=30", "trainer.limit_val_batches=5"]
PARTS = ("pass", "cka", "probes", "units+images")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident bytes of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakSampler:
    """The largest resident memory while a block runs, sampled by a thread every 5 ms."""

    def __enter__(self) -> PeakSampler:
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def watch_memory(cb: object) -> list[dict[str, float]]:
    """Wrap the callback's ``render`` and ``summary``: resident MB when each started and its peak."""
    records: list[dict[str, float]] = []
    for name in ("render", "summary"):
        inner = getattr(cb, name)

        def wrapped(*args: object, _inner=inner, **kwargs: object) -> object:
            with PeakSampler() as s:
                out = _inner(*args, **kwargs)
            records.append({"start_mb": s.start / 2**20, "peak_mb": s.peak / 2**20})
            return out

        setattr(cb, name, wrapped)
    return records


def child(out: Path, overrides: list[str]) -> dict:
    """One fit in this process: wall time, peak RSS, the representation callback's own timers and memory."""
    from cnnfeat.callbacks.representations import RepresentationCallback
    from cnnfeat.run.train import build

    cfg = compose_config(["experiment=seed", "test=false", "callbacks.rich_progress_bar=null", *overrides], out)
    dm, model, trainer = build(cfg)
    cbs = [c for c in trainer.callbacks if isinstance(c, RepresentationCallback)]
    memory = [watch_memory(c) for c in cbs]
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit = time.perf_counter() - start
    own = max((max(r["peak_mb"] for r in recs) - recs[0]["start_mb"] for recs in memory if recs), default=0.0)
    return {
        "overrides": overrides,
        "fit_seconds": fit,
        "epochs": trainer.current_epoch,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "callback_peak_mb": own,
        "memory": memory,
        "signatures_in_memory_mb": sum(c.history.nbytes for c in cbs) / 2**20,
        "spilled_mb": sum(f.stat().st_size for f in out.glob("representations/*/*/*.pt")) / 2**20,
        "callback_seconds": [s for c in cbs for s in c.seconds] + [c.end_seconds for c in cbs if c.end_seconds],
        "timings": [t for c in cbs for t in c.timings],
        "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan"))),
    }


def run(overrides: list[str]) -> dict:
    """``child`` in a fresh process (its peak memory is its own)."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, __file__, "--child", d, "--", *overrides]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(overrides)} failed:\n{p.stderr[-3000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(runs: dict[str, list[dict]], variants: dict[str, list[str]], base: str, common: list[str]) -> list[str]:
    repeats = len(runs["base"])
    base_fit = med([x["fit_seconds"] for x in runs["base"]])
    base_rss = med([x["peak_rss_mb"] for x in runs["base"]])
    md = [
        f"Seed run (`experiment=seed`, {runs['base'][0]['epochs']} epoch(s)) with `callbacks={base}`: fit "
        f"{base_fit:.1f} s, peak RSS {base_rss:.0f} MB (median of {repeats}).",
        "",
        "| variant | added wall time (paired) | time inside the callback | per render | end of fit | "
        "callback's peak memory | process peak vs base | signatures on disk |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rs in runs.items():
        if name == "base":
            continue
        added = med([x["fit_seconds"] - b["fit_seconds"] for x, b in zip(rs, runs["base"], strict=True)])
        inside = med([sum(x["callback_seconds"]) for x in rs])
        per_render = med([s for x in rs for s in x["callback_seconds"][:-1]])
        end = med([x["callback_seconds"][-1] for x in rs if x["callback_seconds"]])
        md.append(
            f"| {name} (`{' '.join(variants[name][1:]) or 'defaults'}`) | {added:+.1f} s = "
            f"{100 * added / base_fit:+.1f}% | {inside:.1f} s = {100 * inside / base_fit:.1f}% | "
            f"{per_render:.2f} s | {end:.2f} s | {med([x['callback_peak_mb'] for x in rs]):.0f} MB | "
            f"{med([x['peak_rss_mb'] for x in rs]) - base_rss:+.0f} MB | {med([x['spilled_mb'] for x in rs]):.0f} MB |"
        )
    md += [
        "",
        "Median seconds per render by part (pass = forward, capture and CKA signatures; probes only where fitted):",
        "",
        "| variant | " + " | ".join(PARTS) + " |",
        "|---|" + "---:|" * len(PARTS),
    ]
    for name, rs in runs.items():
        ts = [t for x in rs for t in x["timings"]]
        if ts:
            cells = [med([t[k] for t in ts if k in t and (k != "probes" or t[k] > 0.001)]) for k in PARTS]
            md.append(f"| {name} | " + " | ".join(f"{c:.3f} s" for c in cells) + " |")
    m = machine()
    md.append(
        f"\n{m['machine']} CPU, {m['threads']} threads, torch {m['torch']}, Lightning {m['lightning']}; {repeats} "
        f"repeat(s); extra overrides: {' '.join(common) or 'none'}. Added wall time carries the machine's run-to-run "
        "noise; time inside the callback is measured around each render and the end-of-fit summary."
    )
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="1 epoch of 30 batches, 1 repeat: proves the script runs")
    p.add_argument("--base", default="default", help="callbacks group of the base run (default: as shipped)")
    p.add_argument("--no-exact", action="store_true", help="skip the exact=true variant")
    p.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDES (space-separated), with the callback")
    p.add_argument("--tag", default="")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="overrides for every run, e.g. trainer.max_epochs=3")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child), args.overrides)))
        return
    common = [*(SMOKE if args.smoke else []), *args.overrides]
    repeats = 1 if args.smoke else args.repeats
    with_callback = [f"callbacks=[{args.base},representations]"]
    variants = {"base": [f"callbacks={args.base}"], "default": with_callback}
    if not args.no_exact:
        variants["exact"] = [*with_callback, "callbacks.representations.exact=true"]
    for v in args.variant:
        name, _, ov = v.partition("=")
        variants[name] = [*with_callback, *ov.split()]
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(repeats):
        for name, ov in variants.items():  # back to back: each variant beside the base of the same repeat
            res = run([*ov, *common])
            runs[name].append(res)
            print(
                f"repeat {r} {name}: fit {res['fit_seconds']:.1f} s, inside {sum(res['callback_seconds']):.1f} s, "
                f"callback peak {res['callback_peak_mb']:.0f} MB",
                flush=True,
            )
    md = report(runs, variants, args.base, common)
    stem = "representation_cost" + (f"_{args.tag}" if args.tag else "") + ("_smoke" if args.smoke else "")
    write_markdown(stem, md, echo=False)
    write_json(stem, {"meta": machine(), "variants": variants, "runs": runs})
    print("\n".join(md))


if __name__ == "__main__":
    main()
