"""A compression report people can read: one self-contained HTML page and three PNG charts.

:func:`render_report_html` turns the report that :func:`dns_core.artifacts.write_artifacts` builds
into a single HTML file (inline CSS, charts as inline SVG; no scripts, fonts or links to fetch), and
:func:`render_chart_pngs` draws the same charts as PNG images with a small rasteriser and encoder
of its own (numpy canvas, zlib), so no plotting library is needed.

Every string taken from the report is escaped; the report may hold names chosen by users.
"""

from __future__ import annotations

import html
import itertools
import math
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

Point = tuple[float, float]

_BLUE = "#2563eb"
_GREEN = "#16a34a"
_GREY = "#d1d5db"
_INK = "#1f2937"

# ---------------------------------------------------------------------------------------------
# reading the report


def _num(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, not a number, NaN, infinite)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def history_series(report: Mapping[str, Any], key: str) -> list[Point]:
    """(iteration, value) for every history point of ``report`` that has a number under ``key``."""
    points: list[Point] = []
    history = report.get("history")
    if not isinstance(history, list):
        return points
    for entry in history:
        if not isinstance(entry, Mapping):
            continue
        x, y = _num(entry.get("iteration")), _num(entry.get(key))
        if x is not None and y is not None:
            points.append((x, y))
    return points


def _layers(report: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(name, kept, total) of each pruned layer."""
    out: list[tuple[str, int, int]] = []
    layers = report.get("layers")
    if not isinstance(layers, list):
        return out
    for layer in layers:
        if not isinstance(layer, Mapping):
            continue
        kept, total = _num(layer.get("kept")), _num(layer.get("total"))
        out.append((str(layer.get("name", "?")), int(kept or 0), int(total or 0)))
    return out


# ---------------------------------------------------------------------------------------------
# formatting


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt_ratio(value: Any) -> str:
    """A compression rate as shown on the page, e.g. ``25.3×``."""
    v = _num(value)
    return "–" if v is None else f"{v:,.1f}×"


def _fmt_int(value: Any) -> str:
    v = _num(value)
    return "–" if v is None else f"{int(v):,}"


def _fmt_acc(value: Any) -> str:
    v = _num(value)
    return "–" if v is None else f"{v:.2f} %"


def _fmt_pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.2f} %" if whole else "–"


def _accuracy_row(before: Any, after: Any) -> str:
    b, a = _num(before), _num(after)
    if b is None and a is None:
        return "–"
    text = f"{_fmt_acc(b)} → {_fmt_acc(a)}"
    if a is not None and b is not None:
        text += f" (Δ {a - b:+.2f} pp)"
    return text


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 × 10^k apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 5.0, 10.0) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks = []
    k = 0
    while True:
        t = first + k * step
        ticks.append(round(t, 12))
        if t >= hi - 1e-9 * step:
            break
        k += 1
    return ticks


def _tick_label(value: float, ticks: Sequence[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = 0 if step >= 1 else min(6, math.ceil(-math.log10(step) - 1e-9))
    return f"{value:.{decimals}f}"


def _fmt_setting(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt_setting(v)}" for k, v in value.items()) or "–"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt_setting(v) for v in value) + "]"
    return "–" if value is None else str(value)


# ---------------------------------------------------------------------------------------------
# SVG charts

_W, _H = 640, 280
_ML, _MR, _MT, _MB = 64, 20, 30, 46  # margins: left, right, top, bottom


class _Frame:
    """Maps data coordinates to pixels inside a chart's plot area."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], width: int, height: int) -> None:
        self.xt = nice_ticks(min(xs), max(xs))
        self.yt = nice_ticks(min(ys), max(ys))
        self.x0, self.x1 = _ML, width - _MR
        self.y0, self.y1 = height - _MB, _MT  # y grows downwards on screen

    def px(self, x: float) -> float:
        lo, hi = self.xt[0], self.xt[-1]
        return self.x0 + (x - lo) / (hi - lo) * (self.x1 - self.x0)

    def py(self, y: float) -> float:
        lo, hi = self.yt[0], self.yt[-1]
        return self.y0 - (y - lo) / (hi - lo) * (self.y0 - self.y1)


def _svg_no_data(title: str) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
        f'aria-label="{_e(title)}: no data">'
        f'<rect x="0.5" y="0.5" width="{_W - 1}" height="{_H - 1}" fill="#f9fafb" stroke="{_GREY}"/>'
        f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" class="nodata">no data</text></svg>'
    )


def svg_line_chart(
    points: Sequence[Point],
    *,
    title: str,
    x_label: str,
    y_label: str,
    y_floor: float | None = None,
    reference: float | None = None,
    reference_label: str = "",
    color: str = _BLUE,
) -> str:
    """An inline SVG line chart of ``points`` with ticked, labelled axes; "no data" when empty."""
    if not points:
        return _svg_no_data(title)
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    extra = [v for v in (y_floor, reference) if v is not None]
    f = _Frame([*xs, 0.0], ys + extra, _W, _H)
    parts = [
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" aria-label="{_e(title)}">',
        f'<rect x="{f.x0}" y="{f.y1}" width="{f.x1 - f.x0}" height="{f.y0 - f.y1}" fill="#fff"/>',
    ]
    for t in f.yt:
        y = f.py(t)
        parts.append(f'<line x1="{f.x0}" y1="{y:.1f}" x2="{f.x1}" y2="{y:.1f}" stroke="#eef0f3"/>')
        parts.append(f'<line x1="{f.x0 - 5}" y1="{y:.1f}" x2="{f.x0}" y2="{y:.1f}" stroke="{_INK}"/>')
        parts.append(
            f'<text x="{f.x0 - 8}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_e(_tick_label(t, f.yt))}</text>'
        )
    for t in f.xt:
        x = f.px(t)
        parts.append(f'<line x1="{x:.1f}" y1="{f.y0}" x2="{x:.1f}" y2="{f.y0 + 5}" stroke="{_INK}"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{f.y0 + 18}" text-anchor="middle" class="tick">{_e(_tick_label(t, f.xt))}</text>'
        )
    parts.append(
        f'<path d="M{f.x0},{f.y1} V{f.y0} H{f.x1}" fill="none" stroke="{_INK}" class="axes"/>'
        f'<text x="{(f.x0 + f.x1) / 2}" y="{_H - 8}" text-anchor="middle" class="label">{_e(x_label)}</text>'
        f'<text x="14" y="{(f.y0 + f.y1) / 2}" text-anchor="middle" class="label" '
        f'transform="rotate(-90 14 {(f.y0 + f.y1) / 2})">{_e(y_label)}</text>'
        f'<text x="{f.x0}" y="18" class="title">{_e(title)}</text>'
    )
    if reference is not None:
        y = f.py(reference)
        parts.append(
            f'<line x1="{f.x0}" y1="{y:.1f}" x2="{f.x1}" y2="{y:.1f}" stroke="#9ca3af" stroke-dasharray="5 4"/>'
            f'<text x="{f.x1 - 4}" y="{y - 5:.1f}" text-anchor="end" class="tick">{_e(reference_label)}</text>'
        )
    coords = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in points)
    parts.append(
        f'<polyline class="series" data-points="{len(points)}" points="{coords}" fill="none" '
        f'stroke="{color}" stroke-width="2" stroke-linejoin="round"/>'
    )
    if len(points) <= 60:
        parts.extend(f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="2.5" fill="{color}"/>' for x, y in points)
    parts.append("</svg>")
    return "".join(parts)


def svg_layer_bars(layers: Sequence[tuple[str, int, int]]) -> str:
    """Per layer: a grey bar for the parameters before (the total), a green one for those kept."""
    title = "Parameters per layer: before (total) and after (kept)"
    if not layers:
        return _svg_no_data(title)
    name_w, bar_w, right = 160, 360, 190
    row, top = 30, 34
    width, height = name_w + bar_w + right, top + row * len(layers) + 26
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{_e(title)}">',
        f'<text x="0" y="18" class="title">{_e(title)}</text>',
    ]
    for i, (name, kept, total) in enumerate(layers):
        y = top + i * row
        frac = kept / total if total else 0.0
        parts.append(
            f'<text x="{name_w - 8}" y="{y + 16}" text-anchor="end" class="tick">{_e(name)}</text>'
            f'<rect class="before" x="{name_w}" y="{y + 2}" width="{bar_w}" height="18" fill="{_GREY}"/>'
            f'<rect class="after" x="{name_w}" y="{y + 2}" width="{bar_w * frac:.1f}" height="18" fill="{_GREEN}"/>'
            f'<text x="{name_w + bar_w + 8}" y="{y + 16}" class="tick">'
            f"{_e(f'{kept:,} / {total:,} ({_fmt_pct(kept, total)})')}</text>"
        )
    y = top + row * len(layers) + 14
    parts.append(
        f'<rect x="{name_w}" y="{y - 9}" width="10" height="10" fill="{_GREY}"/>'
        f'<text x="{name_w + 14}" y="{y}" class="tick">before: all weights (100 %)</text>'
        f'<rect x="{name_w + 190}" y="{y - 9}" width="10" height="10" fill="{_GREEN}"/>'
        f'<text x="{name_w + 204}" y="{y}" class="tick">after: kept</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# the page

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2937;
max-width:980px;margin:2rem auto;padding:0 1rem;line-height:1.4}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #e5e7eb}
.sub{color:#6b7280;margin-top:0}
table{border-collapse:collapse;margin:.5rem 0;font-size:.92rem}
th,td{border:1px solid #e5e7eb;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f9fafb;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:.85em;word-break:break-all}
.ok{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}
svg.chart{max-width:100%;height:auto;display:block;margin:.5rem 0}
svg text{font-family:inherit}svg .tick{font-size:11px;fill:#374151}svg .label{font-size:12px;fill:#111827}
svg .title{font-size:13px;font-weight:600;fill:#111827}svg .nodata{font-size:16px;fill:#9ca3af}
footer{margin-top:2rem;color:#6b7280;font-size:.85rem}
"""


def _table(rows: Sequence[tuple[str, str]], *, raw_values: bool = False) -> str:
    """Two-column table; labels are always escaped, values too unless ``raw_values`` (already markup)."""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v if raw_values else _e(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _summary_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, markup) rows of the summary; every piece of report text in the markup is escaped."""
    rows: list[tuple[str, str]] = []
    total, nonzero = report.get("total_parameters"), report.get("nonzero_parameters")
    rows.append(
        (
            "Compression (parameters)",
            f"<strong>{_e(fmt_ratio(report.get('compression')))}</strong> "
            f"({_e(_fmt_int(total))} → {_e(_fmt_int(nonzero))} non-zero)",
        )
    )
    nbytes = report.get("bytes")
    if isinstance(nbytes, Mapping):
        rows.append(
            (
                "Compression (bytes)",
                f"{_e(fmt_ratio(nbytes.get('compression')))} ({_e(_fmt_int(nbytes.get('dense_parameters')))} B dense "
                f"→ {_e(_fmt_int(nbytes.get('sparse_file')))} B sparse file)",
            )
        )
    rows.append(("Validation accuracy", _e(_accuracy_row(report.get("reference_val_acc"), report.get("val_acc")))))
    rows.append(("Test accuracy", _e(_accuracy_row(report.get("reference_test_acc"), report.get("test_acc")))))
    target = report.get("target")
    if isinstance(target, Mapping):
        rows.append(("Target", _e(_fmt_setting({k: v for k, v in target.items() if v is not None}))))
    if "budget_met" in report:
        met = report.get("budget_met")
        if met is None:
            rows.append(("Accuracy budget", "not checked (no budget or no accuracy to check)"))
        else:
            cls, word = ("ok", "met") if met else ("bad", "not met")
            rows.append(("Accuracy budget", f'<span class="{cls}">{word}</span>'))
    rows.append(("Iterations", _e(_fmt_int(report.get("iterations")))))
    seconds = _num(report.get("seconds"))
    rows.append(("Time", "–" if seconds is None else _e(f"{seconds:,.1f} s")))
    backoffs = f"{_fmt_int(report.get('backoffs'))}"
    if report.get("restored_last_good"):
        backoffs += " (restored the last good state)"
    rows.append(("Back-offs", _e(backoffs)))
    codec = report.get("value_codec")
    if isinstance(codec, Mapping):
        text = f"{codec.get('codec', '?')}: {codec.get('file', '?')}, {_fmt_int(codec.get('bytes'))} B, "
        text += f"{fmt_ratio(codec.get('compression'))}"
        if codec.get("clusters") is not None:
            text += f", {codec.get('clusters')} clusters"
        for key, label in (("val_acc", "validation"), ("test_acc", "test")):
            if _num(codec.get(key)) is not None:
                text += f"; {label} {_fmt_acc(codec.get(key))}"
        rows.append(("Value codec", _e(text)))
    for key, label in (("data", "Data"), ("job_id", "Job"), ("model_id", "Model id"), ("dataset_id", "Dataset id")):
        if report.get(key) is not None:
            rows.append((label, _e(report[key])))
    return rows


def _layer_table(layers: Sequence[tuple[str, int, int]]) -> str:
    if not layers:
        return "<p>No pruned layers.</p>"
    head = "<tr><th>Layer</th><th>Total</th><th>Kept</th><th>Kept %</th><th>Compression</th></tr>"
    body = "".join(
        f'<tr><td>{_e(name)}</td><td class="n">{total:,}</td><td class="n">{kept:,}</td>'
        f'<td class="n">{_e(_fmt_pct(kept, total))}</td>'
        f'<td class="n">{_e(fmt_ratio(total / kept) if kept else "all pruned")}</td></tr>'
        for name, kept, total in layers
    )
    return f"<table>{head}{body}</table>"


def _files_table(files: Any, caption: str) -> str:
    if not isinstance(files, Mapping) or not files:
        return f"<p>No {_e(caption)}.</p>"
    head = "<tr><th>Name</th><th>Bytes</th><th>sha256</th></tr>"
    body = ""
    for name, rec in files.items():
        rec = rec if isinstance(rec, Mapping) else {}
        body += (
            f'<tr><td>{_e(name)}</td><td class="n">{_e(_fmt_int(rec.get("bytes")))}</td>'
            f"<td><code>{_e(rec.get('sha256', '–'))}</code></td></tr>"
        )
    return f"<table>{head}{body}</table>"


def render_report_html(report: Mapping[str, Any]) -> str:
    """One self-contained HTML page for ``report`` (inline CSS and SVG; nothing to fetch)."""
    method = str(report.get("method", "compression"))
    model = report.get("arch") or report.get("format") or "model"
    ratio = fmt_ratio(report.get("compression"))
    layers = _layers(report)
    compression = history_series(report, "compression")
    accuracy = history_series(report, "val_acc")
    ref_val = _num(report.get("reference_val_acc"))
    title = f"{method} on {model}: {ratio}"
    data = f" for {report['data']}" if report.get("data") else ""
    sections = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(method)} · {_e(model)} · {_e(ratio)}</h1>",
        f'<p class="sub">Dynamic Network Surgery report{_e(data)}</p>',
        "<h2>Summary</h2>",
        _table(_summary_rows(report), raw_values=True),
        "<h2>Compression over training</h2>",
        svg_line_chart(
            compression,
            title="Compression (×) by iteration",
            x_label="iteration",
            y_label="compression (×)",
            y_floor=1.0,
        ),
        "<h2>Validation accuracy over training</h2>",
        svg_line_chart(
            accuracy,
            title="Validation accuracy (%) by iteration",
            x_label="iteration",
            y_label="accuracy (%)",
            reference=ref_val,
            reference_label="" if ref_val is None else f"dense {ref_val:.2f} %",
            color=_GREEN,
        ),
        "<h2>Layers</h2>",
        svg_layer_bars(layers),
        _layer_table(layers),
        "<h2>Files</h2>",
        _files_table(report.get("outputs"), "output files"),
        "<p>report.json and this page are not listed: a file cannot hold its own checksum.</p>",
    ]
    if isinstance(report.get("inputs"), Mapping) and report["inputs"]:
        sections += ["<h3>Inputs</h3>", _files_table(report["inputs"], "input files")]
    sections.append("<footer><h2>Settings</h2>")
    for key, label in (("train", "Training"), ("settings", "Method settings"), ("config", "Model config")):
        value = report.get(key)
        if isinstance(value, Mapping) and value:
            sections += [f"<h3>{_e(label)}</h3>", _table([(str(k), _fmt_setting(v)) for k, v in value.items()])]
    versions = report.get("versions")
    if isinstance(versions, Mapping) and versions:
        sections += ["<h3>Versions</h3>", _table([(str(k), _fmt_setting(v)) for k, v in versions.items()])]
    sections.append("</footer></body></html>")
    return "\n".join(sections) + "\n"


# ---------------------------------------------------------------------------------------------
# PNG: a tiny rasteriser and encoder

Canvas = NDArray[np.uint8]

# 5x7 glyphs: digits and the few characters tick labels and "NO DATA" need.
_FONT: dict[str, tuple[str, ...]] = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
    ".": ("00000", "00000", "00000", "00000", "00000", "01100", "01100"),
    "-": ("00000", "00000", "00000", "11111", "00000", "00000", "00000"),
    "%": ("11000", "11001", "00010", "00100", "01000", "10011", "00011"),
    " ": ("00000",) * 7,
    "N": ("10001", "11001", "10101", "10011", "10001", "10001", "10001"),
    "O": ("01110", "10001", "10001", "10001", "10001", "10001", "01110"),
    "D": ("11110", "10001", "10001", "10001", "10001", "10001", "11110"),
    "A": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "T": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
}
_RGB = {
    "white": (255, 255, 255),
    "ink": (31, 41, 55),
    "grid": (238, 240, 243),
    "grey": (209, 213, 219),
    "dash": (156, 163, 175),
    "blue": (37, 99, 235),
    "green": (22, 163, 74),
}


def _canvas(width: int, height: int) -> Canvas:
    return np.full((height, width, 3), 255, dtype=np.uint8)


def _rect(c: Canvas, x0: float, y0: float, x1: float, y1: float, rgb: tuple[int, int, int]) -> None:
    """Fill the pixels [x0, x1) × [y0, y1), clipped to the canvas."""
    h, w = c.shape[:2]
    a, b = max(0, round(x0)), min(w, round(x1))
    top, bottom = max(0, round(y0)), min(h, round(y1))
    if a < b and top < bottom:
        c[top:bottom, a:b] = rgb


def _line(c: Canvas, x0: float, y0: float, x1: float, y1: float, rgb: tuple[int, int, int], width: int = 1) -> None:
    """A straight line, sampled one pixel per step along its longer axis, ``width`` pixels thick."""
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.rint(np.linspace(x0, x1, n + 1)).astype(np.int64)
    ys = np.rint(np.linspace(y0, y1, n + 1)).astype(np.int64)
    h, w = c.shape[:2]
    lo = -(width // 2)
    for dy in range(lo, lo + width):
        for dx in range(lo, lo + width):
            px, py = xs + dx, ys + dy
            ok = (px >= 0) & (px < w) & (py >= 0) & (py < h)
            c[py[ok], px[ok]] = rgb


def _text(c: Canvas, x: float, y: float, text: str, rgb: tuple[int, int, int], scale: int = 1,
          anchor: str = "left") -> None:  # fmt: skip
    """Draw ``text`` (characters the 5x7 font lacks are skipped) with its top at ``y``."""
    chars = [ch for ch in text.upper() if ch in _FONT]
    advance = 6 * scale
    width = len(chars) * advance - scale
    if anchor == "right":
        x -= width
    elif anchor == "middle":
        x -= width / 2
    x, y = math.floor(x + 0.5), math.floor(y + 0.5)  # whole pixels, so every glyph cell is one pixel
    for i, ch in enumerate(chars):
        for r, bits in enumerate(_FONT[ch]):
            for col, bit in enumerate(bits):
                if bit == "1":
                    left, top = x + i * advance + col * scale, y + r * scale
                    _rect(c, left, top, left + scale, top + scale, rgb)


def _png_no_data(c: Canvas) -> None:
    h, w = c.shape[:2]
    _line(c, 0, 0, w - 1, 0, _RGB["grey"])
    _line(c, 0, h - 1, w - 1, h - 1, _RGB["grey"])
    _line(c, 0, 0, 0, h - 1, _RGB["grey"])
    _line(c, w - 1, 0, w - 1, h - 1, _RGB["grey"])
    _text(c, w / 2, h / 2 - 7, "no data", _RGB["dash"], scale=2, anchor="middle")


def png_line_chart(
    points: Sequence[Point],
    *,
    y_floor: float | None = None,
    reference: float | None = None,
    color: str = "blue",
    width: int = _W,
    height: int = _H,
) -> Canvas:
    """The line chart as an RGB canvas: axes, ticks with numeric labels, grid, the series."""
    c = _canvas(width, height)
    if not points:
        _png_no_data(c)
        return c
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    extra = [v for v in (y_floor, reference) if v is not None]
    f = _Frame([*xs, 0.0], ys + extra, width, height)
    for t in f.yt:
        y = f.py(t)
        _line(c, f.x0, y, f.x1, y, _RGB["grid"])
        _line(c, f.x0 - 5, y, f.x0, y, _RGB["ink"])
        _text(c, f.x0 - 8, y - 3, _tick_label(t, f.yt), _RGB["ink"], anchor="right")
    for t in f.xt:
        x = f.px(t)
        _line(c, x, f.y0, x, f.y0 + 5, _RGB["ink"])
        _text(c, x, f.y0 + 9, _tick_label(t, f.xt), _RGB["ink"], anchor="middle")
    if reference is not None:
        y = f.py(reference)
        for x in range(int(f.x0), int(f.x1), 9):
            _line(c, x, y, min(x + 5, f.x1), y, _RGB["dash"])
    _line(c, f.x0, f.y1, f.x0, f.y0, _RGB["ink"])
    _line(c, f.x0, f.y0, f.x1, f.y0, _RGB["ink"])
    pix = [(f.px(x), f.py(y)) for x, y in points]
    for (ax, ay), (bx, by) in itertools.pairwise(pix):
        _line(c, ax, ay, bx, by, _RGB[color], width=2)
    if len(pix) == 1:
        _rect(c, pix[0][0] - 2, pix[0][1] - 2, pix[0][0] + 3, pix[0][1] + 3, _RGB[color])
    return c


def png_layer_bars(layers: Sequence[tuple[str, int, int]], width: int = _W) -> Canvas:
    """Per layer (top to bottom, in the report's order): total in grey, kept in green, kept % to the right."""
    if not layers:
        c = _canvas(width, 120)
        _png_no_data(c)
        return c
    row, top, left, right = 26, 16, 24, 90
    c = _canvas(width, top * 2 + row * len(layers))
    bar_w = width - left - right
    for i, (_name, kept, total) in enumerate(layers):
        y = top + i * row
        frac = kept / total if total else 0.0
        _rect(c, left, y, left + bar_w, y + 18, _RGB["grey"])
        _rect(c, left, y, left + bar_w * frac, y + 18, _RGB["green"])
        _text(c, left + bar_w + 8, y + 5, f"{100 * frac:.2f}%", _RGB["ink"])
    _line(c, left, top - 4, left, top + row * len(layers) - 4, _RGB["ink"])
    return c


def encode_png(image: Canvas) -> bytes:
    """An 8-bit RGB PNG of ``image`` (height × width × 3, uint8): IHDR, one IDAT, IEND."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("encode_png wants a height × width × 3 uint8 array")
    height, width = image.shape[:2]
    rows = np.zeros((height, 1 + width * 3), dtype=np.uint8)  # filter byte 0 (None) on every row
    rows[:, 1:] = image.reshape(height, width * 3)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def render_chart_pngs(report: Mapping[str, Any]) -> dict[str, bytes]:
    """``compression.png``, ``accuracy.png`` and ``layers.png`` for ``report``, as PNG bytes."""
    ref_val = _num(report.get("reference_val_acc"))
    return {
        "compression.png": encode_png(png_line_chart(history_series(report, "compression"), y_floor=1.0)),
        "accuracy.png": encode_png(png_line_chart(history_series(report, "val_acc"), reference=ref_val, color="green")),
        "layers.png": encode_png(png_layer_bars(_layers(report))),
    }
