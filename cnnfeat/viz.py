"""Tensor-to-picture helpers: colour maps, nearest upscaling and grids (no Lightning, no plotting state).

Every function returns float RGB images (3,H,W) in [0, 1], ready for ``SummaryWriter.add_image`` or PNG.
Colour conventions used across cnnfeat:
  * signed values (filter weights, pre-ReLU maps): diverging ``RdBu_r``, symmetric around 0,
    so 0 is white, negative blue, positive red; the scale is the largest |value| shown together;
  * non-negative values (post-ReLU maps): ``viridis`` from 0 to the largest value shown together;
  * images: grey, 0 = black.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid, save_image

GRID_PAD_VALUE = 0.35  # dark grey gaps, visible against white (zero) cells


@cache
def _lut(name: str) -> torch.Tensor:
    import matplotlib  # imported on first use: it costs start-up time when no picture is drawn

    return torch.tensor(matplotlib.colormaps[name](torch.linspace(0, 1, 256).numpy())[:, :3], dtype=torch.float32)


def check_finite(x: torch.Tensor, what: str) -> None:
    """Refuse to draw NaN or infinity: no colour says "not a number", so such a picture would pass for data
    (callers skip those pictures and say so; reaching this is a bug)."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{what}: {bad} of {x.numel()} values are NaN or infinite; they cannot be drawn as data")


def colormap(x: torch.Tensor, name: str) -> torch.Tensor:
    """Values in [0, 1] of shape (..., H, W) -> RGB (..., 3, H, W) through a matplotlib colour map (NaN refused)."""
    check_finite(x, f"colormap {name}")
    idx = (x.detach().float().clamp(0, 1) * 255).round().long().cpu()
    return _lut(name)[idx].movedim(-1, -3)


def diverging(x: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Signed values -> RdBu_r RGB, 0 = white; ``scale`` (broadcastable) is the |value| drawn saturated."""
    x = x.detach().float().cpu()
    check_finite(x, "diverging")
    if scale is None:
        scale = x.abs().max()
    scale = torch.as_tensor(scale, dtype=torch.float32).clamp(min=1e-12)
    return colormap(x / scale / 2 + 0.5, "RdBu_r")


def sequential(x: torch.Tensor, vmax: torch.Tensor | float | None = None) -> torch.Tensor:
    """Non-negative values -> viridis RGB from 0 to ``vmax`` (default: the maximum of ``x``)."""
    x = x.detach().float().cpu()
    check_finite(x, "sequential")
    if vmax is None:
        vmax = x.max()
    vmax = torch.as_tensor(vmax, dtype=torch.float32).clamp(min=1e-12)
    return colormap(x / vmax, "viridis")


def grey(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] with 1 channel (..., 1, H, W) -> RGB (..., 3, H, W) (NaN refused)."""
    check_finite(x, "grey")
    x = x.detach().float().cpu().clamp(0, 1)
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:]) if x.shape[-3] == 1 else x


def upscale(x: torch.Tensor, min_size: int) -> torch.Tensor:
    """Nearest-neighbour upscaling of (N,C,H,W) by the integer factor that makes H at least ``min_size``."""
    factor = max(1, math.ceil(min_size / x.shape[-2]))
    return x if factor == 1 else F.interpolate(x, scale_factor=factor, mode="nearest")


def grid(cells: torch.Tensor, nrow: int, min_cell: int = 32, padding: int = 2) -> torch.Tensor:
    """Tile RGB cells (N,3,h,w), upscaled to at least ``min_cell`` pixels, ``nrow`` per row."""
    return make_grid(upscale(cells, min_cell), nrow=nrow, padding=padding, pad_value=GRID_PAD_VALUE)


#: single-channel filters per row of ``filter_grid`` (SmallCNN's 6 and 16 fit one row)
SINGLE_ROW = 16


def filter_grid(
    weight: torch.Tensor, per: str = "layer", min_cell: int = 24, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Conv weights (out,in,kh,kw) as an out x in grid of diverging cells (when in == 1: one row of up to
    ``SINGLE_ROW`` filters, wrapped into rows of that many beyond, so ResNet's 64 grey stem filters stay readable).

    ``per="layer"`` scales by the largest |w| of the layer (filters comparable to each other);
    ``per="filter"`` scales each output filter by its own largest |w| (shape of weak filters visible).
    ``scale`` overrides the per-layer scale (e.g. the whole layer's when ``weight`` is a subset).
    """
    if per not in ("layer", "filter"):
        raise ValueError(f"per must be 'layer' or 'filter', got {per!r}")
    w = weight.detach().float().cpu()
    out_c, in_c = w.shape[:2]
    if per == "filter":
        scale = w.abs().amax(dim=(1, 2, 3), keepdim=True)
    elif scale is None:
        scale = w.abs().amax()
    cells = diverging(w, scale).reshape(out_c * in_c, 3, *w.shape[-2:])
    return grid(cells, nrow=in_c if in_c > 1 else min(out_c, SINGLE_ROW), min_cell=min_cell)


def kernel_grid(kernels: torch.Tensor, scale: torch.Tensor | float | None = None, min_cell: int = 24) -> torch.Tensor:
    """One filter's in-channel kernels (in,kh,kw) as a square grid of diverging cells."""
    k = kernels.detach().float().cpu()
    return grid(diverging(k, scale), nrow=math.ceil(math.sqrt(len(k))), min_cell=min_cell)


def rgb_filter_grid(weight: torch.Tensor, per: str = "filter", nrow: int = 8, min_cell: int = 44) -> torch.Tensor:
    """Conv weights (out,3,kh,kw) as RGB pictures (AlexNet conv1), grey = 0, symmetric scaling."""
    w = weight.detach().float().cpu()
    check_finite(w, "rgb_filter_grid")
    scale = w.abs().amax(dim=(1, 2, 3), keepdim=True) if per == "filter" else w.abs().amax()
    return grid((w / scale.clamp(min=1e-12) / 2 + 0.5).clamp(0, 1), nrow=nrow, min_cell=min_cell)


def map_grid(
    maps: torch.Tensor, signed: bool, per_channel: bool = True, nrow: int = 8, min_cell: int = 56
) -> torch.Tensor:
    """Feature maps of one image (C,H,W): diverging if ``signed`` (pre-ReLU) else viridis.

    ``per_channel`` scales each map by its own largest |value| (structure of weak channels visible, as
    ``imshow`` does); otherwise one scale is shared by all channels (strengths comparable).
    """
    maps = maps.detach().float().cpu()
    scale = maps.abs().amax(dim=(1, 2), keepdim=True) if per_channel else maps.abs().amax()
    cells = diverging(maps, scale) if signed else sequential(maps, scale)
    return grid(cells, nrow=min(nrow, len(maps)), min_cell=min_cell)


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def caption(image: torch.Tensor, text: str, size: int = 13) -> torch.Tensor:
    """Add a black strip with white ``text`` under an RGB image (3,H,W); returns (3,H+strip,W')."""
    font = _font(size)
    _, _, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    _, h, w = image.shape
    width = max(w, right + 6)
    strip = Image.new("RGB", (width, bottom + 6))
    ImageDraw.Draw(strip).text((3, 3), text, font=font, fill=(255, 255, 255))
    strip_t = torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1).float() / 255
    body = image.new_zeros(3, h, width)
    body[:, :, (width - w) // 2 : (width - w) // 2 + w] = image.detach().float().cpu()
    return torch.cat([body, strip_t], dim=1)


def save_png(image: torch.Tensor, path: Path | str) -> Path:
    """Write an RGB (3,H,W) image in [0, 1] as PNG, creating the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)
    return path


def class_colors(n: int) -> np.ndarray:
    """``n`` distinct RGB colours in [0, 1] (matplotlib's tab10, then tab20)."""
    import matplotlib

    base = matplotlib.colormaps["tab10" if n <= 10 else "tab20"].colors
    return np.array([base[i % len(base)] for i in range(n)], dtype=np.float32)


def scatter_panel(
    xy: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    title: str,
    size: int = 400,
    limit: float = 3.0,
    radius: int = 2,
    legend: bool = True,
) -> torch.Tensor:
    """A scatter plot of 2-D points coloured by class, drawn straight into pixels (no figure machinery).

    Axes are fixed to ``[-limit, limit]`` on both sides (points beyond are drawn on the border), so
    frames of normalised maps are comparable. Points are drawn in a fixed shuffled order so that no
    class always lies on top. Returns RGB (3,H,W) with a title strip and, optionally, a class legend.
    """
    img = np.ones((size, size, 3), dtype=np.float32)
    colors = class_colors(len(class_names))
    order = np.random.default_rng(0).permutation(len(xy))
    px = np.clip(np.round((xy[order, 0] + limit) / (2 * limit) * (size - 1)), 0, size - 1).astype(int)
    py = np.clip(np.round((limit - xy[order, 1]) / (2 * limit) * (size - 1)), 0, size - 1).astype(int)
    c = colors[np.asarray(labels)[order]]
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy <= radius * radius + 1:
                img[np.clip(py + dy, 0, size - 1), np.clip(px + dx, 0, size - 1)] = c
    img[[0, -1], :] = img[:, [0, -1]] = 0.6  # frame
    canvas = Image.fromarray((img * 255).astype(np.uint8))
    font = _font(14)
    title_h, legend_w = (
        24,
        (max(ImageDraw.Draw(canvas).textbbox((0, 0), n, font=font)[2] for n in class_names) + 30 if legend else 0),
    )
    out = Image.new("RGB", (size + legend_w, size + title_h), (255, 255, 255))
    out.paste(canvas, (0, title_h))
    draw = ImageDraw.Draw(out)
    draw.text((4, 4), title, font=font, fill=(0, 0, 0))
    if legend:
        for i, name in enumerate(class_names):
            y0 = title_h + 8 + i * 20
            draw.rectangle([size + 8, y0 + 2, size + 20, y0 + 14], fill=tuple(int(255 * v) for v in colors[i]))
            draw.text((size + 26, y0), name, font=font, fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).float() / 255


def hstack(images: list[torch.Tensor], gap: int = 8) -> torch.Tensor:
    """Put RGB images (3,H,W) side by side on white, top-aligned."""
    h = max(i.shape[1] for i in images)
    w = sum(i.shape[2] for i in images) + gap * (len(images) - 1)
    out = torch.ones(3, h, w)
    x = 0
    for i in images:
        out[:, : i.shape[1], x : x + i.shape[2]] = i
        x += i.shape[2] + gap
    return out
