"""What issue 24's analysis core costs on SmallCNN, as a share of the seed fit, and beside Captum's own calls.

Each repeat, back to back: one epoch of ``experiment=seed`` as ``cnnfeat-train`` runs it (SmallCNN on Fashion-MNIST,
55k training images, SGD lr 0.2, batch 128, then the validation on the 10k test set; ``callbacks=none`` and no
progress bar, so the epoch is as short as the seed fit's can be), timed from the epoch's start to its end, then on
the model it just trained:

- attribution: ``cnnfeat.attribution.explain`` for the lecture's 6 test images (Grad-CAM at ``relu3`` and
  Integrated Gradients to 1% completeness, predicted and true class);
- ablation: ``cnnfeat.importance.ablation_importance`` of all 128 units (conv1-3 channels at their ReLUs, fc2's 100
  at ``relu5``) on the 2,000-image stratified probe;
- relevance references: ``cnnfeat.relevance.references`` (top-8 by relevance and by activation, the same 4 nodes,
  2,000 images) plus the conditional heatmaps of all 128 x 8 relevance references;
- attribution with LRP (``pixel_method="lrp"``, the seed run's pixel-level method): Grad-CAM and
  ``cnnfeat.lrp.lrp`` (epsilon-plus-flat) for the same images and classes, the graph traced in the call;
- peers on the same inputs: Grad-CAM against Captum's ``LayerGradCam``, Integrated Gradients at 64 fixed steps
  against Captum's ``IntegratedGradients`` (ours wraps it: the difference is our bookkeeping), LRP against zennit's
  own ``EpsilonPlusFlat`` attributor (ours assigns zennit's rules from the traced graph), and ablation of
  ``relu2`` (6 units) and ``relu5`` (100 units) on 500 images against Captum's ``LayerFeatureAblation``.

Shares: attribution per epoch / one epoch; ablation and references at 4 kept epochs / 15 epochs (the seed fit).
The shipped seed run adds its callbacks to every epoch, so its epochs are longer and these shares upper bounds.
Medians of the repeats; ratios are per repeat (paired), then the median. ``path_check`` (end of fit, once) is timed
too, and the scaling of ablation is stated for SmallCNN, AlexNet and ResNet-18 (estimates from the graph).

    python benchmarks/attribution.py --threads 1   # ~6 min on 2 busy cores (the results file)
    python benchmarks/attribution.py --smoke       # one short repeat on a slice: proves the script runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compose_config, machine, write_json, write_markdown

from cnnfeat.atlas import default_layers
from cnnfeat.attribution import LECTURE_IMAGE_IDS, LRP, explain, grad_cam, integrated_gradients
from cnnfeat.data.fashion_mnist import find_source_file, read_idx
from cnnfeat.graph import Graph, trace_graph
from cnnfeat.importance import (
    DEFAULT_BUDGET,
    ablation_cost,
    ablation_importance,
    ablation_node,
    bounded_units,
    units_of,
)
from cnnfeat.lrp import lrp
from cnnfeat.models import SmallCNN
from cnnfeat.probe import probe_from_tensors
from cnnfeat.probe_pass import shared_positions
from cnnfeat.relevance import path_check, reference_heatmaps, references
from cnnfeat.run.train import build

SEED_EPOCHS, KEPT_EPOCHS = 15, 4
PEER_NODES = ("relu2", "relu5")


def load(root: Path, stem: str) -> torch.Tensor:
    path = find_source_file(root, stem)
    if path is None:
        raise SystemExit(f"{stem} not found under {root}; set CNNFEAT_DATA")
    return read_idx(path)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def per_call(fn: Callable[[], object], calls: int) -> float:
    """Mean seconds of ``calls`` calls after one warm-up call (for the millisecond-scale peers)."""
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


class EpochClock(pl.Callback):
    """Wall time of each training epoch, its validation included (Lightning validates before the epoch ends)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def seed_epoch(out: Path, smoke: bool) -> tuple[float, SmallCNN, float]:
    """One epoch of ``experiment=seed`` (callbacks=none: training and the test-set validation only), as cnnfeat-train
    runs it; returns the epoch's seconds, the trained model (eval mode, CPU) and its validation accuracy."""
    overrides = ["experiment=seed", "trainer.max_epochs=1", "callbacks=none", "test=false"]
    overrides += ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    if smoke:
        overrides += ["trainer.limit_train_batches=30", "trainer.limit_val_batches=5"]
    cfg = compose_config(overrides, out)
    dm, model, trainer = build(cfg)
    clock = EpochClock()
    trainer.callbacks.append(clock)
    trainer.fit(model, datamodule=dm)
    assert len(clock.seconds) == 1, clock.seconds
    return clock.seconds[0], model.cpu().eval(), float(trainer.callback_metrics.get("val/acc", float("nan")))


def peer(
    model: SmallCNN,
    graph: Graph,
    lx: torch.Tensor,
    ly: torch.Tensor,
    predicted: torch.Tensor,
    sx: torch.Tensor,
    sy: torch.Tensor,
    add: Callable[[str, float], None],
) -> None:
    """Ours and Captum's on the same inputs: the 6 images with their predicted and true classes, a probe subset."""
    from captum.attr import IntegratedGradients, LayerFeatureAblation, LayerGradCam
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    x12, t12 = torch.cat([lx, lx]), torch.cat([predicted, ly])
    gc = LayerGradCam(model, model.relu3)
    for _ in range(5):  # interleaved: ours, Captum's, ours, ...
        add("gradcam_ours", per_call(lambda: grad_cam(model, x12, t12, "relu3"), 4))
        add("gradcam_captum", per_call(lambda: gc.attribute(x12, target=t12, relu_attributions=True), 4))
    ig = IntegratedGradients(model)
    kw = {"n_steps": 64, "method": "gausslegendre", "return_convergence_delta": True}
    for _ in range(3):
        add("ig_ours", per_call(lambda: integrated_gradients(model, x12, t12, steps=64, max_steps=64), 1))
        add("ig_captum", per_call(lambda: ig.attribute(x12, target=t12, **kw), 1))
    seed_graph = trace_graph(model, x12[:1])

    def zennit_lrp() -> torch.Tensor:
        with Gradient(model=model, composite=EpsilonPlusFlat()) as attributor:
            _, rel = attributor(x12.clone().requires_grad_(True), lambda out: out * F.one_hot(t12, out.shape[1]))
        return rel

    add("lrp_max_diff", float((lrp(model, x12, t12, seed_graph).relevance - zennit_lrp()).abs().max()))
    for _ in range(5):
        add("lrp_ours", per_call(lambda: lrp(model, x12, t12, seed_graph), 4))
        add("lrp_zennit", per_call(zennit_lrp, 4))
    add("ablation_subset_ours", timed(lambda: ablation_importance(model, sx, sy, graph, dict.fromkeys(PEER_NODES)))[0])

    def captum_ablation() -> None:
        for name in PEER_NODES:
            shape = graph[name].output_shape
            mask = torch.arange(shape[1]).view(1, -1, *([1] * (len(shape) - 2)))
            LayerFeatureAblation(model, getattr(model, name)).attribute(sx, target=sy, layer_mask=mask)

    add("ablation_subset_captum", timed(captum_ablation)[0])


def pieces(
    model: SmallCNN,
    graph: Graph,
    nodes: list[str],
    probe: tuple[torch.Tensor, torch.Tensor],
    lecture: tuple[torch.Tensor, torch.Tensor],
    peer_n: int,
    add: Callable[[str, float], None],
) -> dict:
    """Time every piece on ``model``; returns the relevance references (for the trust check)."""
    (px, py), (lx, ly) = probe, lecture
    t, e = timed(lambda: explain(model, lx, ly, "relu3"))
    add("explain", t)
    add("explain_lrp", timed(lambda: explain(model, lx, ly, "relu3", pixel_method=LRP))[0])
    add("ig_max_gap", float(torch.cat([e.ig_predicted.relative_gap, e.ig_true.relative_gap]).max()))
    add("ig_max_steps", float(torch.cat([e.ig_predicted.steps, e.ig_true.steps]).max()))
    add("ablation", timed(lambda: ablation_importance(model, px, py, graph, dict.fromkeys(nodes)))[0])
    t, refs = timed(lambda: references(model, px, nodes, k=8))
    add("references", t)
    add("heatmaps", timed(lambda: [reference_heatmaps(model, px, refs[n], refs[n].by_relevance) for n in nodes])[0])
    shares = torch.cat([refs[n].overlap() for n in nodes])  # NaN: a unit without references (it never fires)
    add("overlap", float(shares.nanmean()))
    add("no_references", float(shares.isnan().sum()))
    peer(model, graph, lx, ly, e.predicted, px[:peer_n], py[:peer_n], add)
    return refs


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def scaling() -> list[dict[str, object]]:
    """Per network: units, ablation cost per probe image with all units and with the bounded default."""
    from torchvision.models import alexnet, resnet18

    rows = []
    for name, model, x in (
        ("SmallCNN (28x28)", SmallCNN(), torch.zeros(1, 1, 28, 28)),
        ("AlexNet (224x224)", alexnet(), torch.zeros(1, 3, 224, 224)),
        ("ResNet-18 (224x224)", resnet18(), torch.zeros(1, 3, 224, 224)),
    ):
        graph = trace_graph(model.eval(), x)
        nodes = [ablation_node(graph, layer) for layer in default_layers(graph)]
        full = {n: units_of(graph, n) for n in nodes}
        bounded = {n: len(u) for n, u in bounded_units(graph, nodes).items()}
        rows.append(
            {
                "network": name,
                "nodes": len(nodes),
                "units": sum(full.values()),
                "cost_all": ablation_cost(graph, full, 1),
                "units_bounded": sum(bounded.values()),
                "cost_bounded": ablation_cost(graph, bounded, 1),
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="one repeat on 5k training and 500 probe images")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for everything (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(os.environ.get("CNNFEAT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    os.environ["CNNFEAT_DATA"] = str(root)
    xt = load(root, "t10k-images-idx3-ubyte").float().div(255).unsqueeze(1)
    yt = load(root, "t10k-labels-idx1-ubyte").long()
    repeats, probe_n, peer_n = (1, 500, 200) if args.smoke else (args.repeats, 2000, 500)
    probe = probe_from_tensors(xt, yt)
    pos = shared_positions(probe, probe_n)
    px, py = probe.inputs[pos], probe.labels[pos]
    lect = torch.tensor(LECTURE_IMAGE_IDS)
    lx, ly = xt[lect], yt[lect]
    graph = trace_graph(SmallCNN(), px[:1])
    nodes = [ablation_node(graph, layer) for layer in default_layers(graph)]
    units = {n: units_of(graph, n) for n in nodes}
    assert sum(units.values()) == 128, units

    rec: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rec.setdefault(key, []).append(value)

    for r in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            t, model, acc = seed_epoch(Path(out), args.smoke)
        add("epoch", t)
        add("test_acc", acc)
        refs = pieces(model, graph, nodes, (px, py), (lx, ly), peer_n, add)
        print(
            f"repeat {r}: epoch {rec['epoch'][-1]:.1f} s (val acc {acc:.3f}), explain {rec['explain'][-1]:.3f} s, "
            f"ablation {rec['ablation'][-1]:.2f} s, references {rec['references'][-1]:.2f} s "
            f"+ heatmaps {rec['heatmaps'][-1]:.2f} s",
            flush=True,
        )
    # the end-of-fit trust check on relu3's 16 units (the real top-1 stands in for each optimised input: the cost
    # does not depend on what the image shows) against 64 arbitrary probe images
    top = refs["relu3"].by_activation
    rows, cols = refs["relu3"].rows_cols(top)
    real = px[top.ids.T]
    real_pos = torch.stack([rows.T, cols.T], 2)
    t_path, _ = timed(
        lambda: path_check(
            model, graph, "relu3", torch.arange(16), real[:, 0], real_pos[:, 0], real, real_pos, px[-64:]
        )
    )

    paired = {
        k: med([v / e for v, e in zip(rec[k], rec["epoch"], strict=True)])
        for k in ("explain", "explain_lrp", "ablation", "references", "heatmaps")
    }
    fit_share = {k: paired[k] * KEPT_EPOCHS / SEED_EPOCHS for k in ("ablation", "references", "heatmaps")}
    m = machine()
    md = [
        "# Issue 24's analysis core on SmallCNN: cost and peers",
        "",
        f"One `experiment=seed` epoch (`callbacks=none`, training + validation on the 10k test set): "
        f"**{med(rec['epoch']):.1f} s** (median of {repeats}); validation accuracy after it "
        f"{med(rec['test_acc']):.3f}. Each piece ran right after its epoch, on the model that epoch trained.",
        "",
        "| piece | median time | share | goal |",
        "|---|---:|---:|---|",
        f"| attribution, 6 lecture images (Grad-CAM + IG, predicted and true class) | {med(rec['explain']):.3f} s | "
        f"{100 * paired['explain']:.2f}% of an epoch | <= 1% |",
        f"| attribution with LRP, the same images and classes (Grad-CAM + LRP) | {med(rec['explain_lrp']):.3f} s | "
        f"{100 * paired['explain_lrp']:.2f}% of an epoch | <= 1% |",
        f"| ablation, 128 units x {probe_n} probe images | {med(rec['ablation']):.2f} s | "
        f"{100 * fit_share['ablation']:.2f}% of the fit at {KEPT_EPOCHS} kept epochs | <= 5% |",
        f"| relevance references (top-8 by relevance and activation), {probe_n} images | "
        f"{med(rec['references']):.2f} s | {100 * fit_share['references']:.2f}% of the fit at {KEPT_EPOCHS} kept "
        "epochs | <= 5% (with heatmaps) |",
        f"| conditional heatmaps of 128 x 8 relevance references | {med(rec['heatmaps']):.2f} s | "
        f"{100 * fit_share['heatmaps']:.2f}% of the fit | (in the line above) |",
        f"| path check, relu3's 16 units vs 8 real + 64 arbitrary images (end of fit, once) | {t_path:.2f} s | "
        f"{100 * t_path / (SEED_EPOCHS * med(rec['epoch'])):.2f}% of the fit | - |",
        "",
        f"Integrated Gradients reached completeness within {100 * max(rec['ig_max_gap']):.2f}% on every row of every "
        f"repeat, with at most {int(max(rec['ig_max_steps']))} Gauss-Legendre steps (starting at 32, doubling only the "
        f"rows above 1%). Relevance and activation references shared {100 * med(rec['overlap']):.0f}% of their images "
        f"(mean over the units with references, median over repeats; at most {int(max(rec['no_references']))} of the "
        "128 units had none: they never fired on the probe).",
        "",
        "Peers on the same inputs, interleaved (median seconds per call; Grad-CAM and LRP: 5 x 4 calls per repeat, "
        "IG: 3 x 1, ablation: 1; lower is better). LRP's relevance differs from zennit's by at most "
        f"{max(rec['lrp_max_diff']):.1e} (largest absolute difference, every repeat):",
        "",
        "| computation | cnnfeat | peer | cnnfeat / peer |",
        "|---|---:|---:|---:|",
    ]
    for label, ours, theirs in (
        ("Grad-CAM at relu3, 12 (image, class) pairs (Captum)", "gradcam_ours", "gradcam_captum"),
        ("Integrated Gradients, 12 pairs x 64 steps (Captum)", "ig_ours", "ig_captum"),
        ("LRP epsilon-plus-flat, 12 pairs (zennit)", "lrp_ours", "lrp_zennit"),
        (
            f"ablation of relu2 (6) + relu5 (100) units, {peer_n} images (Captum)",
            "ablation_subset_ours",
            "ablation_subset_captum",
        ),
    ):
        ratio = med([a / b for a, b in zip(rec[ours], rec[theirs], strict=True)])  # paired: interleaved calls
        md.append(f"| {label} | {med(rec[ours]):.3f} s | {med(rec[theirs]):.3f} s | {ratio:.2f}x |")
    md += [
        "",
        "Scaling of ablation: cost = probe images x (1 + layers whose inputs are copied + sum over layers of units x "
        "the share of a forward pass each unit's copy reruns), in forward passes of one image (`ablation_cost`; a "
        "path around a layer, as in ResNet's blocks, makes its copies whole passes); the bounded default "
        "(`bounded_units`, "
        f"budget {DEFAULT_BUDGET:g} forward passes per image) samples the same share of every layer's units, at "
        "least one per layer; `budget=None` lifts it. Estimates from each traced graph:",
        "",
        "| network | layers | units | cost per image, all units | units within budget | cost per image, bounded |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    scale = scaling()
    for s in scale:
        md.append(
            f"| {s['network']} | {s['nodes']} | {s['units']} | {s['cost_all']:.1f} | {s['units_bounded']} | "
            f"{s['cost_bounded']:.1f} |"
        )
    md.append(
        f"\n{m['machine']} CPU, {m['threads']} torch threads, {m['cpu_count']} cores shared with other jobs, torch "
        f"{m['torch']}; {repeats} repeat(s){' (smoke)' if args.smoke else ''}. Times carry the machine's load; the "
        "shares pair each piece with the epoch measured just before it."
    )
    stem = "attribution" + ("_smoke" if args.smoke else "")
    write_markdown(stem, md, echo=False)
    write_json(
        stem, {"meta": m, "records": rec, "paired_share_of_epoch": paired, "path_check_s": t_path, "scaling": scale}
    )
    print("\n".join(md))


if __name__ == "__main__":
    main()
