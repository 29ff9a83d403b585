"""The report's pictures: cells, grids and colour maps (arrays in, arrays out), and PNG files of them."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _save(arr: np.ndarray, path: Path) -> Path:
    """Write an (H, W, 3) uint8 array (or (H, W)) as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, compress_level=6)
    return path


@cache
def _lut(name: str) -> np.ndarray:
    import matplotlib  # the colour tables cnnfeat.viz uses

    return (matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def diverging(values: np.ndarray, scale: float) -> np.ndarray:
    """Signed values -> RdBu_r RGB uint8 (..., 3), 0 = white, ``scale`` saturated (the project's filter colours)."""
    idx = np.clip(np.round((values / max(scale, 1e-12) / 2 + 0.5) * 255), 0, 255).astype(np.int64)
    return _lut("RdBu_r")[idx]


def _up(arr: np.ndarray, factor: int) -> np.ndarray:
    return arr if factor <= 1 else np.repeat(np.repeat(arr, factor, axis=0), factor, axis=1)


def _grid(cells: list[np.ndarray], cols: int, gap: int = 1, fill: int = 160) -> np.ndarray:
    """Tile equal-size (h, w, 3) cells, ``cols`` per row, with ``gap`` grey pixels between them."""
    h, w = cells[0].shape[:2]
    rows = math.ceil(len(cells) / cols)
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), fill, np.uint8)
    for i, c in enumerate(cells):
        r, k = divmod(i, cols)
        out[r * (h + gap) : r * (h + gap) + h, k * (w + gap) : k * (w + gap) + w] = c
    return out


def labelled(cells: list[np.ndarray], labels: list[str], per_row: int, gap: int = 6) -> np.ndarray:
    """Small multiples: cells (h, w, 3) left to right, ``per_row`` a row, each with its label underneath."""
    font = _font(11)
    h = max(c.shape[0] for c in cells)
    w = max(c.shape[1] for c in cells)
    label_w = max(int(font.getlength(t)) for t in labels) if labels else 0
    w = max(w, label_w)
    cols = min(per_row, len(cells))
    rows = math.ceil(len(cells) / cols)
    cell_h = h + 14
    canvas = Image.new("RGB", (cols * (w + gap) - gap, rows * (cell_h + gap) - gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (c, t) in enumerate(zip(cells, labels, strict=True)):
        r, k = divmod(i, cols)
        x, y = k * (w + gap), r * (cell_h + gap)
        canvas.paste(Image.fromarray(c), (x + (w - c.shape[1]) // 2, y))
        draw.text((x + (w - font.getlength(t)) / 2, y + h + 1), t, font=font, fill=(60, 60, 60))
    return np.asarray(canvas)


def row_labelled(rows: list[np.ndarray], labels: list[str], gap: int = 4) -> np.ndarray:
    """Rows (h, w, 3) stacked top to bottom with a label at the left of each."""
    font = _font(11)
    lw = max(int(font.getlength(t)) for t in labels) + 6
    w = max(r.shape[1] for r in rows)
    h = sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)
    canvas = Image.new("RGB", (lw + w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for r, t in zip(rows, labels, strict=True):
        canvas.paste(Image.fromarray(r), (lw, y))
        draw.text((0, y + r.shape[0] / 2 - 6), t, font=font, fill=(60, 60, 60))
        y += r.shape[0] + gap
    return np.asarray(canvas)


def kernel_cell(w: np.ndarray, scale: float, budget: int = 150) -> np.ndarray:
    """One unit's incoming weights at one step as a picture: RGB for 3 input channels, else a near-square grid of
    its input channels' kernels (conv) or of its weight vector (fc), diverging around 0."""
    if w.ndim == 3 and w.shape[0] == 3:  # RGB filter (AlexNet conv1): grey = 0
        rgb = np.clip(np.round((w / max(scale, 1e-12) / 2 + 0.5) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        return _up(rgb, max(1, budget // 2 // max(rgb.shape[:2])))
    if w.ndim == 1:  # a fully connected unit: its weights as a near-square grid, row by row
        side = math.ceil(math.sqrt(len(w)))
        padded = np.full(side * side, np.nan)
        padded[: len(w)] = w
        rgb = diverging(np.nan_to_num(padded.reshape(side, side)), scale)
        rgb[np.isnan(padded.reshape(side, side))] = 200
        return _up(rgb, max(1, min(6, budget // side)))
    k = w.shape[-1]
    cols = math.ceil(math.sqrt(w.shape[0]))
    px = max(1, min(8, budget // (cols * (k + 1))))
    cells = [_up(diverging(kernel, scale), px) for kernel in w]
    return _grid(cells, cols, gap=1 if px > 1 else 0)


def crop_image(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Cut ``box`` (top, left, bottom, right; inclusive) out of a (C, H, W) image, zero outside it."""
    top, left, bottom, right = box
    c, h, w = img.shape
    out = np.zeros((c, bottom - top + 1, right - left + 1), dtype=img.dtype)
    t, l_, b, r = max(top, 0), max(left, 0), min(bottom, h - 1), min(right, w - 1)
    if t <= b and l_ <= r:
        out[:, t - top : b - top + 1, l_ - left : r - left + 1] = img[:, t : b + 1, l_ : r + 1]
    return out


def image_cell(img: np.ndarray, min_side: int) -> np.ndarray:
    """A (C, h, w) uint8 image -> (h', w', 3), nearest-upscaled so its side is at least ``min_side``."""
    rgb = np.repeat(img, 3, axis=0) if img.shape[0] == 1 else img[:3]
    rgb = rgb.transpose(1, 2, 0)
    return _up(np.ascontiguousarray(rgb), math.ceil(min_side / max(rgb.shape[:2])))
