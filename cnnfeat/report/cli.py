"""A run's static HTML report: an overview page and one page per layer with a card for every unit.

    cnnfeat-report outputs/runs/DATE/TIME-PID            # -> outputs/runs/DATE/TIME-PID/report/index.html
    cnnfeat-report outputs/runs/DATE/TIME-PID -o DIR     # -> DIR/index.html (DIR: new, empty, or a previous report)
    cnnfeat-report outputs/multirun/DATE/TIME-PID        # every job's report, and an index of the jobs side by side

Everything is read from the run directory: ``status.json``, the config (``.hydra/``, else Lightning's
``hparams.yaml``), the TensorBoard event files (scalars; the images of the representation callbacks, found by tag
prefix), ``umap_embedding.gif``, the atlas (``cnnfeat.atlas``, written by ``AtlasCallback``) and ``explored.json``
(``cnnfeat-explore``: which epochs it drew). Only regular files inside the run directory are read: a symbolic link, a
FIFO or a file reached through a linked folder is skipped and named (a warning, and a note on the page), never
followed, embedded or copied. Pages are plain HTML with inline CSS and SVG charts, no script, no font or file from the
network, so the folder opens from ``file://`` and from any static host. Unit anchors are ``<layer>.html#c<k>`` (conv
channel k) and ``#n<k>`` (neuron k of a fully connected layer); file names depend only on node names and unit
indices, so links survive regeneration.

The report is built in a temporary folder beside its destination and moved in at the end. It writes a marker file,
``.cnnfeat-report``, listing its files; the destination must be new, empty, or a previous report holding only the
files it wrote: any other folder is refused (exit code 2) and nothing in it is removed or replaced.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cnnfeat.errors import CnnfeatError, ConfigError
from cnnfeat.report.pages import write_report
from cnnfeat.report.sweep import is_sweep, write_sweep_report

log = logging.getLogger("cnnfeat")


def report_at_end(run_dir: Path | str) -> Path | None:
    """For the end of ``cnnfeat-train``/``cnnfeat-explore``: write the report, and log instead of failing the run."""
    try:
        return write_report(run_dir)
    except (CnnfeatError, OSError) as e:
        log.warning("No report for %s: %s", run_dir, e)
        return None


def main(argv: list[str] | None = None) -> None:
    """``cnnfeat-report PATH``: a run directory's report, or a multirun's job reports and their index."""
    p = argparse.ArgumentParser(
        prog="cnnfeat-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("path", type=Path, help="a run directory (outputs/runs/...) or a multirun (outputs/multirun/...)")
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        help="report folder (default: PATH/report); it must be new, empty, or a previous report",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = args.path
        if not path.exists():
            raise ConfigError(f"{path}: no such directory")
        if not path.is_dir():
            raise ConfigError(f"{path} is {'a file' if path.is_file() else 'not a folder'}, not a run directory")
        index = write_sweep_report(path, out=args.out) if is_sweep(path) else write_report(path, args.out)
    except CnnfeatError as e:
        print(f"cnnfeat-report: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(index)
