"""cnnfeat at the size of a real model: ResNet-18 (random init) on 32x32 and 224x224 RGB image folders, CPU.

Builds an ImageFolder in a temp dir from real pictures (Fashion-MNIST images, written as RGB PNG resized to the
case's size, in ``train/``, ``val/`` and ``test/`` class folders), then runs the real composed config
(``data=image_folder model=torchvision model.arch=resnet18 model.weights=none trainer=cpu``) in a fresh process per
run, back-to-back pairs ``callbacks=none`` / ``callbacks=[default,representations,atlas]``, and measures:

- fit seconds per training batch (train loop incl. data loading, without the callbacks' epoch-end work);
- seconds inside each callback per render (step 0 = untrained, then after each epoch) and at the end of fit
  (``VisualizationCallback.seconds``, as benchmarks/callback_overhead.py reads them);
- the report (``cnnfeat.report.write_report`` in-process, median of 3, and ``python -m cnnfeat.report`` as a fresh
  process): seconds and size on disk;
- peak RSS of the process (``resource.getrusage``); the callbacks' share as peak(with) - peak(none) and as the rise
  of RSS inside each callback call (sampled every 10 ms).

The 32x32 test split has 10,000 images, CIFAR-10's test set, so the callbacks run on the probes a CIFAR-10 run has
(whole-split top patches and atlas, 2,000 images for UMAP, dead ReLUs and representations): their per-epoch cost is
measured, not scaled. Only the training is extrapolated (see ``extrapolate``).

    python benchmarks/resnet18_size.py --repeats 1 --skip-224   # 32 px, 1 pair: ~14 min on 2 shared cores
    python benchmarks/resnet18_size.py            # 32 px: 3 pairs; 224 px: 1 pair (longer than 15 min on 2 cores)
    python benchmarks/resnet18_size.py --quick    # 32 px with a 2,000-image test split, 1 pair, with featviz
    python benchmarks/resnet18_size.py --rerender # rewrite the .md from the .json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
#: the issue's goals (section "Size: it must hold for real models")
GOALS = {"default_share": 0.15, "report_seconds": 60.0, "report_mb": 100.0, "callbacks_peak_gb": 2.0}
#: the epoch the goals are stated for: 50,000 32x32 images at the data config's batch size
EPOCH_IMAGES = 50_000
DEFAULT_CALLBACKS = (
    "FilterCallback",
    "FeatureMapCallback",
    "DeadReluCallback",
    "TopPatchesCallback",
    "EmbeddingCallback",
)
WITH = "[default,representations,atlas]"
#: ``python -m cnnfeat.report RUN_DIR`` that prints its own peak RSS (the children's figure would include forked
#: DataLoader workers of the run)
REPORT_PROCESS = (
    "import resource, runpy, sys\n"
    "sys.argv = ['cnnfeat-report', sys.argv[1]]\n"
    "try:\n"
    "    runpy.run_module('cnnfeat.report', run_name='__main__')\n"
    "finally:\n"
    "    print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
)


# -- the image folder ---------------------------------------------------------------------------------------
def fashion_mnist(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The official Fashion-MNIST ``split`` ('train' or 't10k') as uint8 images (N, 28, 28) and labels."""
    raw = data_dir / "FashionMNIST" / "raw"
    with gzip.open(raw / f"{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(raw / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def build_folder(root: Path, data_dir: Path, size: int, counts: dict[str, int]) -> Path:
    """``root/{train,val,test}/<class>/<i>.png``: the first ``counts[split]`` Fashion-MNIST images (train and val
    from the official training set, test from the official test set) as RGB PNGs of ``size`` x ``size``."""
    train, train_labels = fashion_mnist(data_dir, "train")
    test, test_labels = fashion_mnist(data_dir, "t10k")
    sources = {
        "train": (train[: counts["train"]], train_labels[: counts["train"]]),
        "val": (train[-counts["val"] :], train_labels[-counts["val"] :]),
        "test": (test[: counts["test"]], test_labels[: counts["test"]]),
    }
    for split, (images, labels) in sources.items():
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            pil = Image.fromarray(img).resize((size, size), Image.BICUBIC).convert("RGB")
            pil.save(root / split / CLASSES[label] / f"{i:05d}.png", compress_level=1)
    return root


# -- one run, in a fresh process ----------------------------------------------------------------------------
def rss_mb() -> float:
    """Resident set size of this process now, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size (Linux reports KiB), MB."""
    return resource.getrusage(who).ru_maxrss / 1024


class RssSampler:
    """Samples RSS every ``interval`` s in a thread; ``window()`` gives the peak since the last call."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval)

    def window(self) -> float:
        peak, self.peak = max(self.peak, rss_mb()), rss_mb()
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measured(fn: Callable[..., Any], calls: list[dict], sampler: RssSampler) -> Callable:
    """``fn`` that also records, per call, its step (``end`` for the end of fit), its wall seconds and how far RSS
    rose above its starting value while it ran (MB)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sampler.window()
        rss, start = rss_mb(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - start
            calls.append({"step": kwargs.get("step", "end"), "seconds": seconds, "rss_rise_mb": sampler.window() - rss})

    return wrapper


def worker(spec: dict) -> dict:
    """Compose, build and fit one run in this process; time the report when the run has the atlas."""
    import pytorch_lightning as pl
    import torch
    from common import compose_config

    from cnnfeat.callbacks import VisualizationCallback
    from cnnfeat.report import REPORT_DIR, write_report
    from cnnfeat.run.status import write_status
    from cnnfeat.run.train import build

    class BatchTimer(pl.Callback):
        """Seconds per training batch (loop incl. loading: batch end to batch end) and per validation loop."""

        def __init__(self) -> None:
            self.batches: list[list[float]] = []
            self.val: list[float] = []
            self._last = 0.0

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.batches.append([])
            self._last = time.perf_counter()

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            now = time.perf_counter()
            self.batches[-1].append(now - self._last)
            self._last = now

        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._val_start = time.perf_counter()

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if not trainer.sanity_checking:
                self.val.append(time.perf_counter() - self._val_start)

    torch.set_num_threads(spec["threads"])
    out = Path(spec["out"])
    cfg = compose_config(spec["overrides"], out)
    dm, model, trainer = build(cfg)
    timer = BatchTimer()
    trainer.callbacks.append(timer)
    sampler = RssSampler()
    calls: dict[str, list[dict]] = {}
    viz = [cb for cb in trainer.callbacks if isinstance(cb, VisualizationCallback)]
    for cb in viz:  # every render (_emit, at a step) and the end of fit
        mine = calls.setdefault(type(cb).__name__, [])
        cb._emit = measured(cb._emit, mine, sampler)
        cb.on_fit_end = measured(cb.on_fit_end, mine, sampler)
    rss_before_fit = rss_mb()
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_seconds = time.perf_counter() - start
    sampler.stop()
    result: dict[str, Any] = {
        "overrides": spec["overrides"],
        "fit_seconds": fit_seconds,
        "batch_seconds": timer.batches,
        "val_seconds": timer.val,
        "callback_seconds": {type(cb).__name__: cb.seconds for cb in viz},
        "end_of_fit_seconds": {type(cb).__name__: cb.end_seconds for cb in viz},
        "callback_calls": calls,
        "rss_before_fit_mb": rss_before_fit,
        "peak_rss_fit_mb": peak_rss_mb(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if spec.get("report"):
        # what cnnfeat-train leaves in a run directory; without it the report takes the folder that TensorBoard's
        # projector writes (<run dir>/0000N) for a sweep job and reports an empty sweep
        write_status(out, "finished")
        times = []
        for _ in range(spec.get("report_repeats", 1)):
            start = time.perf_counter()
            write_report(out)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", REPORT_PROCESS, str(out)], check=True, capture_output=True, text=True
        )
        result["report_process_seconds"] = time.perf_counter() - start
        result["peak_rss_report_process_mb"] = int(done.stdout.split("MAXRSS_KB")[-1].split()[0]) / 1024
        result["report_seconds"] = times
        result["report_mb"], result["report_files"] = folder_mb(out / REPORT_DIR)
        result["atlas_mb"], result["atlas_files"] = folder_mb(out / "atlas")
        result["peak_rss_with_report_mb"] = peak_rss_mb()
    result["run_mb"], _ = folder_mb(out)
    return result


def folder_mb(path: Path) -> tuple[float, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20, len(files)


def run(overrides: list[str], env: dict[str, str], log_file: Path, report: int, threads: int) -> dict:
    """One run in a fresh process (``--worker``), so peak RSS is this run's own."""
    with tempfile.TemporaryDirectory(prefix="b-resnet18-run-") as d:
        spec = {"overrides": overrides, "out": str(Path(d) / "run"), "report": report > 0, "threads": threads}
        spec["report_repeats"] = report
        spec_file, result_file = Path(d) / "spec.json", Path(d) / "result.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, __file__, "--worker", str(spec_file), str(result_file)]
        with open(log_file, "a") as log:
            log.write(f"\n=== {' '.join(overrides)}\n")
            log.flush()
            subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
        return json.loads(result_file.read_text())


# -- summarising --------------------------------------------------------------------------------------------
def per_batch(r: dict) -> float:
    """Median seconds per training batch over every epoch, the first 2 batches of each epoch (warm-up) left out."""
    return statistics.median(t for epoch in r["batch_seconds"] for t in epoch[2:])


def summarise(case: dict, none: list[dict], withs: list[dict]) -> dict:
    """Medians over repeats and the extrapolation to one epoch of ``EPOCH_IMAGES`` images."""
    med = statistics.median
    epochs = case["epochs"]
    renders = epochs + 1
    s_batch = med(per_batch(r) for r in none)
    s_batch_with = med(per_batch(r) for r in withs)
    batches = -(-EPOCH_IMAGES // case["batch_size"])
    epoch_fit = batches * s_batch
    callbacks: dict[str, dict] = {}
    for name in withs[0]["callback_calls"]:
        runs = [r["callback_calls"][name] for r in withs]
        steps = []
        for step in range(renders):  # None: not rendered at that step
            at = [sum(c["seconds"] for c in calls if c["step"] == step) for calls in runs]
            steps.append(med(at) if any(c["step"] == step for c in runs[0]) else None)
        callbacks[name] = {
            "render_seconds": steps,
            "end_of_fit_seconds": med(sum(c["seconds"] for c in calls if c["step"] == "end") for calls in runs),
            "rss_rise_mb": med(max(c["rss_rise_mb"] for c in calls) for calls in runs),
            "default": name in DEFAULT_CALLBACKS,
        }
    last = renders - 1

    def epoch_cost(names: list[str], step: int) -> float:
        return sum(c["render_seconds"][step] or 0.0 for n, c in callbacks.items() if n in names)

    default = [n for n in callbacks if n in DEFAULT_CALLBACKS]
    every = list(callbacks)
    summary = {
        "case": case["name"],
        "seconds_per_batch_none": s_batch,
        "seconds_per_batch_with": s_batch_with,
        "val_seconds_none": med(med(r["val_seconds"]) for r in none) if none[0]["val_seconds"] else None,
        "fit_seconds_none": med(r["fit_seconds"] for r in none),
        "fit_seconds_with": med(r["fit_seconds"] for r in withs),
        "extrapolated_batches": batches,
        "extrapolated_epoch_fit_seconds": epoch_fit,
        "callbacks": callbacks,
        # an epoch where every callback renders (the last epoch; top patches and atlas patches every 5th)
        "default_epoch_seconds_full": epoch_cost(default, last),
        "all_epoch_seconds_full": epoch_cost(every, last),
        "default_end_of_fit_seconds": sum(callbacks[n]["end_of_fit_seconds"] for n in default),
        "all_end_of_fit_seconds": sum(c["end_of_fit_seconds"] for c in callbacks.values()),
        "peak_rss_none_mb": med(r["peak_rss_fit_mb"] for r in none),
        "peak_rss_with_mb": med(r["peak_rss_fit_mb"] for r in withs),
        "callbacks_rss_rise_max_mb": max(c["rss_rise_mb"] for c in callbacks.values()),
        "parameters": withs[0]["parameters"],
    }
    if epochs >= 2:  # epoch 1 is not a patch epoch: the amortised cost over top patches' 5-epoch cycle
        plain = epoch_cost(default, 1)
        summary["default_epoch_seconds_plain"] = plain
        summary["default_epoch_seconds_amortised"] = (4 * plain + summary["default_epoch_seconds_full"]) / 5
        summary["all_epoch_seconds_plain"] = epoch_cost(every, 1)
        summary["all_epoch_seconds_amortised"] = (4 * epoch_cost(every, 1) + summary["all_epoch_seconds_full"]) / 5
    summary["peak_callbacks_mb"] = summary["peak_rss_with_mb"] - summary["peak_rss_none_mb"]
    if withs[0].get("report_seconds"):
        summary["report_seconds"] = med(med(r["report_seconds"]) for r in withs)
        summary["report_repeats"] = len(withs[0]["report_seconds"])
        summary["report_process_seconds"] = med(r["report_process_seconds"] for r in withs)
        summary["report_mb"] = med(r["report_mb"] for r in withs)
        summary["report_files"] = withs[0]["report_files"]
        summary["atlas_mb"] = med(r["atlas_mb"] for r in withs)
        summary["peak_rss_report_process_mb"] = med(r["peak_rss_report_process_mb"] for r in withs)
    return summary


def markdown(cases: list[dict], summaries: list[dict], meta: dict, args: argparse.Namespace) -> str:
    lines = [
        "# cnnfeat at the size of ResNet-18 (random init), CPU",
        "",
        "`python benchmarks/resnet18_size.py" + (" --quick" if args.quick else "") + "`: "
        f"{meta['machine']} CPU, {meta['cpu_count']} cores, {meta['threads']} torch threads, torch {meta['torch']}, "
        f"Lightning {meta['lightning']}. Each run is a fresh process; `callbacks=none` and `callbacks={WITH}` "
        "back to back; numbers are medians over the repeats.",
        "",
        "Data: Fashion-MNIST images (the official files) written as RGB PNG, resized with bicubic interpolation to "
        "the case's size, in `train/`, `val/`, `test/` class folders (`data=image_folder`). The model is the issue's "
        "`model=torchvision model.arch=resnet18 model.weights=none` with its defaults (ImageNet stem, "
        "`small_input=false`).",
        "",
        f"Code: {meta['git']}. Machine load average (1 min) at start / end: "
        f"{meta['load_average_start_end'][0][0]:.1f} / {meta['load_average_start_end'][1][0]:.1f} on "
        f"{meta['cpu_count']} cores (shared with other jobs: absolute seconds are inflated accordingly). The atlas's "
        "end-of-fit feature visualisation: "
        + ("on (the config's default)." if meta["featviz"] == "on" else "off (`callbacks.atlas.featviz=false`)."),
        "",
    ]
    for case, s in zip(cases, summaries, strict=True):
        lines += [
            f"## {case['name']}: {case['size']}x{case['size']} RGB, batch {case['batch_size']}",
            "",
            f"Folder: {case['counts']['train']} train / {case['counts']['val']} val / {case['counts']['test']} test "
            f"images; `{' '.join(case['overrides'])}`; {case['repeats']} pair(s). ResNet-18: {s['parameters']:,} "
            "parameters.",
            "",
            "| what | measured |",
            "|---|---:|",
            f"| fit per training batch, `callbacks=none` (loop incl. loading, warm-up batches left out) | "
            f"{s['seconds_per_batch_none']:.3f} s |",
            f"| fit per training batch, with the callbacks | {s['seconds_per_batch_with']:.3f} s |",
            f"| validation loop ({case['val_batches']} batches) | "
            + (f"{s['val_seconds_none']:.2f} s |" if s["val_seconds_none"] is not None else "n/a |"),
            f"| whole fit, `callbacks=none` / with | {s['fit_seconds_none']:.1f} s / {s['fit_seconds_with']:.1f} s |",
            f"| peak RSS of the process, `callbacks=none` / with | {s['peak_rss_none_mb']:.0f} MB / "
            f"{s['peak_rss_with_mb']:.0f} MB |",
            f"| callbacks' peak memory: peak RSS with - without | {s['peak_callbacks_mb']:.0f} MB |",
            f"| largest RSS rise inside one callback call | {s['callbacks_rss_rise_max_mb']:.0f} MB |",
        ]
        if "report_seconds" in s:
            lines += [
                f"| report `write_report`, in-process (median of {s.get('report_repeats', 1)}) | "
                f"{s['report_seconds']:.1f} s |",
                f"| report, fresh `python -m cnnfeat.report` | {s['report_process_seconds']:.1f} s "
                f"(peak RSS {s['peak_rss_report_process_mb']:.0f} MB) |",
                f"| report on disk | {s['report_mb']:.1f} MB in {s['report_files']} files |",
                f"| atlas on disk | {s['atlas_mb']:.1f} MB |",
            ]
        renders = case["epochs"] + 1
        head = " | ".join(f"step {i}" for i in range(renders))
        lines += [
            "",
            "Seconds inside each callback per render (step 0 = untrained, step N = after epoch N; top patches and the "
            f"atlas's patches render at step 0, every 5th epoch and the last, here step {renders - 1}), at the end "
            "of fit, and the largest RSS rise during one of its calls:",
            "",
            f"| callback | {head} | end of fit | RSS rise |",
            "|---|" + "---:|" * (renders + 2),
        ]
        for name, c in s["callbacks"].items():
            cells = [f"{t:.2f} s" if t is not None else "-" for t in c["render_seconds"]]
            mark = " (default)" if c["default"] else ""
            lines.append(
                f"| {name}{mark} | {' | '.join(cells)} | {c['end_of_fit_seconds']:.2f} s | {c['rss_rise_mb']:.0f} MB |"
            )
        lines.append("")
    return "\n".join(lines)


def goals(case: dict, s: dict) -> list[str]:
    """The issue's goals against the 32 px case's numbers, with the extrapolation spelled out."""
    # the fit is extrapolated from the batches of the run that also timed the callbacks (same process, same machine
    # load); the callbacks=none run's batches give the second figure
    fit = s["extrapolated_batches"] * s["seconds_per_batch_with"]
    share_full = s["default_epoch_seconds_full"] / fit
    ok = {True: "**met**", False: "**not met**"}
    lines = [
        "## The issue's goals (32x32 case)",
        "",
        f"Extrapolation: one epoch of {EPOCH_IMAGES:,} 32x32 images at batch {case['batch_size']} is "
        f"{s['extrapolated_batches']} training batches x {s['seconds_per_batch_with']:.3f} s (the median training "
        "batch of the run with the callbacks, the same process and machine load as the callbacks' seconds; the "
        f"`callbacks=none` run's {s['seconds_per_batch_none']:.3f} s per batch gives "
        f"{s['extrapolated_epoch_fit_seconds']:.0f} s) = **{fit:.0f} s** of fit (validation left out, "
        "which makes the callbacks' share larger). The callbacks' cost per epoch does not grow with the training set: "
        f"it is measured as is, on the probes a CIFAR-10 run has (the test split here has {case['counts']['test']:,} "
        "images like CIFAR-10's; top patches and the atlas use the whole split, UMAP, dead ReLUs and representations "
        "2,000 images).",
        "",
        "| goal | measured | |",
        "|---|---:|---|",
        f"| default callbacks <= 15% of the epoch's fit, an epoch where all render (incl. top patches) | "
        f"{s['default_epoch_seconds_full']:.1f} s = {100 * share_full:.1f}% | "
        f"{ok[share_full <= GOALS['default_share']]} |",
    ]
    if "default_epoch_seconds_amortised" in s:
        share_am = s["default_epoch_seconds_amortised"] / fit
        share_plain = s["default_epoch_seconds_plain"] / fit
        lines += [
            f"| same, an epoch without top patches (step 1) | {s['default_epoch_seconds_plain']:.1f} s = "
            f"{100 * share_plain:.1f}% | {ok[share_plain <= GOALS['default_share']]} |",
            f"| same, averaged over top patches' 5-epoch cycle ((4 x plain + full) / 5) | "
            f"{s['default_epoch_seconds_amortised']:.1f} s = {100 * share_am:.1f}% | "
            f"{ok[share_am <= GOALS['default_share']]} |",
        ]
    all_share = s["all_epoch_seconds_full"] / fit
    peak_gb = max(s["peak_callbacks_mb"], s["callbacks_rss_rise_max_mb"]) / 1024
    lines += [
        f"| (not a goal) default + representations + atlas, an epoch where all render | "
        f"{s['all_epoch_seconds_full']:.1f} s = {100 * all_share:.1f}% | |",
        f"| (not a goal) once at the end of fit: default / all callbacks | {s['default_end_of_fit_seconds']:.1f} s / "
        f"{s['all_end_of_fit_seconds']:.1f} s | |",
    ]
    if "report_seconds" in s:
        lines += [
            f"| report <= 60 s (fresh process, imports included) | {s['report_process_seconds']:.1f} s | "
            f"{ok[s['report_process_seconds'] <= GOALS['report_seconds']]} |",
            f"| report <= 100 MB on disk | {s['report_mb']:.1f} MB | {ok[s['report_mb'] <= GOALS['report_mb']]} |",
        ]
    for row in s.get("extra_goal_rows", []):  # measured outside this script's runs (see the notes)
        lines.append(row)
    lines += [
        f"| callbacks' peak memory <= 2 GB (the larger of: peak RSS with - without; largest rise in one call) | "
        f"{peak_gb:.2f} GB | {ok[peak_gb <= GOALS['callbacks_peak_gb']]} |",
        "",
    ]
    return lines


def git_state() -> str:
    """The commit and whether the tree had uncommitted changes (other people's edits are measured too)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO, capture_output=True, text=True)
    changed = [line[3:] for line in dirty.stdout.splitlines()]
    return head.stdout.strip() + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="32 px only, a 2,000-image test split, 1 pair")
    p.add_argument("--repeats", type=int, default=None, help="pairs for the 32 px case (default 3; --quick 1)")
    p.add_argument("--skip-224", action="store_true", help="leave out the 224 px case")
    p.add_argument("--name", default=None, help="results file name (default resnet18_size[_quick])")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each run")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CNNFEAT_DATA", "/work/shared/data")))
    p.add_argument(
        "--featviz",
        choices=("on", "off"),
        default=None,
        help="the atlas's end-of-fit feature visualisation (default: on with --quick, off otherwise: ~10 min at 32 px)",
    )
    p.add_argument("--report-repeats", type=int, default=1, help="in-process report builds per run (median)")
    p.add_argument("--rerender", action="store_true", help="rewrite the .md from the results .json (no runs)")
    p.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec_file, result_file = args.worker
        result_file.write_text(json.dumps(worker(json.loads(spec_file.read_text()))))
        return

    name = args.name or ("resnet18_size_quick" if args.quick else "resnet18_size")
    if args.rerender:
        saved = json.loads((RESULTS / f"{name}.json").read_text())
        write_markdown(name, saved["cases"], saved["summaries"], saved["meta"], args)
        return
    repeats = args.repeats or (1 if args.quick else 3)
    common = ["model=torchvision", "model.arch=resnet18", "model.weights=none", "trainer=cpu", "test=false"]
    common += ["report=false", "seed=0", "data=image_folder"]
    featviz = args.featviz or ("on" if args.quick else "off")
    cases = [
        {
            "name": "32 px",
            "size": 32,
            "batch_size": 128,
            "epochs": 1 if args.quick else 2,
            "counts": {"train": 1280, "val": 512, "test": 2000 if args.quick else 10_000},
            "train_batches": 6 if args.quick else 10,
            "val_batches": 2,
            "repeats": repeats,
        }
    ]
    if not (args.quick or args.skip_224):
        cases.append(
            {
                "name": "224 px",
                "size": 224,
                "batch_size": 32,
                "epochs": 1,
                "counts": {"train": 160, "val": 32, "test": 200},
                "train_batches": 4,
                "val_batches": 1,
                "repeats": 1,
            }
        )
    log_file = Path(tempfile.gettempdir()) / f"b-{name}.log"
    log_file.write_text("")
    env = {**os.environ, "CNNFEAT_DATA": str(args.data_dir)}
    summaries, raw = [], {}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="b-resnet18-size-") as tmp:
        env["CNNFEAT_CACHE"] = str(Path(tmp) / "cache")
        for case in cases:
            start = time.perf_counter()
            root = build_folder(Path(tmp) / f"folder{case['size']}", args.data_dir, case["size"], case["counts"])
            print(f"{case['name']}: folder built in {time.perf_counter() - start:.1f} s", flush=True)
            case["overrides"] = [
                *common,
                f"data.root={root}",
                f"data.batch_size={case['batch_size']}",
                f"data.eval_batch_size={2 * case['batch_size']}",
                f"trainer.max_epochs={case['epochs']}",
                f"trainer.limit_train_batches={case['train_batches']}",
                f"trainer.limit_val_batches={case['val_batches']}",
            ]
            nones, withs = [], []
            for r in range(case["repeats"]):
                for callbacks, runs in (("none", nones), (WITH, withs)):
                    start = time.perf_counter()
                    extra = [f"callbacks={callbacks}"]
                    if callbacks != "none" and featviz == "off":
                        extra.append("callbacks.atlas.featviz=false")
                    report = args.report_repeats if callbacks != "none" else 0
                    res = run([*case["overrides"], *extra], env, log_file, report, args.threads)
                    runs.append(res)
                    print(
                        f"{case['name']} repeat {r} callbacks={callbacks}: fit {res['fit_seconds']:.1f} s, "
                        f"{per_batch(res):.3f} s/batch, peak RSS {res['peak_rss_fit_mb']:.0f} MB "
                        f"(process {time.perf_counter() - start:.0f} s)",
                        flush=True,
                    )
            summaries.append(summarise(case, nones, withs))
            raw[case["name"]] = {"none": nones, "with": withs}
    meta = machine()
    meta["load_average_start_end"] = [load_start, os.getloadavg()]
    meta["git"] = git_state()
    meta["featviz"] = featviz
    write_json(name, {"meta": meta, "goals": GOALS, "cases": cases, "summaries": summaries, "runs": raw})
    write_markdown(name, cases, summaries, meta, args)


def write_markdown(name: str, cases: list[dict], summaries: list[dict], meta: dict, args: argparse.Namespace) -> None:
    """``results/<name>.md`` from the cases, their summaries and the machine."""
    md = markdown(cases, summaries, meta, args) + "\n\n" + "\n".join(goals(cases[0], summaries[0]))
    if meta.get("notes"):
        md += "\n## Notes\n\n" + "\n".join(f"- {n}" for n in meta["notes"]) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
