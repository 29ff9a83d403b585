"""HTML pieces of the report: the page frame and its CSS, escaping, numbers, tables, inline SVG charts and images."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#222;
background:#fafafa;line-height:1.4}
header{background:#263238;color:#fff;padding:10px 20px}header a{color:#cfe8ff}
nav{font-size:14px}nav a{margin-right:10px}
main{padding:12px 20px;max-width:1400px}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:22px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:0 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border:1px solid #ddd;padding:2px 7px;text-align:right}th{background:#eee}td.l,th.l{text-align:left}
pre{background:#fff;border:1px solid #ddd;padding:8px;font-size:12px;overflow:auto;max-height:420px}
img{image-rendering:pixelated}img.smooth{image-rendering:auto}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px;scroll-margin-top:10px}
.card:target{outline:3px solid #ffb300}
.card figure{margin:4px 0 8px}.card img{max-width:100%;height:auto}.card figcaption,.muted{font-size:12px;color:#666}
.row{display:flex;gap:12px;align-items:flex-start;flex-wrap:wrap}
.badge{display:inline-block;font-size:11px;border-radius:9px;padding:1px 7px;margin-left:4px;vertical-align:middle}
.ok{background:#e3f4e1;color:#1b5e20}.dead{background:#fde2e1;color:#b71c1c}
.flag{background:#fff0c2;color:#8a5300;border:1px solid #e0a800}
.bars{font-size:11px;margin:4px 0}.bar{display:flex;align-items:center;gap:4px;height:13px}
.bar span.n{width:78px;text-align:right;overflow:hidden;white-space:nowrap;color:#444}
.bar span.b{height:10px;display:inline-block}.bar span.c{color:#666}
.tl{display:flex;gap:1px;margin:3px 0}.tl span{width:12px;height:12px;display:inline-block}
.tl .a{background:#66bb6a}.tl .d{background:#e53935}
.thumbs{display:flex;flex-wrap:wrap;gap:4px}.thumbs a{text-decoration:none;font-size:10px;color:#555;text-align:center}
.flagged img{outline:2px solid #e0a800}
.explored{background:#fff8e1;border-left:3px solid #e0a800;padding:4px 10px}
.callout{background:#f3f7fb;border-left:3px solid #1f77b4;padding:4px 10px;font-size:13px}
.figs{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.figs figure{margin:0}
svg text{font-family:system-ui,sans-serif}
"""


def esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def page(title: str, body: str, nav: str = "") -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><nav>{nav}</nav></header><main>{body}</main></body></html>\n"
    )


def fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "&ndash;"
    return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def pct(v: float | None) -> str:
    return "&ndash;" if v is None or not math.isfinite(v) else f"{100 * v:.2f}%"


def table(head: Sequence[str] | None, rows: Iterable[Sequence[object]], left: int = 1) -> str:
    """A table of raw HTML cells (escape text first); the first ``left`` columns align left; no header if None."""
    th = "".join(f'<th class="{"l" if i < left else ""}">{esc(h)}</th>' for i, h in enumerate(head or []))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table>{f'<tr>{th}</tr>' if th else ''}{body}</table>"


def svg_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
    width: int = 520,
    height: int = 270,
) -> str:
    """Lines (with points) as an inline SVG: axes with ticks, a legend at the right; no script."""
    pts = [(x, y) for s in series.values() for x, y in s if _plottable(y)]
    if not pts:
        return f'<p class="muted">{esc(title)}: no values</p>'
    left, right, top, bottom = 52, 150, 24, 38
    pw, ph = width - left - right, height - top - bottom
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = ylim if ylim is not None else (min(ys), max(ys))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:  # a constant: centre it
        y0, y1 = (y0 - 0.5, y1 + 0.5) if y0 == 0 else (y0 - abs(y0) / 2, y1 + abs(y1) / 2)
    if ylim is None:
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (min(max(y, y0), y1) - y0) / (y1 - y0)) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{esc(title)}">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="{left}" y="15" font-size="13" font-weight="bold">{esc(title)}</text>',
    ]
    yticks, ydec = _ticks(y0, y1)
    for t in yticks:
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{t:.{ydec}f}</text>')
    xticks, xdec = _ticks(x0, x1, integer=all(float(x).is_integer() for x in xs))
    for t in xticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#888"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 15}" font-size="10" text-anchor="middle">{t:.{xdec}f}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" font-size="11" text-anchor="middle">{esc(xlabel)}</text>')
    out.append(
        f'<text x="12" y="{top + ph / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + ph / 2})">{esc(ylabel)}</text>'
    )
    for i, (label, s) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        good = [(x, y) for x, y in s if _plottable(y)]
        if len(good) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        for x, y in good:
            out.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.3" fill="{color}"><title>{esc(label)}: '
                f"{fmt(x)}, {fmt(y)}</title></circle>"
            )
        ly = top + 10 + 15 * i
        out.append(
            f'<line x1="{left + pw + 10}" x2="{left + pw + 26}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/>'
        )
        out.append(f'<text x="{left + pw + 30}" y="{ly + 4}" font-size="11">{esc(label[:22])}</text>')
    out.append("</svg>")
    return "".join(out)


def _plottable(y: float) -> bool:
    """A value a chart can place: finite, and small enough that differences of two stay finite."""
    return math.isfinite(y) and abs(y) < 1e300


def _ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> tuple[list[float], int]:
    """About ``n`` round tick values in [lo, hi], and the decimals that tell them apart."""
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step) * step
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if round(step / mag, 6) == 2.5 else 0)
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)], decimals


def thumb_row(thumbs: list[tuple[str, str, tuple[int, int], bool]], page_: str, layer: str, side: int) -> str:
    """Small optimised inputs linking to their unit cards (``page_#anchor``); flagged ones outlined."""
    return (
        "<div class='thumbs'>"
        + "".join(
            f'<a href="{esc(page_)}#{aid}" class="{"flagged" if flagged else ""}" title="{esc(layer)} {aid}">'
            f"{img_tag(src, f'{layer} {aid} optimised input', size, scale=side / max(size))}<br>{aid}</a>"
            for aid, src, size, flagged in thumbs
        )
        + "</div>"
    )


def img_tag(src: str, alt: str, size: tuple[int, int] | None = None, cls: str = "", scale: float = 1.0) -> str:
    wh = f' width="{round(size[1] * scale)}" height="{round(size[0] * scale)}"' if size else ""
    c = f' class="{cls}"' if cls else ""
    return f'<img src="{esc(src)}" alt="{esc(alt)}"{wh}{c}>'
