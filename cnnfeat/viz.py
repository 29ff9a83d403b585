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

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid, save_image

GRID_PAD_VALUE = 0.35  # dark grey gaps, visible against white (zero) cells


@cache
def _lut(name: str) -> torch.Tensor:
    return torch.tensor(
        matplotlib.colormaps[name](torch.linspace(0, 1, 256).numpy())[:, :3], dtype=torch.float32
    )


def colormap(x: torch.Tensor, name: str) -> torch.Tensor:
    """Values in [0, 1] of shape (..., H, W) -> RGB (..., 3, H, W) through a matplotlib colour map."""
    idx = (x.detach().float().clamp(0, 1) * 255).round().long().cpu()
    return _lut(name)[idx].movedim(-1, -3)


def diverging(x: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """Signed values -> RdBu_r RGB, 0 = white; ``scale`` (broadcastable) is the |value| drawn saturated."""
    x = x.detach().float().cpu()
    if scale is None:
        scale = x.abs().max()
    scale = torch.as_tensor(scale, dtype=torch.float32).clamp(min=1e-12)
    return colormap(x / scale / 2 + 0.5, "RdBu_r")


def sequential(x: torch.Tensor, vmax: torch.Tensor | float | None = None) -> torch.Tensor:
    """Non-negative values -> viridis RGB from 0 to ``vmax`` (default: the maximum of ``x``)."""
    x = x.detach().float().cpu()
    if vmax is None:
        vmax = x.max()
    vmax = torch.as_tensor(vmax, dtype=torch.float32).clamp(min=1e-12)
    return colormap(x / vmax, "viridis")


def grey(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] with 1 channel (..., 1, H, W) -> RGB (..., 3, H, W)."""
    x = x.detach().float().cpu().clamp(0, 1)
    return x.expand(*x.shape[:-3], 3, *x.shape[-2:]) if x.shape[-3] == 1 else x


def upscale(x: torch.Tensor, min_size: int) -> torch.Tensor:
    """Nearest-neighbour upscaling of (N,C,H,W) by the integer factor that makes H at least ``min_size``."""
    factor = max(1, math.ceil(min_size / x.shape[-2]))
    return x if factor == 1 else F.interpolate(x, scale_factor=factor, mode="nearest")


def grid(cells: torch.Tensor, nrow: int, min_cell: int = 32, padding: int = 2) -> torch.Tensor:
    """Tile RGB cells (N,3,h,w), upscaled to at least ``min_cell`` pixels, ``nrow`` per row."""
    return make_grid(upscale(cells, min_cell), nrow=nrow, padding=padding, pad_value=GRID_PAD_VALUE)


def filter_grid(weight: torch.Tensor, per: str = "layer", min_cell: int = 24) -> torch.Tensor:
    """Conv weights (out,in,kh,kw) as an out x in grid of diverging cells (one row when in == 1).

    ``per="layer"`` scales by the largest |w| of the layer (filters comparable to each other);
    ``per="filter"`` scales each output filter by its own largest |w| (shape of weak filters visible).
    """
    if per not in ("layer", "filter"):
        raise ValueError(f"per must be 'layer' or 'filter', got {per!r}")
    w = weight.detach().float().cpu()
    out_c, in_c = w.shape[:2]
    scale = w.abs().amax() if per == "layer" else w.abs().amax(dim=(1, 2, 3), keepdim=True)
    cells = diverging(w, scale).reshape(out_c * in_c, 3, *w.shape[-2:])
    return grid(cells, nrow=in_c if in_c > 1 else out_c, min_cell=min_cell)


def rgb_filter_grid(
    weight: torch.Tensor, per: str = "filter", nrow: int = 8, min_cell: int = 44
) -> torch.Tensor:
    """Conv weights (out,3,kh,kw) as RGB pictures (AlexNet conv1), grey = 0, symmetric scaling."""
    w = weight.detach().float().cpu()
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
