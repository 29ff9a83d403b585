"""A multirun's report: each job's report, and an index of the jobs side by side."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cnnfeat import tags
from cnnfeat.errors import CnnfeatError, ConfigError
from cnnfeat.report.data import _KNN_ACC, _TEST_ACC, _TRAIN_ACC, _VAL_ACC, RunData, _number
from cnnfeat.report.files import REPORT_DIR, RunFiles
from cnnfeat.report.html import esc, img_tag, page, pct, svg_chart, table
from cnnfeat.report.output import _build, report_folder
from cnnfeat.report.pages import write_report

log = logging.getLogger("cnnfeat")


def sweep_jobs(sweep_dir: Path) -> dict[str, Path]:
    """A multirun's job directories labelled by their differing overrides (``cnnfeat.report.figures.multirun_jobs``)."""
    from cnnfeat.report.figures import multirun_jobs

    return multirun_jobs(sweep_dir)


def is_sweep(path: Path) -> bool:
    """A folder of numbered job folders that is not itself a run: a run has ``status.json``, ``.hydra/`` or event files
    at its top (TensorBoard's Projector writes a numbered folder, ``00015/``, into a run)."""
    try:
        return (
            path.is_dir()
            and any(p.is_dir() and p.name.isdigit() for p in path.iterdir())
            and not any(os.path.lexists(path / marker) for marker in ("status.json", ".hydra"))
            and not any(path.glob("events.out.tfevents.*"))
        )
    except OSError:
        return False


def write_sweep_report(sweep_dir: Path | str, jobs_too: bool = True, out: Path | str | None = None) -> Path:
    """Each job's report (``jobs_too``), then ``<sweep dir>/report/index.html`` (or ``out/index.html``) linking them
    side by side. A job that cannot be read or reported is skipped with a warning."""
    sweep_dir = Path(sweep_dir)
    dest = Path(out) if out is not None else sweep_dir / REPORT_DIR
    target = report_folder(dest)
    try:
        jobs = sweep_jobs(sweep_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    columns = []
    for label, job in jobs.items():
        try:
            d = RunData.read(job)
        except CnnfeatError as e:
            log.warning("No report for job %s: %s", job, e)
            continue
        index = None
        if jobs_too:
            try:
                index = write_report(job)
            except CnnfeatError as e:
                log.warning("No report for job %s: %s", job, e)
        elif (job / REPORT_DIR / "index.html").is_file():
            index = job / REPORT_DIR / "index.html"
        columns.append((label, job, index, d))
    out_abs = target

    def rel(path: Path) -> str:
        return os.path.relpath(os.path.abspath(path), out_abs)

    head = ["", *[f"job {esc(job.name)}" for _, job, _, _ in columns]]
    rows: list[list[str]] = [
        ["overrides", *[esc(label) for label, _, _, _ in columns]],
        ["report", *[f'<a href="{esc(rel(index))}">open</a>' if index else "&ndash;" for _, _, index, _ in columns]],
        [
            "status",
            *[(esc(d.status["status"]) if d.status and "status" in d.status else "&ndash;") for _, _, _, d in columns],
        ],
    ]
    for key in (_VAL_ACC, _TEST_ACC, _TRAIN_ACC, tags.DEAD_FRACTION_ALL.name, _KNN_ACC):
        vals = [_number(((d.status or {}).get("metrics") or {}).get(key)) for _, _, _, d in columns]
        if any(v is not None for v in vals):
            rows.append([esc(key), *[pct(v) for v in vals]])
    curves = []
    for _, job, _, d in columns:
        series = {t: sorted(d.per_epoch(t).items()) for t in (_TRAIN_ACC, _VAL_ACC) if t in d.scalars}
        curves.append(svg_chart(series, f"job {job.name}", "epoch", "accuracy", width=360, height=220))
    rows.append(["accuracy", *curves])
    thumbs = []
    for _, job, index, d in columns:
        gif = index.parent / "assets" / "umap_embedding.gif" if index is not None else None
        if d.gif_size is not None and gif is not None and gif.is_file():
            w, h = d.gif_size
            thumbs.append(img_tag(rel(gif), f"UMAP of job {job.name}", (h, w), "smooth", 300 / max(w, 1)))
        else:
            thumbs.append("&ndash;")
    if any(t != "&ndash;" for t in thumbs):
        rows.append(["UMAP", *thumbs])
    summary = sweep_dir / "summary.md"
    body = (
        f"<p>{len(columns)} jobs of <code>{esc(sweep_dir.resolve())}</code>, side by side.</p>"
        + table(head, rows)
        + (f"<p><a href='{esc(rel(summary))}'>summary.md</a></p>" if RunFiles(sweep_dir).ok(summary) else "")
    )
    text = page(f"cnnfeat sweep · {sweep_dir.name}", body)
    _build(target, lambda tmp: (tmp / "index.html").write_text(text, encoding="utf-8"))
    log.info("Sweep report: %s", dest / "index.html")
    return dest / "index.html"
