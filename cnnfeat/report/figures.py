"""Figures drawn from finished runs (TensorBoard event files), e.g. the dying-ReLU multirun.

python -m cnnfeat.report.figures dead-relu outputs/multirun/DATE/TIME [-o dead_relu.png]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from omegaconf import OmegaConf

from cnnfeat import tags
from cnnfeat.report.events import read_scalars  # the one event reader (a resumed run's newer write of a step wins)

__all__ = ["dead_relu_figure", "main", "multirun_jobs", "read_scalars"]

log = logging.getLogger("cnnfeat")


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
    prefix, every = tags.DEAD_FRACTION.prefix, tags.DEAD_FRACTION_ALL.name  # relu/dead_fraction/<node>, .../all
    series = {label: read_scalars(job, prefix) for label, job in jobs.items()}
    if not any(series.values()):
        raise ValueError(f"No {prefix}* scalars under {sweep_dir}: was the dead_relu callback on?")
    layer_names = sorted({t.removeprefix(prefix) for s in series.values() for t in s} - {every.removeprefix(prefix)})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.3]})
    width = 0.8 / len(series)
    for k, (label, sc) in enumerate(series.items()):
        values = [v for _, v in sc.get(every, [])]
        ax1.plot(range(len(values)), values, marker="o", label=label)  # steps sorted: 0 = untrained
        final = [sc[prefix + n][-1][1] if prefix + n in sc else 0.0 for n in layer_names]
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
        prog="python -m cnnfeat.report.figures",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
