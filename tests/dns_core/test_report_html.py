import io
import json
import re
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from dns_core import Progress, Target, TrainConfig, models
from dns_core.artifacts import LoadedModel, sha256_file, write_artifacts
from dns_core.compress import compact_history, compress
from dns_core.data import Dataset
from dns_core.report_html import fmt_ratio, render_chart_pngs, render_report_html
from dns_core.surgery import LayerReport

HOSTILE = "<script>alert(1)</script>"
PNGS = ("compression.png", "accuracy.png", "layers.png")


class _Collect(HTMLParser):
    """Tags, the path of every chart's data series (``<g id="…-series"><path d=…>``), and whether any
    tag was left open at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.series: list[str] = []
        self._in_series = False
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "g" and (dict(attrs).get("id") or "").endswith("-series"):
            self._in_series = True
        if tag not in ("meta", "line", "rect", "polyline", "circle", "path", "br"):
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "path" and self._in_series:
            self.series.append(dict(attrs).get("d") or "")
            self._in_series = False

    def handle_endtag(self, tag: str) -> None:
        if tag in self.open:
            assert self.open[-1] == tag, f"</{tag}> closes <{self.open[-1]}>"
            self.open.pop()


def _decode_png(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, checking every chunk's CRC and that the image data inflates."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks.append((tag, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    return width, height


def _check_png(data: bytes) -> None:
    width, height = _decode_png(data)
    assert width > 0 and height > 0
    with Image.open(io.BytesIO(data)) as image:
        pixels = image.convert("RGB")
    assert pixels.size == (width, height)
    colours = pixels.getcolors(maxcolors=width * height)
    assert colours is not None and len(colours) > 1, "a single flat colour"


@pytest.fixture(scope="module")
def written(digits: tuple[Dataset, Dataset], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    train, valid = digits
    torch.manual_seed(0)
    model = models.build("lenet-300-100")
    cfg = TrainConfig(iterations=60, batch_size=32, eval_every=10, log_every=4, device="cpu")
    result = compress(
        model, train, valid, test=valid, method="dns", target=Target(compression=8.0), config=cfg,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("out")
    loaded = LoadedModel(model, "safetensors", arch="lenet-300-100")
    report = result.report | {"data": HOSTILE}
    made = write_artifacts(out, loaded, result.model, report)
    for name in ("report.html", *PNGS, "report.json"):
        assert made.files[name] == out / name
    return out, json.loads((out / "report.json").read_text())


def test_history_is_compact_and_in_the_report(written: tuple[Path, dict[str, Any]]) -> None:
    _, report = written
    history = report["history"]
    assert [h["iteration"] for h in history] == sorted(h["iteration"] for h in history)
    assert history[-1]["iteration"] == 60 and len(history) == 18  # 6 evaluations + 12 progress points
    assert sum(h["val_acc"] is not None for h in history) == 6
    assert report["left_dense"] == ["fc3"]  # the head: 1,010 weights, under 10% of what 8x keeps
    assert set(history[-1]["layers"]) == {"fc1", "fc2", "fc3"}  # fc3 reported whole
    assert report["compression"] > 1 and "budget_met" in report  # existing keys unchanged


def test_report_html_is_readable_self_contained_and_escaped(written: tuple[Path, dict[str, Any]]) -> None:
    out, report = written
    page = (out / "report.html").read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(page)
    parser.close()
    assert parser.open == [] and "svg" in parser.tags and "table" in parser.tags
    for name in ("fc1", "fc2", "fc3"):
        assert f"<td>{name}</td>" in page
    assert "fc3 (the first convolution and the head)" in page
    assert f"{report['peak_memory']['bytes']:,} B on cpu (the worker process)" in page
    assert fmt_ratio(report["compression"]) in page and fmt_ratio(report["bytes"]["compression"]) in page
    with_compression = [h for h in report["history"] if h["compression"] is not None]
    with_accuracy = [h for h in report["history"] if h["val_acc"] is not None]
    counts = [len(re.findall(r"[ML] -?[\d.]+ -?[\d.]+", d)) for d in parser.series]  # one vertex per point
    assert counts == [len(with_compression), len(with_accuracy)]
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "model.sparse.safetensors" in page and report["outputs"]["layers.png"]["sha256"] in page


def test_pngs_decode_and_outputs_record_them(written: tuple[Path, dict[str, Any]]) -> None:
    out, report = written
    for name in PNGS:
        _check_png((out / name).read_bytes())
    for name in ("report.html", *PNGS):
        assert report["outputs"][name] == {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
    assert "report.json" not in report["outputs"]


def test_a_report_without_history_still_renders() -> None:
    report = {"method": "dns", "format": "onnx", "compression": 1.0, "iterations": 0, "history": [], "layers": [],
              "data": HOSTILE, "settings": {"note": HOSTILE}}  # fmt: skip
    page = render_report_html(report)
    assert page.count(">no data</text>") == 3 and HOSTILE not in page
    _Collect().feed(page)
    pngs = render_chart_pngs(report)
    assert set(pngs) == set(PNGS)
    for data in pngs.values():
        _check_png(data)


def test_a_budget_search_report_shows_its_frontier_and_candidates() -> None:
    points = [
        {"rung": 0, "iteration": 100, "compression": 2.0, "val_acc": 90.1, "test_acc": 89.9, "within_budget": True},
        {"rung": 1, "iteration": 250, "compression": 4.0, "val_acc": 89.8, "test_acc": None, "within_budget": True},
        {"rung": 2, "iteration": 450, "compression": 8.0, "val_acc": 87.0, "test_acc": 86.5, "within_budget": False},
    ]
    frontier = {"points": points, "reference_val_acc": 90.0, "max_accuracy_drop": 0.5,
                "candidates": [{"compression": 4.0, "val_acc": 89.8, "test_acc": None, "chosen": True,
                                "file": "model.sparse.safetensors"},
                               {"compression": 2.0, "val_acc": 90.1, "test_acc": 89.9, "chosen": False,
                                "file": f"candidate-2{HOSTILE}"}]}  # fmt: skip
    report = {"method": "dns", "compression": 4.0, "history": [], "layers": [], "frontier": frontier,
              "verdict": "4.0x is the highest compression found within the 0.5-point budget."}  # fmt: skip
    page = render_report_html(report)
    _Collect().feed(page)
    section = page[page.index("<h2>Frontier</h2>") : page.index("<h2>Files</h2>")]
    assert "4.0x is the highest compression found" in section
    assert section.count("<td>yes</td>") == 2 and section.count("<td>no</td>") == 1
    assert "8.0" in section and "87.00" in section and "budget: 89.50 %" in section
    assert "model.sparse.safetensors" in section and HOSTILE not in page
    assert 'id="frontier-within"' in section and 'id="frontier-over"' in section  # both kinds of point are drawn
    assert "<h2>Frontier</h2>" not in render_report_html(report | {"frontier": None})


def test_compact_history_keeps_evaluations_and_thins_the_rest() -> None:
    layers = [LayerReport("fc1", 5, 10)]
    history = [
        Progress(
            t,
            5000,
            1.0,
            0.1,
            val_acc=90.0 if t % 100 == 0 else None,
            compression=2.0,
            layers=layers,
            event="eval" if t % 100 == 0 else "progress",
        )
        for t in range(1, 5001)
    ]
    short = compact_history(history, limit=200)
    iterations = [h["iteration"] for h in short]
    assert len(short) == 200 and iterations == sorted(set(iterations))
    assert {t for t in range(100, 5001, 100)} <= set(iterations) and iterations[0] == 1 and iterations[-1] == 5000
    assert short[0]["layers"] == {"fc1": 5}
    assert len(compact_history(history[:50])) == 50 and compact_history([]) == []
