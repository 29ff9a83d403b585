"""What the relevance references (``RelevanceCallback``, issue 24 items 3 and 4) add to the seed fit.

Each repeat, back to back (the order alternates between repeats): ``experiment=seed`` for ``--epochs`` epochs with
``callbacks=none`` (the base), then the same with ``callbacks=[none,relevance]`` rendering after every epoch
(``every_n_epochs=1``, so each repeat times several renders; everything else as ``conf/callbacks/relevance.yaml``:
2,000-image stratified probe, top-8, every conv of SmallCNN with all its units drawn, heatmaps, and the path check
of 8 units per layer with 256 optimisation steps at the last epoch). The callback's own timers give each render
(references, pictures, heatmaps, the event-file and PNG writes) and the path check; the base's epoch clock gives
the seed epoch. Projection to the shipped schedule: the 15-epoch seed fit = 15 x the median base epoch; the
callback there renders at epochs 0, 5, 10 and 15 (``every_n_epochs=5``) and checks paths once, at 15. The
difference of the two fits' wall times (per repeat, paired) is reported too: it also holds what the renders cost
the training around them (caches, threads) and the machine's noise.

    python benchmarks/relevance_cost.py                 # the results file (~10 min on 2 busy cores)
    python benchmarks/relevance_cost.py --smoke         # one short repeat of 30 batches: proves it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compose_config, machine, write_json, write_markdown

from cnnfeat.callbacks import RelevanceCallback
from cnnfeat.run.train import build

SEED_EPOCHS = 15
KEPT = (0, 5, 10, 15)  #: the steps the shipped schedule renders (every_n_epochs=5, plus 0 and the last)
GOAL = 0.05


class EpochClock(pl.Callback):
    """Wall time of each training epoch, its validation included."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def fit(out: Path, epochs: int, relevance: bool, smoke: bool, save_png: bool) -> dict[str, object]:
    """One seed fit; its wall time, epoch times and (with the callback) the callback's timers."""
    overrides = ["experiment=seed", f"trainer.max_epochs={epochs}", "test=false"]
    overrides += ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    overrides += (
        ["callbacks=[none,relevance]", "callbacks.relevance.every_n_epochs=1"] if relevance else ["callbacks=none"]
    )
    if save_png:
        overrides.append("save_png=true")
    if smoke:
        overrides += ["trainer.limit_train_batches=30", "trainer.limit_val_batches=5"]
    cfg = compose_config(overrides, out)
    dm, model, trainer = build(cfg)
    clock = EpochClock()
    trainer.callbacks.append(clock)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    result: dict[str, object] = {"fit": time.perf_counter() - start, "epochs": clock.seconds}
    cb = next((c for c in trainer.callbacks if isinstance(c, RelevanceCallback)), None)
    if cb is not None:
        path = sum(cb.path_seconds)
        renders = list(cb.seconds)
        renders[-1] -= path  # the last emission holds the path check
        overlap = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("relevance/")}
        result.update(renders=renders, path=path, metrics=overlap, probe=cb.probe_size)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of each fit (renders at 0..epochs)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--png", type=Path, default=None, help="keep the last repeat's relevance run here, with PNGs")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.smoke else args.repeats
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            order = (False, True) if r % 2 == 0 else (True, False)
            pair = {}
            for with_cb in order:
                keep = args.png is not None and with_cb and r == repeats - 1
                out = args.png if keep else Path(tmp) / f"r{r}_{int(with_cb)}"
                pair["relevance" if with_cb else "base"] = fit(out, args.epochs, with_cb, args.smoke, keep)
            pairs.append(pair)
            b, w = pair["base"], pair["relevance"]
            print(
                f"repeat {r}: base fit {b['fit']:.1f} s, with {w['fit']:.1f} s, renders {w['renders']}, "
                f"path {w['path']:.2f} s",
                flush=True,
            )

    epoch = statistics.median(s for p in pairs for s in p["base"]["epochs"])
    render0 = statistics.median(p["relevance"]["renders"][0] for p in pairs)
    trained = statistics.median(s for p in pairs for s in p["relevance"]["renders"][1:])
    path = statistics.median(p["relevance"]["path"] for p in pairs)
    diff = statistics.median((p["relevance"]["fit"] - p["base"]["fit"]) for p in pairs)
    seed_fit = SEED_EPOCHS * epoch
    projected = render0 + (len(KEPT) - 1) * trained + path
    renders_per_fit = args.epochs + 1
    diff_projected = diff / renders_per_fit * len(KEPT)  # the paired difference, per render, at 4 kept epochs
    metrics = pairs[-1]["relevance"]["metrics"]
    payload = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "epochs_per_fit": args.epochs,
        "repeats": repeats,
        "smoke": args.smoke,
        "pairs": pairs,
        "median": {
            "epoch": epoch,
            "render_untrained": render0,
            "render_trained": trained,
            "path_check": path,
            "fit_difference": diff,
            "seed_fit_projected": seed_fit,
            "callback_projected": projected,
            "share": projected / seed_fit,
            "share_from_fit_difference": diff_projected / seed_fit,
        },
    }
    lines = [
        "# Relevance references (RelevanceCallback) on the seed fit: cost",
        "",
        f"`experiment=seed` (SmallCNN, Fashion-MNIST, batch 128), {args.epochs}-epoch fits, back to back in "
        f"{repeats} pair(s) (order alternating): `callbacks=none` against `callbacks=[none,relevance]` rendering "
        f"after every epoch (defaults of `conf/callbacks/relevance.yaml`: {pairs[0]['relevance']['probe']}-image "
        "stratified probe, top-8, conv1-3 with all 28 units drawn, heatmaps, path check of 8 units per layer at the "
        "last epoch with 256 steps). Medians over repeats (and over epochs / renders within them).",
        "",
        "| quantity | median |",
        "|---|---:|",
        f"| seed epoch, callbacks=none (training + validation on the 10k test set) | {epoch:.2f} s |",
        f"| render at step 0 (untrained) | {render0:.2f} s |",
        f"| render at a trained epoch (references, pictures, heatmaps, writes) | {trained:.2f} s |",
        f"| path check, once at the last epoch (3 layers x 6-8 units) | {path:.2f} s |",
        f"| fit with the callback minus fit without ({renders_per_fit} renders + path check), paired | {diff:.2f} s |",
        "",
        f"Projected to the shipped schedule (renders at epochs {', '.join(map(str, KEPT))}, path check at 15) on "
        f"the 15-epoch seed fit ({seed_fit:.0f} s = 15 x the median epoch): **{projected:.2f} s = "
        f"{100 * projected / seed_fit:.2f}% of the fit** by the callback's own timers (goal <= {100 * GOAL:.0f}%); "
        f"by the paired fit difference scaled to 4 renders: {100 * diff_projected / seed_fit:.2f}%.",
        "",
        "Scalars of the last run: " + ", ".join(f"`{k}` {v:.3f}" for k, v in sorted(metrics.items())) + ".",
        "",
        f"{machine()['machine']} CPU, {torch.get_num_threads()} torch threads, {machine()['cpu_count']} cores shared "
        f"with other jobs, torch {torch.__version__}; {repeats} repeat(s). Times carry the machine's load.",
    ]
    print("\n".join(lines))
    if not args.smoke:  # a smoke run proves the script runs; it writes no results
        write_json("relevance_cost", payload)
        write_markdown("relevance_cost", lines, echo=False)


if __name__ == "__main__":
    main()
