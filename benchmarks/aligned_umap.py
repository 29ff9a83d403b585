"""cnnfeat's aligned UMAP frames against umap-learn's ``AlignedUMAP`` on a real SmallCNN trajectory (issue 25).

The trajectory: SmallCNN trained as ``experiment=seed`` trains it (SGD lr 0.2, MultiStepLR, batch 128, inputs in
[0, 1], seed 0) for 4 epochs on the CPU, and the 100-d ``features(x)`` of all 10,000 test images before training
and after every epoch (5 frames), cached in ``--cache`` so reruns skip the training. For each point count (2,000 =
``stratified_ids(labels, 2000, 0)``, as the UMAP callback draws them; 10,000 = the whole test split) and each seed,
back to back, single-threaded (``NUMBA_NUM_THREADS=1``, ``torch.set_num_threads(1)``):

* ``aligned``: cnnfeat now: ``fit_umap`` (spectral start, 200 epochs) for frame 0, then ``fit_aligned(x_t,
  map_{t-1}, x_{t-1})`` (100 epochs, anchored where the neighbourhoods did not change);
* ``warm start``: cnnfeat before: frame 0 the same, then ``fit_umap(x_t, init=map_{t-1}, n_epochs=50)``;
* ``AlignedUMAP``: ``umap.AlignedUMAP(n_neighbors=15, min_dist=0.1, random_state=seed)`` on the 5 frames with
  identity relations (it fits each frame, then optimises all of them jointly, past and future frames pulling on
  each other); it compiles its aligned optimiser on every call, which is part of what a user waits for;
* ``independent``: ``fit_umap(x_t, random_state=seed)`` per frame, no alignment: the quality reference.

Every map is normalised and rotated onto the previous frame's (``normalize``), so the shift per step (mean
displacement per point in RMS radii, ``frame_shift``) is measured the same way for all. Quality: 5-fold 5-NN
accuracy on the 2-D map and trustworthiness (k = 5), as the callback logs them. Times: wall and CPU seconds of
the whole 5-frame sequence; medians over the seeds. The per-render cost that decides the callback's share of a
training run is measured separately: a warm frame plus the metrics, at 2,000, 5,000 and 10,000 points.

    python benchmarks/aligned_umap.py                        # 2,000 points, 3 seeds; then 10,000 points, 1 seed
    python benchmarks/aligned_umap.py --points 2000 --seeds 1 --no-aligned-umap   # quick look
    python benchmarks/aligned_umap.py --points "" --tag _render_cost             # only the per-render cost
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # before numba is imported: AlignedUMAP's optimiser is parallel

import argparse
import itertools
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json, write_markdown

from cnnfeat import embedding

EPOCHS = 4
METHODS = ("aligned", "warm start", "AlignedUMAP", "independent")


def trajectory(cache: Path, batches: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Features (frames, 10000, 100) of the test images at epochs 0..EPOCHS and their labels, trained once."""
    if cache.is_file():
        with np.load(cache) as z:
            return z["features"], z["labels"]
    from cnnfeat.data.fashion_mnist import FashionMNISTDataModule
    from cnnfeat.models import SmallCNN
    from cnnfeat.run import lightning_api as pl

    class Frames(pl.Callback):
        def __init__(self, x: torch.Tensor) -> None:
            self.x, self.frames = x, []

        def grab(self, model: pl.LightningModule) -> None:
            was = model.training
            model.eval()
            with torch.no_grad():
                self.frames.append(torch.cat([model.features(b) for b in self.x.split(1000)]).numpy())
            model.train(was)

        def on_train_start(self, trainer: pl.Trainer, model: pl.LightningModule) -> None:
            self.grab(model)

        def on_train_epoch_end(self, trainer: pl.Trainer, model: pl.LightningModule) -> None:
            self.grab(model)

    pl.seed_everything(0)
    dm = FashionMNISTDataModule(batch_size=128, val_on_test=True)
    dm.prepare_data()
    dm.setup("fit")
    x, y = dm.images("test")
    model = SmallCNN(
        input_mean=None,
        input_std=None,
        optimizer={"_target_": "torch.optim.SGD", "lr": 0.2},
        scheduler={"_target_": "torch.optim.lr_scheduler.MultiStepLR", "milestones": [2, 5, 8, 11, 14], "gamma": 0.5},
    )
    frames = Frames(x)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        limit_train_batches=batches,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[frames],
    )
    trainer.fit(model, datamodule=dm)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, features=np.stack(frames.frames), labels=y.numpy())
    return np.stack(frames.frames), y.numpy()


def timed(fn: object) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def chain(maps: list[np.ndarray]) -> list[np.ndarray]:
    """Each map normalised and rotated onto the previous one, as cnnfeat shows frames."""
    out: list[np.ndarray] = []
    for m in maps:
        out.append(embedding.normalize(np.asarray(m, dtype=np.float32), out[-1] if out else None))
    return out


def sequence(method: str, xs: np.ndarray, seed: int, anchor: float = embedding.ANCHOR) -> list[np.ndarray]:
    """The 5 maps of one method, normalised and aligned frame to frame."""
    if method == "AlignedUMAP":
        import umap

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            relations = [{i: i for i in range(xs.shape[1])} for _ in range(len(xs) - 1)]
            fitted = umap.AlignedUMAP(n_neighbors=15, min_dist=0.1, random_state=seed).fit(
                list(xs), relations=relations
            )
        return chain(fitted.embeddings_)
    if method == "independent":
        return chain([embedding.fit_umap(x, random_state=seed) for x in xs])
    maps = [embedding.normalize(embedding.fit_umap(xs[0], random_state=seed))]
    for t in range(1, len(xs)):
        if method == "aligned":
            maps.append(embedding.fit_aligned(xs[t], maps[-1], xs[t - 1], random_state=seed, anchor=anchor))
        else:
            warm = embedding.fit_umap(xs[t], init=maps[-1], n_epochs=50, random_state=seed)
            maps.append(embedding.normalize(warm, maps[-1]))
    return maps


def measure(method: str, xs: np.ndarray, labels: np.ndarray, seed: int, anchor: float) -> dict:
    maps, wall, cpu = timed(lambda: sequence(method, xs, seed, anchor))
    quality = [embedding.cluster_quality(x, m, labels) for x, m in zip(xs, maps, strict=True)]
    return {
        "seed": seed,
        "wall_s": wall,
        "cpu_s": cpu,
        "shift": [embedding.frame_shift(a, b) for a, b in itertools.pairwise(maps)],
        "knn_acc_2d": [q.knn_acc_2d for q in quality],
        "trustworthiness": [q.trustworthiness for q in quality],
        "maps": maps,
    }


def render_cost(xs: np.ndarray, labels: np.ndarray, repeats: int) -> dict[str, float]:
    """CPU seconds of one warm render's UMAP work (epoch 3's frame after epoch 2's), before and after, by part."""
    prev = embedding.normalize(embedding.fit_umap(xs[2], random_state=0))
    parts: dict[str, list[float]] = {}

    def add(name: str, fn: object) -> object:
        out, _, cpu = timed(fn)
        parts.setdefault(name, []).append(cpu)
        return out

    for _ in range(repeats):
        embedding._KNN_MEMO.clear()
        add("previous frame's k-NN graph (kept from its render)", lambda: embedding._knn_memo(xs[2], 15))
        add("k-NN graph", lambda: embedding.knn_graph(xs[3], 15))
        m = add("aligned frame (graph, overlap, 100 epochs)", lambda: embedding.fit_aligned(xs[3], prev, xs[2]))
        add(
            "warm start before (graph, 50 epochs)",
            lambda: embedding.normalize(embedding.fit_umap(xs[3], init=prev, n_epochs=50), prev),
        )
        add("metrics", lambda m=m: embedding.cluster_quality(xs[3], m, labels))
    return {k: statistics.median(v) for k, v in parts.items()}


def summary(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, rs in runs.items():
        out[name] = {
            key: np.mean([r[key] for r in rs], axis=0).tolist() for key in ("shift", "knn_acc_2d", "trustworthiness")
        }
        out[name]["shift_max"] = np.max([r["shift"] for r in rs], axis=0).tolist()
        out[name]["wall_s"] = statistics.median(r["wall_s"] for r in rs)
        out[name]["cpu_s"] = statistics.median(r["cpu_s"] for r in rs)
        out[name]["seeds"] = [r["seed"] for r in rs]
        if name == "independent":
            for key in ("knn_acc_2d", "trustworthiness"):
                out[name][f"{key}_min"] = np.min([r[key] for r in rs], axis=0).tolist()
                out[name][f"{key}_max"] = np.max([r[key] for r in rs], axis=0).tolist()
    return out


def table(n: int, s: dict[str, dict], cost: dict[str, float] | None) -> list[str]:
    fmt = lambda v, d=3: " / ".join(f"{x:.{d}f}" for x in v)  # noqa: E731
    ind = s["independent"]
    md = [
        f"## {n:,} points (seeds {', '.join(map(str, s['aligned']['seeds']))}; means over seeds, times medians)",
        "",
        "| method | shift per step 0→1 / 1→2 / 2→3 / 3→4 | worst seed | 2-D 5-NN acc, epochs 0..4 | "
        "trustworthiness | wall | CPU |",
        "|---|---|---|---|---|---:|---:|",
    ]
    for name, r in s.items():
        shift = "—" if name == "independent" else fmt(r["shift"])
        worst = "—" if name == "independent" else fmt(r["shift_max"])
        md.append(
            f"| {name} | {shift} | {worst} | {fmt(r['knn_acc_2d'])} | {fmt(r['trustworthiness'], 4)} | "
            f"{r['wall_s']:.1f} s | {r['cpu_s']:.1f} s |"
        )
    md += [
        "",
        f"Independent fits' spread over seeds: 2-D accuracy {fmt(ind['knn_acc_2d_min'])} to "
        f"{fmt(ind['knn_acc_2d_max'])}; trustworthiness {fmt(ind['trustworthiness_min'], 4)} to "
        f"{fmt(ind['trustworthiness_max'], 4)}.",
        "",
    ]
    a, ref = s["aligned"], s.get("AlignedUMAP")
    goals = []
    if ref is not None:
        later = all(x <= y for x, y in zip(a["shift"][1:], ref["shift"][1:], strict=True))
        goals.append(
            f"- shift after the first step <= AlignedUMAP's: **{'yes' if later else 'no'}** "
            f"({fmt(a['shift'][1:])} vs {fmt(ref['shift'][1:])})"
        )
        goals.append(
            f"- time <= 1/10 of AlignedUMAP's: **{'yes' if a['wall_s'] <= ref['wall_s'] / 10 else 'no'}** "
            f"({a['wall_s']:.1f} s vs {ref['wall_s']:.1f} s wall = 1/{ref['wall_s'] / a['wall_s']:.0f}; CPU "
            f"1/{ref['cpu_s'] / a['cpu_s']:.0f})"
        )
    first = a["shift"][0] <= s["warm start"]["shift"][0]
    goals.append(
        f"- first step no larger than before: **{'yes' if first else 'no'}** ({a['shift'][0]:.3f} vs "
        f"{s['warm start']['shift'][0]:.3f})"
    )
    for key, label in (("knn_acc_2d", "2-D accuracy"), ("trustworthiness", "trustworthiness")):
        worst = min(x - y for x, y in zip(a[key], ind[key], strict=True))
        goals.append(
            f"- {label} within 0.005 of the independent fits (mean over seeds), worst frame: "
            f"**{'yes' if worst >= -0.005 else 'no'}** ({worst:+.4f})"
        )
    md += ["Goals:", "", *goals, ""]
    if cost:
        md += [
            "One warm render's UMAP work, CPU seconds (median), single thread:",
            "",
            "| part | seconds |",
            "|---|---:|",
            *[f"| {k} | {v:.2f} |" for k, v in cost.items()],
            "",
        ]
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path("/tmp/cnnfeat-aligned-umap/trajectory.npz"))
    p.add_argument("--batches", type=int, default=None, help="train batches per epoch (default: all)")
    p.add_argument("--points", default="2000,10000")
    p.add_argument("--seeds", default="3,1", help="seeds per point count, e.g. 3,1")
    p.add_argument("--cost-points", default="2000,5000,10000", help="point counts for the per-render cost")
    p.add_argument("--anchor", action="append", type=float, default=[], help="extra anchor strengths to compare")
    p.add_argument("--no-aligned-umap", action="store_true")
    p.add_argument("--maps", type=Path, default=None, help="save every map here (npz per point count)")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    features, labels = trajectory(args.cache, args.batches)
    embedding.fit_aligned(features[1, :200], embedding.normalize(features[0, :200, :2]), n_epochs=2)  # compile
    md = [
        "# Aligned UMAP frames: cnnfeat against umap-learn's AlignedUMAP",
        "",
        f"SmallCNN as `experiment=seed` trains it, {EPOCHS} epochs"
        f"{'' if args.batches is None else f' of {args.batches} batches'}; 100-d `features(x)` of the same test "
        "images at epochs 0..4. `python benchmarks/aligned_umap.py`; what each method is: the script's docstring.",
        "",
    ]
    payload: dict = {"machine": machine(), "numba_threads": os.environ["NUMBA_NUM_THREADS"], "results": {}}
    seeds = [int(s) for s in args.seeds.split(",")]
    cost_points = {int(n) for n in args.cost_points.split(",")} if args.cost_points else set()
    for i, n in enumerate(int(v) for v in args.points.split(",") if v):
        ids = embedding.stratified_ids(torch.from_numpy(labels), n, 0).numpy()
        xs, y = np.ascontiguousarray(features[:, ids]), labels[ids]
        methods = [m for m in METHODS if not (m == "AlignedUMAP" and args.no_aligned_umap)]
        extra = {f"aligned, anchor {a:g}": a for a in args.anchor}
        runs: dict[str, list[dict]] = {m: [] for m in [*methods, *extra]}
        for seed in range(seeds[min(i, len(seeds) - 1)]):
            for name in runs:  # back to back within a seed
                method = "aligned" if name in extra else name
                r = measure(method, xs, y, seed, extra.get(name, embedding.ANCHOR))
                runs[name].append(r)
                print(
                    f"{n} seed {seed} {name}: {r['wall_s']:.1f} s wall, shift "
                    f"{' '.join(f'{v:.3f}' for v in r['shift'])}",
                    flush=True,
                )
        if args.maps:
            args.maps.mkdir(parents=True, exist_ok=True)
            np.savez(args.maps / f"maps_{n}.npz", labels=y, **{k: np.stack(v[0]["maps"]) for k, v in runs.items()})
        cost = render_cost(xs, y, 3) if n in cost_points else None
        s = summary(runs)
        md += table(n, s, cost)
        payload["results"][str(n)] = {
            "summary": s,
            "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "maps"} for r in v] for k, v in runs.items()},
            "render_cost_cpu_s": cost,
        }
    for n in sorted(cost_points - {int(v) for v in args.points.split(",") if v}):
        ids = embedding.stratified_ids(torch.from_numpy(labels), n, 0).numpy()
        cost = render_cost(np.ascontiguousarray(features[:, ids]), labels[ids], 3)
        payload["results"].setdefault(str(n), {})["render_cost_cpu_s"] = cost
        md += [f"## {n:,} points: one warm render's UMAP work, CPU seconds (median)", "", "| part | seconds |"]
        md += ["|---|---:|", *[f"| {k} | {v:.2f} |" for k, v in cost.items()], ""]
    m = machine()
    md.append(
        f"{m['machine']} CPU ({m['cpu_count']} cores, shared with other work while measuring: CPU seconds are the "
        f"steadier figure), torch {m['torch']}, 1 torch thread, NUMBA_NUM_THREADS={os.environ['NUMBA_NUM_THREADS']}."
    )
    name = f"aligned_umap{args.tag}"
    write_json(name, payload)
    write_markdown(name, md)
    print(json.dumps({"written": str(RESULTS / f"{name}.md")}))


if __name__ == "__main__":
    main()
