"""A compression report people can read: one self-contained HTML page and three PNG charts.

:func:`render_report_html` turns the report that :func:`dns_core.artifacts.write_artifacts` builds
into a single HTML file (inline CSS, charts as inline SVG; no scripts, fonts or links to fetch), and
:func:`render_chart_pngs` writes the same charts as PNG images. matplotlib draws them (its object
API: the Agg canvas for PNG, the SVG backend for the page; no pyplot, no global backend).

Every string taken from the report is escaped; the report may hold names chosen by users, which
the charts show as plain text (never as mathtext).
"""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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


def _records(report: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    """The mappings in the list under ``key`` (none when it is missing or not a list; other items skipped)."""
    items = report.get(key)
    return [item for item in items if isinstance(item, Mapping)] if isinstance(items, list) else []


def history_series(report: Mapping[str, Any], key: str) -> list[Point]:
    """(iteration, value) for every history point of ``report`` that has a number under ``key``."""
    points: list[Point] = []
    for entry in _records(report, "history"):
        x, y = _num(entry.get("iteration")), _num(entry.get(key))
        if x is not None and y is not None:
            points.append((x, y))
    return points


def _layers(report: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(name, kept, total) of each pruned layer."""
    out: list[tuple[str, int, int]] = []
    for layer in _records(report, "layers"):
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


def _fmt_setting(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt_setting(v)}" for k, v in value.items()) or "–"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt_setting(v) for v in value) + "]"
    return "–" if value is None else str(value)


# ---------------------------------------------------------------------------------------------
# charts (matplotlib)

_SIZE = (6.4, 2.8)  # inches at 100 dpi: 640 × 280 pixels
_DPI = 100
#: Settings while a chart is drawn and saved: text in SVG stays text (no embedded glyphs), every
#: point of a series stays a vertex (no path simplification), ids and files are reproducible.
_RC: dict[Any, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.edgecolor": _INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "path.simplify": False,
    "svg.fonttype": "none",
    "svg.hashsalt": "netsurgery-report",
}


@contextmanager
def _style() -> Iterator[None]:
    with matplotlib.rc_context(_RC):
        yield


def _figure(height: float = _SIZE[1]) -> Figure:
    fig = Figure(figsize=(_SIZE[0], height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the figure draws with Agg (PNG); savefig(format="svg") switches on its own
    return fig


def _no_data(title: str) -> Figure:
    fig = _figure()
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title, loc="left")
    ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=14, color="#9ca3af", transform=ax.transAxes)
    return fig


def line_chart(
    points: Sequence[Point],
    *,
    title: str,
    x_label: str,
    y_label: str,
    y_floor: float | None = None,
    reference: float | None = None,
    reference_label: str = "",
    color: str = _BLUE,
) -> Figure:
    """``points`` as a line (with dots when there are few) on ticked, labelled axes; "no data" when empty.

    The line's SVG id is ``series``. ``y_floor`` and ``reference`` (a dashed line) stay in view.
    """
    if not points:
        return _no_data(title)
    fig = _figure()
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(axis="y", color="#eef0f3")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    ax.plot(xs, ys, color=color, linewidth=2, marker="o" if len(points) <= 60 else None, markersize=3,
            gid="series")  # fmt: skip
    ax.set_xlim(left=0, right=max(max(xs), 1.0))
    if y_floor is not None:
        ax.set_ylim(bottom=min(y_floor, min(ys)))
    if reference is not None:
        ax.axhline(reference, color="#9ca3af", linestyle=(0, (5, 4)), linewidth=1)
        ax.annotate(reference_label, (1, reference), xycoords=("axes fraction", "data"), xytext=(-4, 4),
                    textcoords="offset points", ha="right", va="bottom", fontsize=8, color="#374151")  # fmt: skip
    return fig


def layer_bars(layers: Sequence[tuple[str, int, int]]) -> Figure:
    """Per layer, top to bottom: a grey bar for the parameters before (the total), a green one for those kept."""
    title = "Parameters per layer: before (total) and after (kept)"
    if not layers:
        return _no_data(title)
    fig = _figure(height=1.2 + 0.32 * len(layers))
    ax = fig.add_subplot()
    ax.set_title(title)
    rows = range(len(layers))
    kept_pct = [100.0 * kept / total if total else 0.0 for _, kept, total in layers]
    ax.barh(rows, [100.0] * len(layers), color=_GREY, height=0.6, label="before: all weights (100 %)")
    ax.barh(rows, kept_pct, color=_GREEN, height=0.6, label="after: kept")
    ax.set_yticks(list(rows), labels=[name for name, _, _ in layers])
    for label in ax.get_yticklabels():
        label.set_parse_math(False)  # a layer name is shown as written
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("weights kept (%)")
    for row, (_, kept, total) in zip(rows, layers, strict=True):
        ax.annotate(f"{kept:,} / {total:,} ({_fmt_pct(kept, total)})", (100, row), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=8, annotation_clip=False)  # fmt: skip
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.4 / len(layers)), ncols=2, frameon=False)
    ax.spines["left"].set_visible(False)
    return fig


def chart_figures(report: Mapping[str, Any]) -> dict[str, Figure]:
    """The report's three charts, by the name of their PNG file."""
    ref_val = _num(report.get("reference_val_acc"))
    with _style():
        return {
            "compression.png": line_chart(
                history_series(report, "compression"), title="Compression (×) by iteration",
                x_label="iteration", y_label="compression (×)", y_floor=1.0,
            ),
            "accuracy.png": line_chart(
                history_series(report, "val_acc"), title="Validation accuracy (%) by iteration",
                x_label="iteration", y_label="accuracy (%)", reference=ref_val,
                reference_label="" if ref_val is None else f"dense {ref_val:.2f} %", color=_GREEN,
            ),
            "layers.png": layer_bars(_layers(report)),
        }  # fmt: skip


def frontier_chart(frontier: Mapping[str, Any]) -> Figure:
    """A budget search's points: validation accuracy against compression, within budget and over it."""
    title = "Frontier: validation accuracy (%) against compression (×)"
    points = [p for p in frontier.get("points") or [] if isinstance(p, Mapping)]
    if not points:
        return _no_data(title)
    fig = _figure()
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("compression (×)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(axis="y", color="#eef0f3")
    held = sorted((float(p["compression"]), float(p["val_acc"])) for p in points if p.get("within_budget"))
    over = [(float(p["compression"]), float(p["val_acc"])) for p in points if not p.get("within_budget")]
    if held:
        ax.plot([x for x, _ in held], [y for _, y in held], color=_GREEN, linewidth=2, marker="o", markersize=4,
                label="within budget", gid="within")  # fmt: skip
    if over:
        ax.plot([x for x, _ in over], [y for _, y in over], linestyle="none", color="#dc2626", marker="o",
                markersize=4, label="over budget", gid="over")  # fmt: skip
    ref, budget = _num(frontier.get("reference_val_acc")), _num(frontier.get("max_accuracy_drop"))
    if ref is not None and budget is not None:
        ax.axhline(ref - budget, color="#9ca3af", linestyle=(0, (5, 4)), linewidth=1)
        ax.annotate(f"budget: {ref - budget:.2f} %", (1, ref - budget), xycoords=("axes fraction", "data"),
                    xytext=(-4, 4), textcoords="offset points", ha="right", va="bottom", fontsize=8)  # fmt: skip
    ax.set_xlim(left=0)
    ax.legend(loc="lower left", frameon=False)
    return fig


def _frontier_table(frontier: Mapping[str, Any]) -> str:
    head = "<tr><th>Iteration</th><th>Compression</th><th>Validation</th><th>Test</th><th>Within budget</th></tr>"
    body = "".join(
        f'<tr><td class="n">{_e(_fmt_int(p.get("iteration")))}</td>'
        f'<td class="n">{_e(fmt_ratio(p.get("compression")))}</td>'
        f'<td class="n">{_e(_fmt_acc(p.get("val_acc")))}</td><td class="n">{_e(_fmt_acc(p.get("test_acc")))}</td>'
        f"<td>{'yes' if p.get('within_budget') else 'no'}</td></tr>"
        for p in frontier.get("points") or []
        if isinstance(p, Mapping)
    )
    rows = [f"<table>{head}{body}</table>"]
    candidates = [c for c in frontier.get("candidates") or [] if isinstance(c, Mapping)]
    if candidates:
        head = "<tr><th>Candidate</th><th>Compression</th><th>Validation</th><th>Test</th><th>File</th></tr>"
        body = "".join(
            f"<tr><td>{'chosen' if c.get('chosen') else 'next'}</td>"
            f'<td class="n">{_e(fmt_ratio(c.get("compression")))}</td>'
            f'<td class="n">{_e(_fmt_acc(c.get("val_acc")))}</td><td class="n">{_e(_fmt_acc(c.get("test_acc")))}</td>'
            f"<td>{_e(c.get('file') or '–')}</td></tr>"
            for c in candidates
        )
        rows.append(f"<table>{head}{body}</table>")
    return "".join(rows)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    with _style():
        fig.savefig(buf, format="png", facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def _svg(fig: Figure, name: str) -> str:
    """``fig`` as an ``<svg>`` element to put in the page: no XML prolog, metadata or namespaces, and
    every id (and reference to one) prefixed with ``name``, so that the page's charts share none."""
    buf = io.StringIO()
    with _style():
        fig.savefig(buf, format="svg", facecolor="white", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text)
    text = re.sub(r'(\bid="|url\(#|href="#)', rf"\g<1>{name}-", text)
    label = fig.axes[0].get_title(loc="left")
    return text.replace("<svg", f'<svg class="chart" role="img" aria-label="{_e(label)}"', 1)


def render_chart_pngs(report: Mapping[str, Any]) -> dict[str, bytes]:
    """``compression.png``, ``accuracy.png`` and ``layers.png`` for ``report``, as PNG bytes."""
    return {name: _png(fig) for name, fig in chart_figures(report).items()}


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
    norm = report.get("batchnorm")
    if isinstance(norm, Mapping):
        text = f"{_fmt_int(norm.get('layers'))} layers re-estimated on the pruned model: validation "
        text += f"{_fmt_acc(norm.get('val_acc_before'))} → {_fmt_acc(norm.get('val_acc_after'))}"
        text += " (kept)" if norm.get("kept") else " (the trained statistics kept instead)"
        rows.append(("BatchNorm statistics", _e(text)))
    dense = report.get("left_dense")
    if isinstance(dense, list) and dense:
        rows.append(("Kept dense", _e(", ".join(str(n) for n in dense) + " (the first convolution and the head)")))
    peak = report.get("peak_memory")
    if isinstance(peak, Mapping) and _num(peak.get("bytes")) is not None:
        scope = "this run" if peak.get("scope") == "run" else "the worker process"
        rows.append(("Peak memory", _e(f"{_fmt_int(peak.get('bytes'))} B on {peak.get('device')} ({scope})")))
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
    charts = {name: _svg(fig, name.removesuffix(".png")) for name, fig in chart_figures(report).items()}
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
        charts["compression.png"],
        "<h2>Validation accuracy over training</h2>",
        charts["accuracy.png"],
        "<h2>Layers</h2>",
        charts["layers.png"],
        _layer_table(layers),
    ]
    frontier = report.get("frontier")
    if isinstance(frontier, Mapping):
        with _style():
            chart = _svg(frontier_chart(frontier), "frontier")
        verdict = f"<p>{_e(report['verdict'])}</p>" if report.get("verdict") else ""
        sections += ["<h2>Frontier</h2>", verdict, chart, _frontier_table(frontier)]
    sections += [
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
