"""The benchmark commands' output contract, on a tiny stand-in for Fashion-MNIST."""

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from dns_core import bench
from dns_core.bench import weights_digest
from dns_core.data import fashion_mnist_splits
from dns_core.reference import cached_reference
from netsurgery.cli import main
from tests.fashion import stand_in_fashion_mnist


@pytest.fixture(autouse=True)
def _results_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench commands write docs/results/<kind>.json under the working directory: a temporary one here."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def fake_fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NETSURGERY_FASHION_MNIST", str(stand_in_fashion_mnist(tmp_path)))
    return tmp_path


def test_bench_table_prints_every_row_and_a_json_last_line(
    fake_fashion: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["bench", "table", "--quick", "--models", "lenet-300-100", "--iterations", "60"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = json.loads(out[-1])["rows"]
    assert [r["method"] for r in rows] == ["dns-fixed-crates", "dns", "han", "one-shot", "agp", "dns@1/3"]
    for r in rows:
        assert set(r) == {"model", "method", "kept", "total", "compression", "ref_acc", "acc", "iterations", "seconds"}
        assert r["total"] == 266_610
        assert r["compression"] == pytest.approx(r["total"] / r["kept"], rel=1e-3)
    by_method = {r["method"]: r for r in rows}
    assert by_method["dns"]["iterations"] == 60
    assert by_method["dns@1/3"]["iterations"] == 20
    # the budget may back off on this noise data, but never past the target
    assert all(1.0 <= r["compression"] <= 40.0 * 1.05 for r in rows if r["method"] != "dns-fixed-crates")
    assert any(line.startswith("| lenet-300-100 | dns |") for line in out)


def test_bench_overhead_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "overhead", "--steps", "5"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "lenet-5"
    assert result["dense_step_ms"] > 0 and result["surgery_step_ms"] > 0
    assert result["ratio"] == pytest.approx(result["surgery_step_ms"] / result["dense_step_ms"], rel=0.01)
    assert result["per_tensor_ratio"] == pytest.approx(result["per_tensor_step_ms"] / result["dense_step_ms"], rel=0.01)
    assert result["eager_ratio"] == pytest.approx(result["eager_step_ms"] / result["dense_step_ms"], rel=0.01)
    assert result["compiled_update"] is True  # numba is a dependency: the engine's update is the compiled pass


def test_bench_versus_compares_dns_at_the_ratio_with_agp_over_seeds(
    fake_fashion: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "versus", "--quick", "--models", "lenet-300-100", "--agp-target", "8", "--seeds", "2"]
    assert main([*argv, "--iterations", "60"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    rows = result["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [("dns", 0), ("agp", 0), ("dns", 1), ("agp", 1)]
    assert {r["compression"] for r in rows if r["method"] == "dns"} == {10.0}  # 1.25 × 8, held: no budget
    assert {r["compression"] for r in rows if r["method"] == "agp"} == {8.0}
    for method in ("dns", "agp"):
        drops = [r["ref_acc"] - r["acc"] for r in rows if r["method"] == method]
        assert result["summary"][method]["mean_drop"] == pytest.approx(sum(drops) / 2, abs=1e-3)
    summary = result["summary"]
    assert result["dns_at_ratio_no_worse"] is (summary["dns"]["mean_drop"] <= summary["agp"]["mean_drop"])
    assert out[0].startswith("dns   10.0x") and out[1].startswith("agp    8.0x")


def test_bench_versus_takes_any_pair_of_methods(fake_fashion: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "versus", "--quick", "--models", "lenet-300-100", "--agp-target", "6", "--ratio", "1"]
    assert main([*argv, "--seeds", "2", "--iterations", "60", "--pair", "dns@1/3,han"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = result["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [("dns@1/3", 0), ("han", 0), ("dns@1/3", 1), ("han", 1)]
    assert {(r["method"], r["iterations"], r["compression"]) for r in rows} == {("dns@1/3", 20, 6.0), ("han", 60, 6.0)}
    assert result["pair"] == ["dns@1/3", "han"] and set(result["summary"]) == {"dns@1/3", "han"}
    assert main([*argv, "--seeds", "1", "--first-seed", "3", "--iterations", "60"]) == 0
    assert [r["seed"] for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]] == [3, 3]
    assert main([*argv, "--pair", "dns,magic"]) == 2
    assert "--pair takes two methods" in capsys.readouterr().err


def test_bench_search_compares_budget_only_dns_with_agp_over_seeds(
    fake_fashion: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "search", "--quick", "--models", "lenet-300-100", "--seeds", "2", "--iterations", "400"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])["summary"]["lenet-300-100"]
    recorded = json.loads(Path("docs/results/search-quick.json").read_text())["results"]
    rows = recorded["rows"]
    # DNS once, AGP under each of its two timings, each over the two seeds
    assert [(r["method"], r["seed"]) for r in rows] == [("dns", 0), ("dns", 1), *[("agp", 0), ("agp", 1)] * 2]
    assert len({json.dumps(r["schedule"]) for r in rows if r["method"] == "agp"}) == 2
    for r in rows:  # the accuracies are rounded to hundredths: the checks allow for it
        drop = r["ref_val"] - r["val"]
        assert drop <= 0.51 if r["budget_met"] else drop > 0.49

        def best(slack: float, frontier: list[list[float]] = r["frontier"], row: dict[str, float] = r) -> float:
            held = [
                c for c, v, t in frontier if row["ref_val"] - v <= 0.5 + slack and row["ref_test"] - t <= 0.5 + slack
            ]
            return max(held, default=1.0)

        assert best(-0.01) - 0.01 <= r["best_within_both"] <= best(0.01) + 0.01
        # the first evaluation comes early in the first rung, before its ramp passes 1.5x
        first = r["first_eval"]
        assert 0 < first["iteration"] <= 400 // 25 and 1.0 <= first["compression"] <= 1.5
    for method in ("dns", "agp"):
        runs = [r for r in rows if r["method"] == method and r["schedule"] == summary[method]["schedule"]]
        ordered = sorted(r["best_within_both"] for r in runs)
        assert summary[method]["median_within_both"] == pytest.approx((ordered[0] + ordered[1]) / 2)
        drops = sorted(r["first_eval"]["val_drop"] for r in runs)
        assert summary[method]["median_first_eval_drop"] == pytest.approx((drops[0] + drops[1]) / 2)
    assert summary["pair"] == ["dns", "agp"]
    assert summary["ratio"] == pytest.approx(
        summary["dns"]["median_within_both"] / summary["agp"]["median_within_both"], abs=1e-3
    )
    assert any(line.startswith("| lenet-300-100 | 400 |") for line in out)
    # the first rung at the run's full learning rate, the later ones at half of it: every run's settings say so
    assert main([*argv, "--seeds", "1", "--first-lr", "1", "--rung-lr", "0.5"]) == 0
    rows = json.loads(Path("docs/results/search-quick.json").read_text())["results"]["rows"]
    assert len(rows) == 3 and all(r["schedule"]["first_lr"] == 1.0 and r["schedule"]["rung_lr"] == 0.5 for r in rows)


def test_bench_search_takes_a_pair_with_a_share_of_the_iterations(
    fake_fashion: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "search", "--quick", "--models", "lenet-300-100", "--seeds", "1", "--iterations", "800"]
    assert main([*argv, "--pair", "dns@1/2,han"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])["summary"]["lenet-300-100"]
    rows = json.loads(Path("docs/results/search-quick.json").read_text())["results"]["rows"]
    # Han searches once (it has one timing), DNS with half the iterations
    assert [(r["method"], r["budget"]) for r in rows] == [("dns@1/2", 400), ("han", 800)]
    assert summary["pair"] == ["dns@1/2", "han"] and summary["iterations"] == 800
    assert summary["ratio"] == pytest.approx(
        summary["dns@1/2"]["median_within_both"] / summary["han"]["median_within_both"], abs=1e-3
    )
    han = rows[1]["frontier"]
    assert han[0][0] == pytest.approx(2.0, rel=0.01)  # Han's first round prunes to the first rung
    assert any(line.startswith("| model | iterations | dns@1/2: median handed over") for line in out)
    for bad in ("dns,one-shot", "dns@1/0,han", "dns@x,han", "dns,agp,han", "magic"):
        assert main([*argv, "--pair", bad]) == 2
        assert "--pair takes one or two methods among agp, dns, han" in capsys.readouterr().err


def test_bench_search_runs_one_method_alone(fake_fashion: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "search", "--quick", "--models", "lenet-300-100", "--seeds", "2", "--iterations", "400"]
    assert main([*argv, "--pair", "dns"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])["summary"]["lenet-300-100"]
    rows = json.loads(Path("docs/results/search-quick.json").read_text())["results"]["rows"]
    # only DNS runs, once per seed, and there is nothing to divide by
    assert [(r["method"], r["seed"]) for r in rows] == [("dns", 0), ("dns", 1)]
    assert summary["pair"] == ["dns"] and "ratio" not in summary and "agp" not in summary
    # the starting model's digest, to tell whether two machines' figures start from the same reference
    reference, cached = cached_reference("lenet-300-100", fashion_mnist_splits()[0], tag="fashion-55k", epochs=2)
    assert cached and summary["reference_sha256"] == weights_digest(reference)
    with torch.no_grad():
        next(reference.parameters()).view(-1)[0] += 1e-6
    assert weights_digest(reference) != summary["reference_sha256"]
    assert summary["dns"]["runs"] == 2
    ordered = sorted(r["best_within_both"] for r in rows)
    assert summary["dns"]["median_within_both"] == pytest.approx((ordered[0] + ordered[1]) / 2)
    table = [line for line in out if line.startswith("| ")]
    assert table[0].startswith("| model | iterations | dns: median handed over |") and "/" not in table[0]
    assert table[1].startswith(f"| lenet-300-100 | 400 | {summary['dns']['median_compression']:.1f}x |")


def test_bench_search_trains_with_the_objective_and_settings_given(
    fake_fashion: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "search", "--quick", "--models", "lenet-300-100", "--seeds", "1", "--iterations", "400"]
    frontiers = {}
    for objective in ("ce", "ce+distill"):
        assert main([*argv, "--pair", "dns", "--objective", objective]) == 0
        written = json.loads(Path("docs/results/search-quick.json").read_text())
        assert written["arguments"]["objective"] == objective
        (row,) = written["results"]["rows"]
        assert row["objective"] == objective
        frontiers[objective] = row["frontier"]
    capsys.readouterr()
    # the same seed and batches: only the loss differs, and with it the path up the ladder
    assert frontiers["ce"] != frontiers["ce+distill"]
    assert main([*argv, "--pair", "dns", "--splice-back"]) == 0
    (row,) = json.loads(Path("docs/results/search-quick.json").read_text())["results"]["rows"]
    assert row["schedule"] == {"splice_back": True} and row["objective"] == "ce"
    assert main([*argv, "--pair", "dns", "--no-retry"]) == 0
    (row,) = json.loads(Path("docs/results/search-quick.json").read_text())["results"]["rows"]
    assert row["schedule"] == {"retry_missed": False}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*argv, "--objective", "mse"])


def test_bench_search_can_start_each_seed_from_its_own_reference(
    fake_fashion: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "search", "--quick", "--seeds", "2", "--iterations", "400", "--pair", "dns"]
    assert main([*argv, "--reference-per-seed"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]["lenet-300-100"]
    rows = json.loads(Path("docs/results/search-quick.json").read_text())["results"]["rows"]
    train = fashion_mnist_splits()[0]
    digests = [
        weights_digest(cached_reference("lenet-300-100", train, tag="fashion-55k", epochs=2, seed=seed)[0])
        for seed in (0, 1)
    ]
    assert digests[0] != digests[1]
    # each seed's run starts from the reference trained with that seed, and the summary names both
    assert [(r["seed"], r["reference_sha256"]) for r in rows] == list(enumerate(digests))
    assert rows[0]["ref_val"] != rows[1]["ref_val"] or rows[0]["ref_test"] != rows[1]["ref_test"]
    assert summary["references"] == "per-seed" and summary["reference_sha256"] == digests
    # by default both runs start from the seed-0 reference
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summary"]["lenet-300-100"]
    rows = json.loads(Path("docs/results/search-quick.json").read_text())["results"]["rows"]
    assert [r["reference_sha256"] for r in rows] == [digests[0]] * 2
    assert summary["references"] == "shared" and summary["reference_sha256"] == digests[0]


_SEARCH_ROW = bench.search_row


def _stop_at(monkeypatch: pytest.MonkeyPatch, stop: tuple[int, float | None] | None) -> list[tuple[int, float | None]]:
    """Count the runs that train (seed, asked compression); a run of ``stop`` is cut short by a Ctrl-C."""
    trained: list[tuple[int, float | None]] = []

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        run = (int(args[6]), kwargs.get("compression"))
        if run == stop:
            raise KeyboardInterrupt
        trained.append(run)
        return _SEARCH_ROW(*args, **kwargs)

    monkeypatch.setattr(bench, "search_row", counted)
    return trained


def test_a_stopped_bench_search_resumes_from_the_runs_it_finished(
    fake_fashion: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "search", "--quick", "--seeds", "3", "--iterations", "400", "--pair", "dns"]
    results, journal = Path("docs/results/search-quick.json"), Path("docs/results/search-quick.json.runs.jsonl")
    assert main(argv) == 0
    whole = json.loads(results.read_text())["results"]
    assert not journal.exists()  # the results file holds it all
    results.unlink()
    # stopped in its third run: the two finished ones are in the journal, and no results file is written
    trained = _stop_at(monkeypatch, (2, None))
    assert main(argv) == 130
    assert trained == [(0, None), (1, None)] and not results.exists()
    assert [json.loads(line)["row"]["seed"] for line in journal.read_text().splitlines()] == [0, 1]
    # resumed: only the third run trains, and the figures are those of the bench run in one go
    trained = _stop_at(monkeypatch, None)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert trained == [(2, None)]
    assert "2 run(s) read back from docs/results/search-quick.json.runs.jsonl" in capsys.readouterr().err
    resumed = json.loads(results.read_text())["results"]
    assert resumed["summary"] == whole["summary"]
    untimed = [[{k: v for k, v in r.items() if k != "seconds"} for r in rs] for rs in (resumed["rows"], whole["rows"])]
    assert untimed[0] == untimed[1]
    assert not journal.exists()
    # a journal is read back only for the same runs: other iterations, or no --resume, train everything again
    trained = _stop_at(monkeypatch, (1, None))
    assert main(argv) == 130 and trained == [(0, None)]
    trained = _stop_at(monkeypatch, (0, None))
    assert main([*argv, "--iterations", "440", "--resume"]) == 130 and trained == []
    trained = _stop_at(monkeypatch, (1, None))
    assert main(argv) == 130 and trained == [(0, None)]


def test_a_stopped_bench_promise_resumes_and_skips_a_line_cut_short(
    fake_fashion: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "promise", "--quick", "--seeds", "2", "--iterations", "400"]
    journal = Path("docs/results/promise-quick.json.runs.jsonl")
    trained = _stop_at(monkeypatch, (0, 80.0))
    assert main(argv) == 130
    assert trained == [(0, None), (0, 10.0), (0, 20.0)]
    # the bench was killed while writing a fourth line
    with journal.open("a") as f:
        f.write('{"key": "{\\"bench\\": \\"prom')
    trained = _stop_at(monkeypatch, (1, None))
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 130
    assert trained == [(0, 80.0)]
    err = capsys.readouterr().err
    assert "promise-quick.json.runs.jsonl:4: unreadable, ignored" in err and "3 finished run(s)" in err
    # the run after the cut line is kept on a line of its own
    trained = _stop_at(monkeypatch, None)
    assert main([*argv, "--resume"]) == 0
    assert trained == [(1, None), (1, 10.0), (1, 20.0), (1, 80.0)]
    assert "4 run(s) read back" in capsys.readouterr().err
    rows = json.loads(Path("docs/results/promise-quick.json").read_text())["results"]["rows"]
    assert [(r["seed"], r["ask"]) for r in rows] == [(s, a) for s in (0, 1) for a in (None, 10.0, 20.0, 80.0)]
    assert all(r["alone"] == rows[0]["compression"] for r in rows[1:4])
    assert not journal.exists()


def test_bench_promise_checks_each_asked_job_against_the_budget_only_run(
    fake_fashion: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "promise", "--quick", "--seeds", "1", "--iterations", "400"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])["summary"]["lenet-300-100"]
    rows = json.loads(Path("docs/results/promise-quick.json").read_text())["results"]["rows"]
    # per seed: the budget-only run, then one job per asked compression
    assert [r["ask"] for r in rows] == [None, 10.0, 20.0, 80.0]
    reference, _ = cached_reference("lenet-300-100", fashion_mnist_splits()[0], tag="fashion-55k", epochs=2)
    assert summary["reference_sha256"] == weights_digest(reference)
    alone = rows[0]["compression"]
    for r in rows[1:]:
        assert r["alone"] == alone and r["compression"] <= r["ask"] * 1.001
        drop = r["ref_val"] - r["val_again"]  # the handed-over model, evaluated again
        assert r["kept"] == (not r["budget_met"] or drop <= 0.5)
        assert r["near_alone"] == (r["compression"] >= 0.9 * min(r["ask"], alone))
        if alone >= r["ask"] * 0.95:
            assert r["landed"] == (abs(r["compression"] - r["ask"]) <= 0.05 * r["ask"])
        else:
            assert r["landed"] is None
    asked = rows[1:]
    assert summary["jobs"] == 3 and summary["median_alone"] == alone
    assert summary["kept"] == sum(r["kept"] for r in asked)
    assert summary["near_alone"] == sum(r["near_alone"] for r in asked)
    assert summary["in_reach"] == sum(r["landed"] is not None for r in asked)
    assert any(line.startswith("| lenet-300-100 | 400 |") for line in out)


def test_bench_writes_a_results_file_with_the_run_its_figures_and_the_machine(
    capsys: pytest.CaptureFixture[str],
) -> None:
    began = datetime.now(UTC)
    assert main(["bench", "overhead", "--steps", "3"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads(Path("docs/results/overhead.json").read_text())
    assert record["kind"] == "overhead"
    assert record["results"] == printed
    assert record["arguments"]["which"] == "overhead" and record["arguments"]["steps"] == 3
    assert all(isinstance(part, str) for part in record["command"])
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["netsurgery"]
    assert record["machine"]["cpu_count"] == os.cpu_count()
    assert record["machine"]["cpu_model"] is None or isinstance(record["machine"]["cpu_model"], str)
    assert record["machine"]["numerics"] == "native" and record["machine"]["numerics_pins"] == {}
    assert record["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    created = datetime.fromisoformat(record["created_at"])
    assert created.utcoffset() == timedelta(0)
    assert began - timedelta(seconds=1) <= created <= datetime.now(UTC)
    assert main(["bench", "overhead", "--steps", "3", "--results", "elsewhere/o.json"]) == 0
    assert json.loads(Path("elsewhere/o.json").read_text())["arguments"]["steps"] == 3


def test_bench_table_quick_writes_its_rows_to_table_quick_json(
    fake_fashion: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "table", "--quick", "--models", "lenet-300-100", "--methods", "dns,agp", "--iterations", "20"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    record = json.loads(Path("docs/results/table-quick.json").read_text())
    assert record["kind"] == "table-quick"
    rows = record["results"]["rows"]
    assert [(r["method"], r["compression"], r["acc"]) for r in rows] == [
        (r["method"], r["compression"], r["acc"]) for r in printed
    ]
    assert all("layers" in r and "val_drop" in r for r in rows)  # the file keeps what the printed line leaves out
    assert not Path("docs/results/table.json").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["models", "--rung-lr", "2"], "--rung-lr applies to bench search, promise, not to bench models"),
    (["models", "--objective", "ce+distill"], "--objective applies to bench search, promise, not to bench models"),
    (["overhead", "--seeds", "3"], "--seeds applies to bench versus, models, allocation, search, promise, not to"),
    (["search", "--steps", "10"], "--steps applies to bench overhead, not to bench search"),
    (["table", "--resume"], "--resume applies to bench search, promise, models, not to bench table"),
    (["allocation", "--allocation", "global"], "--allocation applies to bench models, not to bench allocation"),
    (["promise", "--pair", "dns"], "--pair applies to bench versus, search, not to bench promise"),
    (["search", "--dns-schedule", "0.5,0.7"], "--dns-schedule applies to bench models, not to bench search"),
    (["service", "--quick"], "--quick applies to bench table, versus, models, allocation, search, promise, not to"),
])  # fmt: skip
def test_a_bench_refuses_an_option_it_does_not_read(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An option meant for another benchmark stops the command before anything runs or is written."""
    out = tmp_path / "results.json"
    assert main(["bench", *argv, "--numerics", "native", "--results", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
