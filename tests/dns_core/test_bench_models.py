"""The search of ``netsurgery bench models`` (pure logic: the runs are stand-ins with known outcomes)."""

from typing import Any

import pytest

from dns_core import bench_models
from dns_core.bench_models import BenchModel, rung, rung_of, search
from netsurgery.cli import main


def _plan(start: float) -> BenchModel:
    return BenchModel("m", bench_models.resnet(1), 0.5, 1, 0.05, 10, 0.01, start)


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
