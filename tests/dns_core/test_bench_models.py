"""The search of ``netsurgery bench models`` (pure logic: the runs are stand-ins with known outcomes)."""

from pathlib import Path
from typing import Any

import pytest
import torch

from dns_core import bench_models
from dns_core.bench_models import BenchModel, rung, rung_of, search
from dns_core.data import Dataset
from netsurgery.cli import main


def _plan(start: float) -> BenchModel:
    return BenchModel("m", bench_models.resnet(1), 0.5, 1, 0.05, 10, 0.01, start, (2.0,))


def _holds_up_to(limit: float, asked: list[float]) -> Any:
    def attempt(c: float) -> dict[str, Any]:
        asked.append(c)
        return {"compression": c, "asked": c, "within_budget": c <= limit}

    return attempt


@pytest.mark.parametrize(
    ("start", "limit", "best", "runs"),
    [
        (5.96, 8.0, 7.45, [5.96, 9.31, 7.45]),  # up two rungs, too far, the one between
        (5.96, 20.0, 18.19, [5.96, 9.31, 14.55, 22.74, 18.19]),  # climbing until it fails
        # the ViT's path: a miss on the sixth run still gets the rung between
        (3.05, 20.0, 18.19, [3.05, 4.77, 7.45, 11.64, 18.19, 28.42, 22.74]),
        (3.05, 23.0, 22.74, [3.05, 4.77, 7.45, 11.64, 18.19, 28.42, 22.74]),
        (5.96, 4.0, 3.81, [5.96, 3.81, 4.77]),  # down two rungs, then the one between
        (5.96, 1.5, None, [5.96, 3.81, 2.44, 1.95]),  # nothing holds from about 2x up: no row
    ],
)
def test_the_search_finds_the_highest_rung_within_budget(
    start: float, limit: float, best: float | None, runs: list[float]
) -> None:
    asked: list[float] = []
    found, tried = search(_plan(start), "dns", _holds_up_to(limit, asked))
    assert asked == runs and [r["asked"] for r in tried] == sorted(runs)
    assert (found["compression"] if found else None) == best


def test_the_search_stops_at_its_run_limit() -> None:
    asked: list[float] = []
    search(_plan(2.44), "dns", _holds_up_to(1e9, asked), max_runs=4)
    assert asked == [rung(4), rung(6), rung(8), rung(10)]


def test_the_ladder_is_geometric() -> None:
    assert [rung(n) for n in (3, 4, 5)] == [1.95, 2.44, 3.05]
    assert all(rung_of(rung(n)) == n for n in range(1, 30))


def test_unknown_models_and_methods_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "models", "--models", "resnet-50"]) == 2
    assert "unknown model(s) resnet-50; choose from resnet-20, vit" in capsys.readouterr().err
    assert main(["bench", "models", "--methods", "dns-fixed-crates"]) == 2
    assert "crate-driven" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["bench", "models", "--ramp-updates", "-1"])
    assert refused.value.code == 2
    assert "argument --ramp-updates: 0 or more, not -1" in capsys.readouterr().err


def test_bench_allocation_runs_every_rule_at_every_compression_and_seed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Real runs on a tiny ResNet and a few hundred images: the summary's means are the runs' means,
    and the default rule leaves no selected layer whole where the plain global ranking may."""
    monkeypatch.setenv("NETSURGERY_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(0)

    def tiny(n: int) -> Dataset:
        return Dataset(torch.randn(n, 3, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))

    monkeypatch.setattr(bench_models, "fashion_3ch", lambda: (tiny(256), tiny(64), tiny(64)))
    plan = BenchModel("tiny", bench_models.resnet(1), 0.5, 1, 0.05, 4, 0.01, 3.0, (3.0, 6.0))
    monkeypatch.setitem(bench_models.QUICK, "resnet-20", plan)
    rules = ("balanced", "global")
    result = bench_models.allocations(quick=True, names=["resnet-20"], seeds=[0, 1], rules=rules, log=lambda _: None)
    assert len(result["runs"]) == 2 * len(rules) * 2
    assert [(r["compression"], r["allocation"]) for r in result["summary"]] == [
        (c, rule) for c in (3.0, 6.0) for rule in rules
    ]
    for row in result["summary"]:
        mine = [r for r in result["runs"] if r["allocation"] == row["allocation"] and r["asked"] == row["compression"]]
        assert sorted(r["seed"] for r in mine) == [0, 1]
        assert row["test_drop"] == pytest.approx(sum(r["ref_acc"] - r["acc"] for r in mine) / 2, abs=0.01)
        if row["allocation"] == "balanced":
            assert row["layers_left_whole"] == 0, row
            assert row["smallest_layer_kept"] > 0, row
    table = bench_models.format_allocation_summary(result["summary"])
    assert table.count("\n") == 2 + len(result["summary"]) - 1


@pytest.mark.parametrize(("method", "ramp_updates", "interval"), [
    ("dns", None, 1),  # the product's: 60 ramp iterations give at least 64 updates, one every iteration
    ("dns", 0, 50),  # one update every 50 iterations, however short the ramp
    ("dns", 6, 10),
    ("agp", 6, 50),  # a DNS setting: AGP keeps its own schedule
])  # fmt: skip
def test_a_bench_run_updates_dns_masks_as_often_as_asked(
    method: str, ramp_updates: int | None, interval: int, tmp_path: Path
) -> None:
    g = torch.Generator().manual_seed(0)

    def tiny(n: int) -> Dataset:
        return Dataset(torch.randn(n, 3, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))

    data = (tiny(128), tiny(32), tiny(32))
    plan = BenchModel("tiny", bench_models.resnet(1), 0.5, 1, 0.05, 200, 0.01, 3.0, (3.0,))
    torch.manual_seed(0)
    row = bench_models.run(plan, plan.build(), data, (10.0, 10.0), method, 3.0, ramp_updates=ramp_updates)
    assert row["update_interval"] == interval
    assert row["compression"] == pytest.approx(3.0, rel=0.02)
