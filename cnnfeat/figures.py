"""Figures drawn from finished runs (TensorBoard event files), e.g. the dying-ReLU multirun.

python -m cnnfeat.figures dead-relu outputs/multirun/DATE/TIME [-o dead_relu.png]
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

DEAD_PREFIX = "relu/dead_fraction/"
log = logging.getLogger("cnnfeat")


def read_scalars(run_dir: Path | str, prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """All scalars under ``run_dir`` whose tag starts with ``prefix``: ``{tag: [(step, value), ...]}`` by step."""
    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True)):
        ea = EventAccumulator(f, size_guidance={"scalars": 0})
        ea.Reload()
        for tag in ea.Tags().get("scalars", []):
            if tag.startswith(prefix):
                out.setdefault(tag, []).extend((e.step, e.value) for e in ea.Scalars(tag))
    return {t: sorted(v) for t, v in out.items()}


def multirun_jobs(sweep_dir: Path | str) -> dict[str, Path]:
    """Job directories of a Hydra multirun, labelled by the overrides that differ between jobs.

    A job that is a symbolic link is left out (with a warning): what it points at is not part of the sweep. A job's
    ``.hydra/overrides.yaml`` is read only as a regular file inside the job (``cnnfeat.report.RunFiles``); a job
    without a readable list of overrides is labelled by its number."""
    from cnnfeat.report import RunFiles

    sweep_dir = Path(sweep_dir)
    jobs = []
    for p in sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        if p.is_symlink():
            log.warning("%s: a symbolic link; skipped (a sweep's jobs are its own folders)", p)
        elif p.is_dir():
            jobs.append(p)
    if not jobs:
        raise FileNotFoundError(f"No multirun jobs (numbered subdirectories) in {sweep_dir}")
    overrides = {}
    for job in jobs:
        files = RunFiles(job)
        text = files.read_text(job / ".hydra" / "overrides.yaml")
        try:
            value = OmegaConf.to_container(OmegaConf.create(text)) if text is not None else None
        except Exception:  # a foreign or broken file: label the job by its number
            value = None
        if text is not None and not (isinstance(value, list) and all(isinstance(o, str) for o in value)):
            log.warning("%s/.hydra/overrides.yaml is not a list of overrides; job labelled by its number", job)
            value = None
        overrides[job] = value if value is not None else [job.name]
    common = set.intersection(*(set(o) for o in overrides.values()))
    return {" ".join(o for o in ov if o not in common) or job.name: job for job, ov in overrides.items()}


def dead_relu_figure(sweep_dir: Path | str, out: Path | str) -> Path:
    """Dead fraction per epoch (all ReLUs) and per layer after the last epoch, one colour per job."""
    jobs = multirun_jobs(sweep_dir)
    series = {label: read_scalars(job, DEAD_PREFIX) for label, job in jobs.items()}
    if not any(series.values()):
        raise ValueError(f"No {DEAD_PREFIX}* scalars under {sweep_dir}: was the dead_relu callback on?")
    layer_names = sorted({t.removeprefix(DEAD_PREFIX) for s in series.values() for t in s} - {"all"})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.3]})
    width = 0.8 / len(series)
    for k, (label, sc) in enumerate(series.items()):
        values = [v for _, v in sc.get(DEAD_PREFIX + "all", [])]
        ax1.plot(range(len(values)), values, marker="o", label=label)  # steps sorted: 0 = untrained
        final = [sc[DEAD_PREFIX + n][-1][1] if DEAD_PREFIX + n in sc else 0.0 for n in layer_names]
        ax2.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(layer_names))], final, width, label=label)
    ax1.set(
        xlabel="epochs trained (0 = untrained)",
        ylabel="dead fraction (all ReLU units)",
        ylim=(-0.03, 1.03),
        title="Units that never fire on 2,000 test images",
    )
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xticks(range(len(layer_names)), layer_names)
    ax2.set(ylabel="dead fraction after the last epoch", ylim=(0, 1.05), title="Per ReLU layer")
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m cnnfeat.figures", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="figure", required=True)
    d = sub.add_parser("dead-relu", help="dead-ReLU fraction of every job of a multirun")
    d.add_argument("sweep_dir", type=Path)
    d.add_argument("-o", "--out", type=Path, default=None, help="PNG path (default: SWEEP_DIR/dead_relu.png)")
    args = p.parse_args(argv)
    out = dead_relu_figure(args.sweep_dir, args.out or args.sweep_dir / "dead_relu.png")
    print(out)


if __name__ == "__main__":
    main()
