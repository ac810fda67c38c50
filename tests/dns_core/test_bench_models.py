"""The search of ``netsurgery bench models`` (pure logic: the runs are stand-ins with known outcomes)."""

import json
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
    for bad, message in (("0.7,0.5", "0 < RAMP_END < SURGERY_END <= 1"), ("0.5", "two fractions RAMP_END,SURGERY_END")):
        with pytest.raises(SystemExit) as refused:
            main(["bench", "models", "--dns-schedule", bad])
        assert refused.value.code == 2
        assert message in capsys.readouterr().err


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


@pytest.mark.parametrize(("method", "ramp_updates", "dns_schedule", "interval", "ends"), [
    # the product's: 60 ramp iterations give at least 64 updates, one every iteration
    ("dns", None, None, 1, (0.3, 0.5)),
    ("dns", 0, None, 50, (0.3, 0.5)),  # one update every 50 iterations, however short the ramp
    ("dns", 6, None, 10, (0.3, 0.5)),
    ("dns", 6, (0.5, 0.7), 16, (0.5, 0.7)),  # a 100-iteration ramp
    ("agp", 6, (0.2, 0.3), 50, (0.5, None)),  # DNS settings: AGP keeps its own schedule, frozen after its ramp
])  # fmt: skip
def test_a_bench_run_updates_dns_masks_and_ends_its_ramp_as_asked(
    method: str,
    ramp_updates: int | None,
    dns_schedule: tuple[float, float] | None,
    interval: int,
    ends: tuple[float, float | None],
) -> None:
    """Real tiny runs of 200 iterations: the settings asked reach the surgery (the ramp's length and the
    fewest updates set how often the masks change) and the row records where the ramp and the splicing ended."""
    g = torch.Generator().manual_seed(0)

    def tiny(n: int) -> Dataset:
        return Dataset(torch.randn(n, 3, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))

    data = (tiny(128), tiny(32), tiny(32))
    plan = BenchModel("tiny", bench_models.resnet(1), 0.5, 1, 0.05, 200, 0.01, 3.0, (3.0,))
    torch.manual_seed(0)
    model = plan.build()
    row = bench_models.run(
        plan, model, data, (10.0, 10.0), method, 3.0, ramp_updates=ramp_updates, dns_schedule=dns_schedule
    )
    assert row["update_interval"] == interval
    assert (row["ramp_end"], row["surgery_end"]) == ends
    assert row["compression"] == pytest.approx(3.0, rel=0.02)


def test_the_summary_takes_each_methods_median_over_seeds() -> None:
    def row(method: str, seed: int, c: float) -> dict[str, Any]:
        return {"model": "m", "method": method, "seed": seed, "compression": c}

    rows = [row("dns", 0, 9.31), row("dns", 1, 7.45), row("agp", 0, 5.96), row("agp", 1, 5.96), row("agp", 2, 7.45)]
    (entry,) = bench_models.summarize(rows, ["m"], ["dns", "agp"], [0, 1, 2])
    assert entry["methods"]["dns"] == {"per_seed": [9.31, 7.45, 1.0], "median": 7.45}  # seed 2: no rung held
    assert entry["methods"]["agp"] == {"per_seed": [5.96, 5.96, 7.45], "median": 5.96}
    assert entry["dns_over_agp"] == 1.25  # one rung up (7.45 / 5.96 = 1.2500, 3.81 / 3.05 = 1.2492)
    assert "DNS over AGP (medians): m 1.25" in bench_models.format_summary([entry])
    rows = [row("dns", 0, 3.81), row("dns", 1, 4.77), row("agp", 0, 3.05), row("agp", 1, 2.44)]
    (entry,) = bench_models.summarize(rows, ["m"], ["dns", "agp"], [0, 1])
    assert (
        entry["methods"]["dns"]["median"] == pytest.approx(4.29) and entry["dns_over_agp"] == 1.562
    )  # two rungs: 1.25²
    assert "dns_over_agp" not in bench_models.summarize(rows, ["m"], ["dns"], [0, 1])[0]


def _tiny_bench(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``bench models --quick --models resnet-20`` on a tiny ResNet and random images, with a budget
    nothing leaves (so the climb ends on the compressions the model cannot reach at all)."""
    monkeypatch.setenv("NETSURGERY_CACHE", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(0)

    def tiny(n: int) -> Dataset:
        return Dataset(torch.randn(n, 3, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))

    sets = (tiny(256), tiny(64), tiny(64))
    monkeypatch.setattr(bench_models, "fashion_3ch", lambda: sets)
    plan = BenchModel("tiny", bench_models.resnet(1), 50.0, 1, 0.05, 4, 0.01, 69.39, (69.39,))
    monkeypatch.setitem(bench_models.QUICK, "resnet-20", plan)


def test_bench_models_runs_every_seed_from_its_own_reference(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real runs on a tiny ResNet: two seeds, two references, both methods searched on each, the
    summary built from the per-seed best rows, and the last line keeps the issue's keys. With a
    budget nothing leaves, the climb ends on the compressions the model cannot reach at all."""
    _tiny_bench(monkeypatch, tmp_path)
    out = tmp_path / "models.json"
    argv = ["bench", "models", "--quick", "--models", "resnet-20", "--seeds", "2", "--first-seed", "3"]
    assert main([*argv, "--numerics", "native", "--results", str(out)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = {"model", "method", "compression", "ref_acc", "acc", "iterations", "seconds"}
    assert last["rows"] and all(set(r) == keys for r in last["rows"])
    result = json.loads(out.read_text())["results"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "ref-bench-tiny-e1-lr0.05-s3.safetensors", "ref-bench-tiny-e1-lr0.05-s4.safetensors"
    ]  # fmt: skip
    assert {(r["method"], r["seed"]) for r in result["runs"]} == {(m, s) for m in ("dns", "agp") for s in (3, 4)}
    assert {r["seed"] for r in result["allocations"]} == {3}  # the rules are compared on the first seed
    unreachable = [r for r in result["runs"] if "unreachable" in r]
    assert unreachable and all(not r["within_budget"] and "leaves no room" in r["unreachable"] for r in unreachable)
    assert all(r["within_budget"] for r in result["runs"] if "unreachable" not in r)
    (entry,) = result["summary"]
    assert entry["seeds"] == [3, 4]
    for method, m in entry["methods"].items():
        best = {r["seed"]: r["compression"] for r in result["rows"] if r["method"] == method}
        assert m["per_seed"] == [best.get(3, 1.0), best.get(4, 1.0)]
        assert m["median"] == pytest.approx(sum(m["per_seed"]) / 2)
    rungs = {m: sorted(rung_of(c) for c in entry["methods"][m]["per_seed"]) for m in ("dns", "agp")}
    assert entry["dns_over_agp"] == round(1.25 ** ((sum(rungs["dns"]) - sum(rungs["agp"])) / 2), 3)
    assert main(["bench", "models", "--seeds", "0"]) == 2
    assert "--seeds must be 1 or more, not 0" in capsys.readouterr().err


def test_start_sets_the_first_compression_each_search_asks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real tiny runs: each method's search begins at the rung nearest the compression given, and climbs
    from there; a compression of 1 or less is refused."""
    _tiny_bench(monkeypatch, tmp_path)
    out = tmp_path / "models.json"
    argv = ["bench", "models", "--quick", "--models", "resnet-20", "--numerics", "native", "--results", str(out)]
    assert main([*argv, "--methods", "dns", "--start", "100"]) == 0
    runs = json.loads(out.read_text())["results"]["runs"]
    # 108.42x first (the default starts at 69.39x), two rungs up (more than the tiny ResNet can lose), then
    # the rung between
    assert [r["asked"] for r in runs] == [108.42, 135.53, 169.41]
    assert runs[0]["within_budget"] and "unreachable" in runs[2]
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--start", "1"])
    assert refused.value.code == 2
    assert "argument --start: a compression above 1, not 1" in capsys.readouterr().err


def test_a_stopped_bench_models_resumes_from_the_runs_it_finished(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real tiny runs: stopped in a later run, the bench keeps its finished runs in the journal; with
    --resume it trains only the rest, and its figures are those of the bench run in one go."""
    _tiny_bench(monkeypatch, tmp_path)
    out = tmp_path / "models.json"
    journal = tmp_path / "models.json.runs.jsonl"
    argv = ["bench", "models", "--quick", "--models", "resnet-20", "--numerics", "native", "--results", str(out)]
    real = bench_models.run
    trained: list[tuple[str, float, str]] = []

    def stop_at(n: int | None) -> None:
        trained.clear()

        def counted(*args: Any) -> dict[str, Any]:
            if len(trained) == n:
                raise KeyboardInterrupt
            trained.append((args[4], args[5], args[6]))  # method, compression, allocation
            return real(*args)

        monkeypatch.setattr(bench_models, "run", counted)

    stop_at(None)
    assert main(argv) == 0
    whole = json.loads(out.read_text())["results"]
    everything = list(trained)
    assert len(everything) > 4 and not journal.exists()  # the results file holds it all
    out.unlink()
    stop_at(3)
    assert main(argv) == 130
    assert trained == everything[:3]
    assert [json.loads(line)["row"]["asked"] for line in journal.read_text().splitlines()] == [
        c for _, c, _ in everything[:3]
    ]
    stop_at(None)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert trained == everything[3:]
    assert f"3 run(s) read back from {journal}" in capsys.readouterr().err
    resumed = json.loads(out.read_text())["results"]

    def untimed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    for part in ("rows", "runs", "allocations"):
        assert untimed(resumed[part]) == untimed(whole[part])
    assert resumed["summary"] == whole["summary"]
    assert not journal.exists()
    # another bench (here: other ramp updates) reads nothing back
    stop_at(1)
    assert main(argv) == 130
    stop_at(0)
    assert main([*argv, "--ramp-updates", "0", "--resume"]) == 130 and trained == []
    # nor does one with DNS's ramp and splicing ending elsewhere: it trains its first run again
    stop_at(1)
    assert main([*argv, "--dns-schedule", "0.5,0.7", "--resume"]) == 130
    assert trained == everything[:1]


def test_iterations_sets_every_bench_models_and_allocation_runs_length(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real tiny runs: without --iterations each run is the model's own length (4 here); with it,
    every run of the searches, of the allocation comparison and of ``bench allocation`` is that long."""
    _tiny_bench(monkeypatch, tmp_path)
    argv = ["bench", "models", "--quick", "--models", "resnet-20", "--numerics", "native"]
    lengths: dict[str, set[int]] = {}
    for label, extra in (("own", []), ("asked", ["--iterations", "7"])):
        out = tmp_path / f"models-{label}.json"
        assert main([*argv, *extra, "--results", str(out)]) == 0
        result = json.loads(out.read_text())["results"]
        assert result["runs"] and result["allocations"]
        lengths[label] = {r["iterations"] for r in result["runs"] + result["allocations"] if "unreachable" not in r}
    assert lengths == {"own": {4}, "asked": {7}}
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["iterations"] for r in last["rows"]} == {7}
    out = tmp_path / "allocation.json"
    argv = ["bench", "allocation", "--quick", "--models", "resnet-20", "--seeds", "1", "--iterations", "7"]
    assert main([*argv, "--numerics", "native", "--results", str(out)]) == 0
    runs = json.loads(out.read_text())["results"]["runs"]
    assert len(runs) == 4 and {r["iterations"] for r in runs} == {7}
