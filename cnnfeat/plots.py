"""Pictures of the layer-learning numbers (CKA heatmaps, probe accuracy, unit rasters) as RGB tensors.

Every function returns a float tensor (3, H, W) in [0, 1], ready for ``SummaryWriter.add_image``. Matplotlib
is imported inside the functions (it costs start-up time) and used through its object API with the Agg
canvas, so no global backend is switched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _to_tensor(fig) -> torch.Tensor:
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255)


def heatmap(
    values: torch.Tensor,
    row_labels: Sequence[object],
    col_labels: Sequence[object],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    cbar_label: str = "CKA",
    vmin: float = 0.0,
    vmax: float = 1.0,
    annotate: bool | None = None,
) -> torch.Tensor:
    """A (rows, cols) matrix as a heatmap: row 0 at the top, labelled ticks, a colour bar, NaN cells grey.

    ``annotate`` writes each value in its cell (default: when both sides have at most 12 entries).
    """
    v = torch.as_tensor(values, dtype=torch.float64).cpu().numpy()
    if v.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"values {v.shape} do not match {len(row_labels)} row and {len(col_labels)} column labels")
    rows, cols = v.shape
    annotate = max(rows, cols) <= 12 if annotate is None else annotate
    fig = _figure(min(2.5 + 0.55 * cols, 14), min(1.6 + 0.45 * rows, 12))
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="0.8")
    im = ax.imshow(np.ma.masked_invalid(v), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    tilt = cols > 8 or cols * max((len(str(c)) for c in col_labels), default=0) > 40
    ax.set_xticks(range(cols), [str(c) for c in col_labels], **({"rotation": 30, "ha": "right"} if tilt else {}))
    ax.set_yticks(range(rows), [str(r) for r in row_labels])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.colorbar(im, ax=ax, label=cbar_label)
    if annotate:
        for i in range(rows):
            for j in range(cols):
                if np.isfinite(v[i, j]):
                    dark = (v[i, j] - vmin) / max(vmax - vmin, 1e-12) < 0.6
                    ax.text(j, i, f"{v[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if dark else "k")
    return _to_tensor(fig)


def line_chart(
    x: Sequence[object],
    series: Mapping[str, Sequence[float]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
    reference: float | None = None,
    reference_label: str = "",
    legend_title: str = "",
) -> torch.Tensor:
    """One line per series over categorical or numeric ``x``; a colour ramp when there are many series."""
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    from matplotlib import colormaps

    ramp = colormaps["viridis"] if len(series) > 10 else None
    pos = list(range(len(x)))
    for i, (label, ys) in enumerate(series.items()):
        color = ramp(i / max(len(series) - 1, 1)) if ramp is not None else None
        ax.plot(pos, list(ys), marker="o", markersize=3, label=str(label), color=color)
    if reference is not None:
        ax.axhline(reference, color="0.5", linestyle="--", linewidth=1, label=reference_label or None)
    ax.set_xticks(pos, [str(v) for v in x])
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=legend_title or None, title_fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _to_tensor(fig)


def accuracy_vs_depth(
    accuracy: Mapping[int, Sequence[float]], layers: Sequence[str], chance: float | None = None
) -> torch.Tensor:
    """Linear-probe test accuracy against layer depth, one line per epoch (``{epoch: [acc per layer]}``)."""
    return line_chart(
        layers,
        {f"epoch {e}": a for e, a in accuracy.items()},
        title="Linear probe accuracy by depth",
        xlabel="layer (input to output)",
        ylabel="probe test accuracy",
        ylim=(0.0, 1.02),
        reference=chance,
        reference_label="chance",
    )


def unit_raster(alive: torch.Tensor, epochs: Sequence[int], layer: str = "") -> torch.Tensor:
    """Units x epochs raster of one layer: alive (fired on the probe set) or dead, per recorded epoch."""
    from matplotlib.colors import ListedColormap

    a = torch.as_tensor(alive).bool().cpu().numpy()
    if a.ndim != 2 or a.shape[1] != len(epochs):
        raise ValueError(f"alive must be (units, {len(epochs)} epochs), got {a.shape}")
    units = a.shape[0]
    fig = _figure(min(3.0 + 0.35 * len(epochs), 14), min(2.0 + 0.05 * units, 9))
    ax = fig.add_subplot()
    im = ax.imshow(
        a.astype(float),
        cmap=ListedColormap(["#d62728", "#dddddd"]),
        vmin=0,
        vmax=1,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
    step = max(1, units // 20)
    ax.set_yticks(range(0, units, step))
    dead = int((~a[:, -1]).sum()) if a.size else 0
    ax.set(
        xlabel="epoch (0 = untrained)",
        ylabel="unit (channel / neuron)",
        title=f"{layer}: {dead} of {units} units dead at epoch {epochs[-1]}" if len(epochs) else layer,
    )
    bar = fig.colorbar(im, ax=ax, ticks=[0.25, 0.75], fraction=0.05)
    bar.ax.set_yticklabels(["dead", "alive"])
    return _to_tensor(fig)
