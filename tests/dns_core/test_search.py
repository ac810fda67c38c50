"""The budget-only search: the highest compression within an accuracy budget, and its frontier."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dns_core import Cancelled, Target, TrainConfig, evaluate
from dns_core.artifacts import LoadedModel, write_artifacts
from dns_core.compress import compress
from dns_core.data import Dataset
from dns_core.errors import ConfigError
from dns_core.methods import make_surgery
from dns_core.reference import train_reference
from dns_core.search import BudgetSearch, SearchSettings
from dns_core.sparse import load_sparse
from dns_core.surgery import ScheduledSurgery
from dns_core.train import Callbacks


@pytest.fixture(scope="module")
def reference(digits: tuple[Dataset, Dataset]) -> nn.Module:
    return train_reference("lenet-300-100", digits[0], epochs=15, device="cpu")


def _search(
    method: str = "dns", iterations: int = 800, cap: float | None = None, **settings: float
) -> tuple[nn.Module, BudgetSearch]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    surgery = make_surgery(method, model, iterations, Target(compression=cap, max_accuracy_drop=1.0))
    assert isinstance(surgery, ScheduledSurgery)
    return model, BudgetSearch(surgery, 90.0, 1.0, iterations, settings=SearchSettings(**settings), cap=cap)  # type: ignore[arg-type]


def _end_rung(search: BudgetSearch, model: nn.Module, opt: torch.optim.Optimizer, val_acc: float) -> bool:
    """Run the current rung's mask updates, then judge it at ``val_acc``."""
    r = len(search.frontier)
    start, end = search.bounds[r], search.bounds[r + 1]
    for t in range(start, end):
        search.surgery.step(t)
    return search.observe(end, val_acc, model, opt, search.bounds[-1])


def test_the_ladder_climbs_while_the_budget_holds_and_steps_back_when_it_breaks() -> None:
    model, search = _search()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert not _end_rung(search, model, opt, 89.5)  # 2x holds
    assert search.aim == pytest.approx(4.0)
    assert not _end_rung(search, model, opt, 89.8)  # 4x holds
    assert search.aim == pytest.approx(8.0)
    held = copy.deepcopy(model.state_dict())
    kept_at_4 = [layer.kept() for layer in search.surgery.layers]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # what training during the next rung would change
    assert _end_rung(search, model, opt, 85.0)  # 8x breaks the budget: the 4x state comes back
    assert all(torch.equal(a, b) for a, b in zip(held.values(), model.state_dict().values(), strict=True))
    assert [layer.kept() for layer in search.surgery.layers] == kept_at_4
    assert search.step == pytest.approx(math.sqrt(2.0))
    assert search.aim == pytest.approx(4.0 * math.sqrt(2.0), rel=1e-3)
    assert [p.within_budget for p in search.frontier] == [True, True, False]
    assert search.frontier[2].compression == pytest.approx(8.0, rel=0.01)
    assert search.chosen() is not None and search.chosen().compression == pytest.approx(4.0, rel=0.01)  # type: ignore[union-attr]
    assert [p.compression for p, _ in search.candidate_states()] == sorted(
        (p.compression for p in search.frontier if p.within_budget), reverse=True
    )


@pytest.mark.parametrize("regrow", [False, True])
def test_with_regrow_a_rung_that_holds_after_a_miss_restores_the_climb(regrow: bool) -> None:
    model, search = _search(iterations=2000, regrow=regrow)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    steps = []
    for val_acc in (89.5, 89.8, 85.0, 85.0, 89.5, 89.5):  # 2x, 4x hold; two misses; two holds
        _end_rung(search, model, opt, val_acc)
        steps.append(search.step)
    shrunk = [2.0, 2.0, 2**0.5, 2**0.25]
    # without regrow the step stays where the misses left it; with it each hold squares it, up to 2
    grown = [2**0.5, 2.0] if regrow else [2**0.25, 2**0.25]
    assert steps == pytest.approx(shrunk + grown)
    assert search.aim == pytest.approx(search.held * steps[-1], rel=1e-3)


def test_without_retries_the_ladder_stays_below_the_lowest_miss_then_polishes_what_held() -> None:
    model, search = _search(retry_missed=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _end_rung(search, model, opt, 89.5)  # 2x
    _end_rung(search, model, opt, 89.6)  # 4x
    _end_rung(search, model, opt, 85.0)  # 8x misses: the lowest miss
    assert search.missed == pytest.approx(8.0, rel=0.01)
    assert search.aim == pytest.approx(4.0 * math.sqrt(2.0), rel=1e-3)
    _end_rung(search, model, opt, 89.5)  # 5.66x holds; a step of √2 would aim at 8x again: halfway instead
    assert search.aim == pytest.approx(math.sqrt(search.held * search.missed), rel=1e-6)
    assert search.aim < 8.0 * (1 - 0.005)
    _end_rung(search, model, opt, 89.5)  # 6.73x holds; halfway to 8x is under the resolution: 1.1x up
    assert search.aim == pytest.approx(search.held * 1.1, rel=1e-6)
    last = search.bounds[-1]
    _end_rung(search, model, opt, 89.5)  # 7.40x holds: no climb of 1.1x fits under 8x
    assert search.polished and not search.done
    assert search.bounds[-1] == last and search.rungs == len(search.frontier) + 1  # the rest: one rung
    assert search.aim == pytest.approx(search.held)
    _end_rung(search, model, opt, 89.7)
    assert search.done
    chosen = search.chosen()
    assert chosen is not None and chosen.val_acc == 89.7 and chosen.compression < 8.0
    # every aim after the miss stayed under it; with retries the same verdicts aim at 8x again
    assert all(p.compression < 7.96 for p in search.frontier[3:])
    model, again = _search()
    for val_acc in (89.5, 89.6, 85.0, 89.5):
        _end_rung(again, model, opt, val_acc)
    assert again.aim == pytest.approx(8.0, rel=1e-3)


def test_without_retries_the_lowest_miss_survives_a_resume() -> None:
    model, search = _search(retry_missed=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for val_acc in (89.5, 89.6, 85.0):
        _end_rung(search, model, opt, val_acc)
    state = search.state_dict()
    _, resumed = _search(retry_missed=False)
    resumed.load_state_dict(state)
    assert resumed.missed == search.missed
    _, fresh = _search(retry_missed=False)
    fresh.load_state_dict(fresh.state_dict())  # nothing missed yet: stored as None, read back as no bound
    assert fresh.missed == math.inf


@pytest.mark.parametrize("method", ["dns", "agp"])
def test_splice_back_keeps_what_dns_reached_after_a_miss_and_retargets_down(method: str) -> None:
    model, search = _search(method, splice_back=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _end_rung(search, model, opt, 89.5)  # 2x holds
    _end_rung(search, model, opt, 89.8)  # 4x holds
    held = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # what training during the next rung would change
    r = len(search.frontier)
    for t in range(search.bounds[r], search.bounds[r + 1]):
        search.surgery.step(t)
    trained = copy.deepcopy(model.state_dict())  # the 8x rung's end state
    rolled_back = search.observe(search.bounds[r + 1], 85.0, model, opt, search.bounds[-1])  # 8x breaks the budget
    aim = 4.0 * math.sqrt(2.0)
    assert search.aim == pytest.approx(aim, rel=1e-3)
    now = model.state_dict()
    if method == "agp":  # pruning is final: no splicing back, the 4x state comes back as without the setting
        assert rolled_back
        assert all(torch.equal(a, b) for a, b in zip(held.values(), now.values(), strict=True))
        return
    # DNS stays where it is, and the next rung's ramp takes the kept count from 8x back up to the aim's
    assert not rolled_back
    assert all(torch.equal(a, b) for a, b in zip(trained.values(), now.values(), strict=True))
    surgery = search.surgery
    assert surgery.model_total() / (
        surgery.model_total()
        - surgery.prunable_total()
        + surgery.ramp.kept(surgery.ramp.t0, surgery.start_kept, surgery.final_kept)
    ) == pytest.approx(8.0, rel=0.02)
    r = len(search.frontier)
    for t in range(search.bounds[r], search.bounds[r + 1]):
        surgery.step(t)
    assert surgery.compression() == pytest.approx(aim, rel=0.02)
    assert search.chosen() is not None and search.chosen().compression == pytest.approx(4.0, rel=0.01)  # type: ignore[union-attr]


def test_an_asked_compression_caps_the_ladder_and_the_rest_of_the_run_polishes_it() -> None:
    model, search = _search(cap=6.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _end_rung(search, model, opt, 89.5)  # 2x
    _end_rung(search, model, opt, 89.6)  # 4x
    assert search.aim == pytest.approx(6.0)  # 8x would pass the cap: the cap itself is next
    last = search.bounds[-1]
    _end_rung(search, model, opt, 89.2)  # 6x holds
    assert not search.done and search.polished
    assert search.rungs == 4 and search.bounds[-1] == last  # the rest of the run is one rung at 6x
    assert search.aim == pytest.approx(6.0)
    _end_rung(search, model, opt, 89.7)  # and it ends more accurate: that is the result
    assert search.done
    chosen = search.chosen()
    assert chosen is not None and chosen.compression == pytest.approx(6.0, rel=0.01) and chosen.val_acc == 89.7
    # one candidate per compression: the polished 6x, then 4x and 2x
    assert [round(p.compression) for p, _ in search.candidate_states()] == [6, 4, 2]


def test_a_polish_that_ends_worse_leaves_the_state_that_held() -> None:
    model, search = _search(cap=4.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _end_rung(search, model, opt, 89.5)  # 2x
    _end_rung(search, model, opt, 89.6)  # 4x holds: the rest of the run polishes it
    _end_rung(search, model, opt, 89.3)  # within budget, but less accurate than the 4x that held first
    assert search.done
    chosen = search.chosen()
    assert chosen is not None and chosen.val_acc == 89.6
    assert search.finish(89.3, model, opt)  # that state comes back


def test_a_polish_that_breaks_the_budget_is_rolled_back() -> None:
    model, search = _search(cap=4.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _end_rung(search, model, opt, 89.5)  # 2x
    _end_rung(search, model, opt, 89.6)  # 4x holds
    held = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert _end_rung(search, model, opt, 85.0)  # the polish misses: the 4x state comes back, and the run ends
    assert search.done
    assert all(torch.equal(a, b) for a, b in zip(held.values(), model.state_dict().values(), strict=True))


def test_a_cap_the_budget_cannot_hold_ends_on_the_highest_that_held() -> None:
    model, search = _search(cap=4.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _end_rung(search, model, opt, 89.5)  # 2x
    _end_rung(search, model, opt, 89.5)  # 4x: within 1.1x of the cap, so it is tried
    assert search.held == pytest.approx(4.0, rel=0.01) and not search.done
    assert search.aim == pytest.approx(4.3)
    _end_rung(search, model, opt, 80.0)  # the cap misses, and no climb fits between it and 4x
    assert search.done
    chosen = search.chosen()
    assert chosen is not None and chosen.compression == pytest.approx(4.0, rel=0.01)
    model, search = _search(cap=6.3, step=1.4)
    _end_rung(search, model, opt, 89.5)  # 2x
    _end_rung(search, model, opt, 89.5)  # 2.8x
    _end_rung(search, model, opt, 89.5)  # 3.92x
    _end_rung(search, model, opt, 89.5)  # 5.49x
    assert search.aim == pytest.approx(6.3)
    _end_rung(search, model, opt, 80.0)  # the cap misses: room is left below it, but not the cap again
    assert not search.done and search.aim == pytest.approx(math.sqrt(search.held * 6.3))


def test_below_the_cap_the_ladder_is_the_budget_only_one() -> None:
    accuracies = [89.5, 89.6, 85.0, 89.4, 85.0, 89.3, 85.0, 85.0]
    paths = []
    for cap in (None, 100.0):
        model, search = _search(cap=cap)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        aims = []
        for acc in accuracies:
            aims.append(round(search.aim, 6))
            _end_rung(search, model, opt, acc)
            if search.done:
                break
        paths.append((aims, search.bounds, [round(p.compression, 3) for p in search.frontier]))
    assert paths[0] == paths[1]


def test_a_capped_search_with_few_iterations_climbs_in_fewer_rungs() -> None:
    _, search = _search(iterations=60, cap=16.0)
    assert search.rungs == 2 and search.bounds[0] == 0 and search.bounds[-1] == 60  # two rungs of 20 or more
    assert search.aim == pytest.approx(8.0)  # the first one higher, so that one doubling reaches the cap
    _, search = _search(iterations=12, cap=16.0)
    assert search.rungs == 1 and search.bounds == [0, 12] and search.aim == pytest.approx(16.0)


def test_rungs_grow_and_each_ends_at_a_low_learning_rate() -> None:
    _, search = _search(iterations=1000, rungs=4, growth=2.0)
    lengths = [b - a for a, b in zip(search.bounds, search.bounds[1:], strict=False)]
    assert sum(lengths) == 1000 and lengths == sorted(lengths) and lengths[-1] > 4 * lengths[0]
    cfg = TrainConfig(iterations=1000, lr=0.01)
    for r, (start, end) in enumerate(zip(search.bounds, search.bounds[1:], strict=False)):
        peak = 0.01 * (0.1 if r == 0 else 1.0)  # the first rung, from the reference to 2x, at a tenth of the rate
        assert search.lr_at(end - 1, cfg) < peak * 0.01  # the rung's last step: almost zero
        assert max(search.lr_at(t, cfg) for t in range(start, end)) == pytest.approx(peak, rel=0.02)
        assert search.evaluates_at(end, cfg)


def test_the_first_rung_is_gentle_only_when_it_halves_the_model_and_rungs_follow() -> None:
    cfg = TrainConfig(iterations=1000, lr=0.01)
    _, search = _search(iterations=1000, rungs=4, first_lr=0.25)
    assert max(search.lr_at(t, cfg) for t in range(search.bounds[1])) == pytest.approx(0.0025, rel=0.02)
    _, search = _search(iterations=60, cap=16.0)  # two rungs, the first aimed at 8x: it needs the full rate
    assert search.aim == pytest.approx(8.0)
    assert max(search.lr_at(t, cfg) for t in range(search.bounds[1])) == pytest.approx(0.01, rel=0.05)
    _, search = _search(iterations=24, cap=2.0)  # one rung straight to 2x: the whole run, at the full rate
    assert search.rungs == 1 and search.aim == pytest.approx(2.0)
    assert max(search.lr_at(t, cfg) for t in range(24)) == pytest.approx(0.01, rel=0.05)
    with pytest.raises(ConfigError, match="first rung's learning rate"):
        SearchSettings(first_lr=0.0)


def test_the_later_rungs_peak_at_their_own_share_of_the_rate() -> None:
    cfg = TrainConfig(iterations=1000, lr=0.01)
    _, search = _search(iterations=1000, rungs=4, rung_lr=2.0)
    peaks = [max(search.lr_at(t, cfg) for t in range(a, b)) for a, b in itertools.pairwise(search.bounds)]
    assert peaks[0] == pytest.approx(0.001, rel=0.02)  # the first rung keeps its own, gentle rate
    assert peaks[1:] == pytest.approx([0.02] * 3, rel=0.02)
    for bad in (0.0, 5.0):
        with pytest.raises(ConfigError, match="later rungs' learning rate"):
            SearchSettings(rung_lr=bad)


def test_the_first_rung_is_evaluated_once_its_ramp_reaches_the_check() -> None:
    model, search = _search(iterations=4000, rungs=4)
    cfg = TrainConfig(iterations=4000, lr=0.01, eval_every=0)
    at = search.check_at
    assert at is not None and 0 < at < search.bounds[1]
    assert [t for t in range(1, search.bounds[1]) if search.evaluates_at(t, cfg)] == [at]
    for t in range(at):
        search.surgery.step(t)
    assert 1.2 < search.surgery.compression() <= 1.5  # pruning has begun, and it is still light
    search.surgery.step(at)
    assert search.surgery.compression() > 1.5  # the next update passes the check's compression
    assert not search.observe(at, 89.0, model, torch.optim.SGD(model.parameters(), lr=0.1), 4000)  # no verdict
    assert search.frontier == [] and search.aim == pytest.approx(2.0)


def test_nothing_from_the_floor_up_within_budget_ends_the_search() -> None:
    model, search = _search()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert not _end_rung(search, model, opt, 50.0)  # 2x misses: nothing to roll back to
    assert search.done and search.chosen() is None
    assert not search.finish(50.0, model, opt)  # the last state stays, and the run says it missed


def test_the_search_stops_at_the_last_rung_and_hands_over_the_best_candidate() -> None:
    model, search = _search(rungs=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _end_rung(search, model, opt, 89.9)
    _end_rung(search, model, opt, 89.5)
    best = copy.deepcopy(model.state_dict())
    _end_rung(search, model, opt, 80.0)
    assert search.done
    assert search.finish(80.0, model, opt)
    assert all(torch.equal(a, b) for a, b in zip(best.values(), model.state_dict().values(), strict=True))


def test_han_prunes_once_at_each_rungs_start_and_retrains_with_its_masks_fixed() -> None:
    model, search = _search("han")
    surgery = search.surgery
    start, end = search.bounds[0], search.bounds[1]
    surgery.step(start)
    assert surgery.compression() == pytest.approx(2.0, rel=0.01)  # one round: the cut comes first
    masks = [layer.mask(t).clone() for layer in surgery.layers for t in layer.tensors]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) * 4)  # retraining changes the kept weights' order
    for t in range(start + 1, end):
        surgery.step(t)
    assert all(
        torch.equal(a, layer.mask(t))
        for a, (layer, t) in zip(masks, ((l, n) for l in surgery.layers for n in l.tensors), strict=True)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    search.observe(end, 89.5, model, opt, search.bounds[-1])  # 2x holds: the next round cuts to 4x at once
    surgery.step(end)
    assert surgery.compression() == pytest.approx(4.0, rel=0.01)


def test_only_methods_that_can_be_retargeted_search() -> None:
    with pytest.raises(ConfigError, match="needs a compression"):
        make_surgery("one-shot", nn.Sequential(nn.Linear(4, 4)), 100, Target(max_accuracy_drop=1.0))
    with pytest.raises(ConfigError, match="needs at least 397 iterations"):
        _search(iterations=380)
    _search(iterations=397)


@pytest.mark.parametrize("method", ["dns", "agp", "han"])
def test_a_budget_only_run_returns_the_highest_compression_within_budget(
    method: str, digits: tuple[Dataset, Dataset], reference: nn.Module, tmp_path: Path
) -> None:
    train, valid = digits
    ref = evaluate(reference, valid)
    cfg = TrainConfig(iterations=1600, device="cpu", eval_every=100)
    result = compress(
        copy.deepcopy(reference), train, valid, method=method, target=Target(max_accuracy_drop=1.0), config=cfg,
        test=valid,
    )  # fmt: skip
    r = result.report
    frontier = r["frontier"]
    held = [p for p in frontier["points"] if p["within_budget"]]
    assert held, frontier
    # the answer: the highest compression that held, by the strict end-of-run evaluation
    assert r["compression"] == pytest.approx(max(p["compression"] for p in held), rel=1e-6)
    assert r["budget_met"] is True and ref - r["val_acc"] <= 1.0
    assert r["val_acc"] == pytest.approx(evaluate(result.model, valid))
    assert r["compression"] > 8  # digits' LeNet-300-100 holds far more than the first rungs
    compressions = [p["compression"] for p in frontier["points"]]
    assert compressions[:3] == pytest.approx([2.0, 4.0, 8.0], rel=0.01)  # the ladder doubles while it holds
    assert "highest compression found within the 1-point budget" in r["verdict"]
    # the other candidates: lower compressions, each a model of its own, written beside the chosen one
    listed = frontier["candidates"]
    assert listed[0]["chosen"] and [c["compression"] for c in listed] == sorted(
        (c["compression"] for c in listed), reverse=True
    )
    assert len(result.candidates) == len(listed) - 1 >= 1
    for candidate, entry in zip(result.candidates, listed[1:], strict=True):
        assert entry["val_acc"] == pytest.approx(evaluate(candidate.model, valid))
        assert ref - entry["val_acc"] <= 1.0
    made = write_artifacts(
        tmp_path, LoadedModel(result.model, "safetensors", arch="lenet-300-100"), result.model, r,
        candidates=result.candidates,
    )  # fmt: skip
    files = made.report["frontier"]["candidates"]
    assert files[0]["file"] == "model.sparse.safetensors"
    second = load_sparse(tmp_path / files[1]["file"])
    twin = copy.deepcopy(result.model)
    twin.load_state_dict(second)
    nonzero = sum(int(torch.count_nonzero(p)) for p in twin.parameters())
    total = sum(p.numel() for p in twin.parameters())
    assert total / nonzero == pytest.approx(files[1]["compression"], rel=1e-6)
    assert total / nonzero < r["compression"]


def test_an_ask_out_of_reach_lands_where_the_budget_only_run_does(
    digits: tuple[Dataset, Dataset], reference: nn.Module
) -> None:
    train, valid = digits
    ref = evaluate(reference, valid)
    cfg = TrainConfig(iterations=800, device="cpu", eval_every=100)
    runs = [
        compress(copy.deepcopy(reference), train, valid, method="dns", target=target, config=cfg).report
        for target in (Target(max_accuracy_drop=1.0), Target(compression=2000.0, max_accuracy_drop=1.0))
    ]
    alone, asked = runs
    assert asked["compression"] < 2000 * 0.95 and asked["budget_met"] is True and ref - asked["val_acc"] <= 1.0
    # the same ladder below the cap: the same rungs, judged alike, and the same model handed over
    assert asked["frontier"]["points"] == alone["frontier"]["points"]
    assert (asked["compression"], asked["val_acc"]) == (alone["compression"], alone["val_acc"])
    assert asked["verdict"].startswith("2000x is out of reach within the 1-point budget: ")
    assert f"{asked['compression']:.1f}x is the highest compression found" in asked["verdict"]


def test_an_ask_within_reach_lands_on_it(digits: tuple[Dataset, Dataset], reference: nn.Module) -> None:
    train, valid = digits
    ref = evaluate(reference, valid)
    cfg = TrainConfig(iterations=800, device="cpu", eval_every=100)
    r = compress(
        copy.deepcopy(reference), train, valid, method="agp", target=Target(compression=5.0, max_accuracy_drop=1.0),
        config=cfg,
    ).report  # fmt: skip
    assert r["compression"] == pytest.approx(5.0, rel=0.01) and r["budget_met"] is True
    assert ref - r["val_acc"] <= 1.0
    points = r["frontier"]["points"]
    assert [round(p["compression"], 1) for p in points] == [2.0, 4.0, 5.0, 5.0]
    # the rest of the run polished the 5x state: the more accurate of the two is handed over
    assert points[-1]["iteration"] == r["iterations"] == 800
    assert r["frontier"]["chosen"]["val_acc"] == max(p["val_acc"] for p in points[2:])
    assert r["verdict"].startswith("5.0x as asked, within the 1-point budget")


def test_a_budget_that_nothing_meets_says_so(digits: tuple[Dataset, Dataset], reference: nn.Module) -> None:
    train, valid = digits
    cfg = TrainConfig(iterations=400, device="cpu", lr=5.0)  # a learning rate that wrecks every rung
    r = compress(
        copy.deepcopy(reference), train, valid, method="dns", target=Target(max_accuracy_drop=0.0), config=cfg
    ).report
    assert r["budget_met"] is False
    assert r["verdict"].startswith("No compression of 2x or more stayed within the 0-point budget")
    assert r["frontier"]["chosen"] is None


def test_a_resumed_search_ends_as_the_uninterrupted_one(
    digits: tuple[Dataset, Dataset], reference: nn.Module, tmp_path: Path
) -> None:
    train, valid = digits

    def run(ckpt: Path, cancel_at: int | None = None) -> dict[str, object]:
        seen: list[int] = []
        cfg = TrainConfig(iterations=800, device="cpu", checkpoint_every=150, log_every=10, cancel_every=10)
        cb = Callbacks(
            on_progress=lambda p: seen.append(p.iteration),
            should_cancel=(lambda: bool(seen) and seen[-1] >= cancel_at) if cancel_at else None,
        )
        r = compress(
            copy.deepcopy(reference), train, valid, method="dns", target=Target(max_accuracy_drop=1.0), config=cfg,
            callbacks=cb, checkpoint=ckpt,
        ).report  # fmt: skip
        return {"compression": r["compression"], "val_acc": r["val_acc"], "points": r["frontier"]["points"]}

    full = run(tmp_path / "a.ckpt")
    with pytest.raises(Cancelled):
        run(tmp_path / "b.ckpt", cancel_at=500)  # after two rungs and into the third; checkpoint at 450
    assert run(tmp_path / "b.ckpt") == full
