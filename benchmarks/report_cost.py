"""What the run atlas and its HTML report cost, measured on a real `experiment=seed` run.

    python benchmarks/report_cost.py                       # train experiment=seed with the atlas (a temp dir), measure
    python benchmarks/report_cost.py --run DIR             # measure a finished run that had the atlas callback
    python benchmarks/report_cost.py --run DIR --screenshots   # also docs/report_overview.png and docs/report_unit.png

Measures (results in benchmarks/results/<name>.{json,md}):
- the report: ``write_report`` in-process (median of ``--repeats``) and ``python -m cnnfeat.report`` as a fresh process
  (interpreter start and imports included), its size on disk and file count; limits 20 s and 25 MB;
- the AtlasCallback during training: seconds per recorded step (the manifest's own timings) beside the epoch's
  training time (from the run's console log), the end-of-fit patches/classes and the feature visualisation;
- feature visualisation per SmallCNN conv channel (limit 2 s) and the share of conv channels whose optimised input
  reaches their best real patch (fidelity >= 1; the issue asks for >= 90%), with the flagged ones listed.
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from common import RESULTS, machine, write_json

from cnnfeat.atlas import Atlas
from cnnfeat.report import REPORT_DIR, write_report

REPO = Path(__file__).resolve().parents[1]
LIMITS = {"report_seconds": 20.0, "report_mb": 25.0, "featviz_seconds_per_channel": 2.0, "fidelity_share": 0.9}


def train(run_dir: Path, callbacks: str, extra: list[str]) -> float:
    """``cnnfeat-train experiment=seed`` with the atlas into ``run_dir``; returns its wall time."""
    cmd = [sys.executable, "-m", "cnnfeat.run.train", "experiment=seed", f"callbacks={callbacks}"]
    cmd += [f"hydra.run.dir={run_dir}", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.perf_counter() - start


def folder_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def epoch_seconds(run_dir: Path) -> list[float]:
    """Seconds between consecutive ">>> End epoch" lines of the run's console log (the first epoch from fit start
    is unknown and skipped)."""
    log = run_dir / "train.log"
    if not log.is_file():
        log = next(iter(run_dir.glob("*.log")), log)
    if not log.is_file():
        return []
    stamps = [
        datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
        for line in log.read_text().splitlines()
        if (m := re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\].*>>> End epoch", line))
    ]
    return [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]


def measure(run_dir: Path, repeats: int) -> dict:
    a = Atlas.load(run_dir)
    if a is None:
        raise SystemExit(f"{run_dir} has no atlas: train with callbacks=[default,atlas]")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        write_report(run_dir)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cnnfeat.report", str(run_dir)], check=True, capture_output=True)
    process_seconds = time.perf_counter() - start
    report_bytes, report_files = folder_size(run_dir / REPORT_DIR)
    atlas_bytes, atlas_files = folder_size(run_dir / "atlas")

    seconds = a.manifest.get("seconds", {})
    steps = {int(k.split("_")[1]): v for k, v in seconds.items() if k.startswith("step_")}
    patch_steps = set(a.patch_steps(a.layers[0]))
    plain = [v for s, v in steps.items() if s not in patch_steps]
    with_patches = [v for s, v in steps.items() if s in patch_steps]
    epochs = epoch_seconds(run_dir)

    per_channel, shares, flagged, never_fire = {}, [], [], []
    for info in a.layers:
        fv = a.featviz(info)
        if fv is None:
            continue
        per_unit = float(fv["seconds"]) / max(1, len(fv["units"]))
        per_channel[info.name] = per_unit
        if info.kind == "conv":
            shares.extend((~fv["flagged"]).tolist())
            for u, fid, ref in zip(fv["units"], fv["fidelity"], fv["reference"], strict=True):
                if not fid >= 1.0:
                    flagged.append(
                        {"layer": info.name, "unit": int(u), "fidelity": float(fid), "best_real": float(ref)}
                    )
                    if not ref > 0:
                        never_fire.append(f"{info.name} c{int(u)}")
    conv_rates = [v for k, v in per_channel.items() if next(i for i in a.layers if i.name == k).kind == "conv"]
    return {
        "run_dir": str(run_dir),
        "report_seconds": statistics.median(times),
        "report_seconds_all": times,
        "report_process_seconds": process_seconds,
        "report_mb": report_bytes / 2**20,
        "report_files": report_files,
        "atlas_mb": atlas_bytes / 2**20,
        "atlas_files": atlas_files,
        "atlas_step_seconds": {"plain": plain, "with_patches": with_patches},
        "atlas_final_patches_classes_seconds": seconds.get("final_patches_classes"),
        "featviz_seconds": seconds.get("featviz"),
        "epoch_seconds": epochs,
        "featviz_seconds_per_unit": per_channel,
        "featviz_seconds_per_conv_channel": max(conv_rates) if conv_rates else float("nan"),
        "fidelity_share_conv": float(np.mean(shares)) if shares else float("nan"),
        "conv_channels": len(shares),
        "flagged_conv": flagged,
        "flagged_never_fire": never_fire,
        "featviz_settings": (a.manifest.get("settings") or {}).get("featviz_settings"),
    }


def screenshots(run_dir: Path, layer: str) -> list[Path]:
    sys.path.insert(0, str(REPO))
    from tests.helpers.browser import CHROMIUM, Chromium

    if not CHROMIUM.is_file():
        raise SystemExit(f"no {CHROMIUM}: apt-get install -y chromium")
    report = run_dir / REPORT_DIR
    docs = REPO / "docs"
    with Chromium() as browser:
        for page in sorted(report.glob("*.html")):
            check = browser.check(page.as_uri())
            if not check.ok:
                raise SystemExit(f"{page.name}: {check}")
        return [
            browser.screenshot((report / "index.html").as_uri(), docs / "report_overview.png", max_height=2600),
            browser.screenshot((report / f"{layer}.html").as_uri(), docs / "report_unit.png", max_height=1500),
        ]


def markdown(r: dict, m: dict, note: str) -> str:
    ok = {
        "report_seconds": r["report_seconds"] <= LIMITS["report_seconds"],
        "report_mb": r["report_mb"] <= LIMITS["report_mb"],
        "featviz": r["featviz_seconds_per_conv_channel"] <= LIMITS["featviz_seconds_per_channel"],
        "fidelity": r["fidelity_share_conv"] >= LIMITS["fidelity_share"],
    }
    steps = r["atlas_step_seconds"]
    median = statistics.median
    epoch = f"{median(r['epoch_seconds']):.1f} s" if r["epoch_seconds"] else "n/a"
    flagged = ", ".join(
        f"{f['layer']} c{f['unit']} ({f['fidelity']:.2f}, best real {f['best_real']:.3g})" for f in r["flagged_conv"]
    )
    lines = [
        f"Run atlas and report for `{r['run_dir']}` ({note}).",
        "",
        "| what | measured | limit | |",
        "|---|---:|---:|---|",
        f"| report, in-process (median of {len(r['report_seconds_all'])}) | {r['report_seconds']:.2f} s | 20 s | "
        f"{'ok' if ok['report_seconds'] else 'OVER'} |",
        f"| report, fresh `python -m cnnfeat.report` (imports included) | {r['report_process_seconds']:.2f} s | | |",
        f"| report on disk | {r['report_mb']:.1f} MB in {r['report_files']} files | 25 MB | "
        f"{'ok' if ok['report_mb'] else 'OVER'} |",
        f"| atlas on disk | {r['atlas_mb']:.1f} MB in {r['atlas_files']} files | | |",
        f"| AtlasCallback per epoch (weights + alive/dead), median | {median(steps['plain']):.2f} s "
        f"(min {min(steps['plain']):.2f}, max {max(steps['plain']):.2f}) | | epoch (median): {epoch} |"
        if steps["plain"]
        else "| AtlasCallback per epoch | n/a | | |",
        f"| AtlasCallback at kept epochs (+ top patches on 10k images), median | "
        f"{median(steps['with_patches']):.2f} s | | |"
        if steps["with_patches"]
        else "| AtlasCallback at kept epochs | n/a | | |",
        f"| end of fit: final patches + top-100 classes | {r['atlas_final_patches_classes_seconds']:.2f} s | | |",
        f"| end of fit: feature visualisation, all units | {r['featviz_seconds']:.1f} s | | |",
        f"| feature visualisation per SmallCNN conv channel (slowest layer) | "
        f"{r['featviz_seconds_per_conv_channel']:.2f} s | 2 s | {'ok' if ok['featviz'] else 'OVER'} |",
        f"| conv channels reaching their best real patch (fidelity >= 1) | "
        f"{r['fidelity_share_conv']:.1%} of {r['conv_channels']} | >= 90% | {'ok' if ok['fidelity'] else 'UNDER'} |",
        "",
        f"Seconds per unit by layer: {', '.join(f'{k} {v:.3f}' for k, v in r['featviz_seconds_per_unit'].items())} "
        "(all units of a layer are optimised together; conv units twice, at the centre and at their best real patch).",
        f"Flagged conv channels: {flagged or 'none'}; of these, never firing on the probe: "
        f"{', '.join(r['flagged_never_fire']) or 'none'}.",
        "",
        f"{m['machine']} CPU, {m['threads']} threads, torch {m['torch']}, Lightning {m['lightning']}. {note}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=None, help="a finished run with the atlas (default: train one)")
    p.add_argument("--callbacks", default="[default,atlas]", help="callbacks of the trained run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--screenshots", action="store_true", help="write docs/report_overview.png and report_unit.png")
    p.add_argument("--unit-layer", default="conv2", help="the layer page of docs/report_unit.png")
    p.add_argument("--name", default="report_cost", help="results file name under benchmarks/results/")
    p.add_argument("--note", default="", help="a line about the machine (e.g. shared with other jobs)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the trained run")
    args = p.parse_args()
    tmp = None
    run_dir = args.run
    fit = None
    if run_dir is None:
        tmp = tempfile.TemporaryDirectory()
        run_dir = Path(tmp.name) / "run"
        fit = train(run_dir, args.callbacks, args.overrides)
    result = measure(run_dir, args.repeats)
    result["train_wall_seconds"] = fit
    m = machine()
    payload = {"meta": m, "note": args.note, "limits": LIMITS, "result": result}
    write_json(args.name, payload)
    (RESULTS / f"{args.name}.md").write_text(markdown(result, m, args.note or "machine load not recorded"))
    print((RESULTS / f"{args.name}.md").read_text())
    if args.screenshots:
        for path in screenshots(run_dir, args.unit_layer):
            print(path)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
