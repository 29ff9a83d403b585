"""A run's static HTML report (``cnnfeat-report``; what it does and reads: ``cnnfeat.report.cli``), split by job:

- ``files``: what of a run directory may be read (``RunFiles``: regular files inside it, no link followed);
- ``data``: what a run holds (``RunData``, ``Explored``, the atlas checked against its manifest);
- ``draw``: the pictures (cells, grids, colour maps: arrays in, arrays out);
- ``html``: HTML pieces (page, table, inline SVG charts, escaping);
- ``pages``: the overview, the layer pages and the attribution / importance pages of one run (``write_report``);
- ``output``: the report folder, written beside its destination and moved in, with its marker;
- ``sweep``: a multirun's job reports and their index;
- ``cli``: the command line (``main``) and the report at the end of a run (``report_at_end``).

Arrows point one way (files <- data <- pages <- sweep <- cli); the report reads run folders and knows no callback.
"""

from __future__ import annotations

from cnnfeat.report.cli import main, report_at_end
from cnnfeat.report.data import EXPLORED, IMAGE_PREFIXES, Explored, RunData
from cnnfeat.report.draw import crop_image, diverging, image_cell, kernel_cell, labelled, row_labelled
from cnnfeat.report.files import REPORT_DIR, RunFiles
from cnnfeat.report.html import CSS, PALETTE, esc, fmt, img_tag, page, pct, svg_chart, table, thumb_row
from cnnfeat.report.output import MARKER, ReportWriteError, report_folder
from cnnfeat.report.pages import write_report
from cnnfeat.report.sweep import is_sweep, sweep_jobs, write_sweep_report

__all__ = [
    "CSS",
    "EXPLORED",
    "IMAGE_PREFIXES",
    "MARKER",
    "PALETTE",
    "REPORT_DIR",
    "Explored",
    "ReportWriteError",
    "RunData",
    "RunFiles",
    "crop_image",
    "diverging",
    "esc",
    "fmt",
    "image_cell",
    "img_tag",
    "is_sweep",
    "kernel_cell",
    "labelled",
    "main",
    "page",
    "pct",
    "report_at_end",
    "report_folder",
    "row_labelled",
    "svg_chart",
    "sweep_jobs",
    "table",
    "thumb_row",
    "write_report",
    "write_sweep_report",
]
