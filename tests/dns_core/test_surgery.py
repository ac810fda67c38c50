import copy
import math
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from dns_core import DNS, Ramp, ScheduledSurgery, SurgeryError, Target, models
from dns_core import surgery as surgery_module
from dns_core.defaults import BALANCE, CRATE_DRIVEN
from dns_core.methods import MethodSettings, Schedule, make_surgery
from dns_core.surgery import first_and_last


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_selection_and_per_layer_crates() -> None:
    m = models.build("lenet-5")
    s = DNS(m, crates={"conv*": 1.0, "fc1": 4.0}, crate=2.5, include=["conv1", "conv2", "fc1", "fc2"])
    assert [layer.name for layer in s.layers] == ["conv1", "conv2", "fc1", "fc2"]
    assert s.crates == {"conv1": 1.0, "conv2": 1.0, "fc1": 4.0, "fc2": 2.5}
    assert all(layer.tensors == ["weight", "bias"] for layer in s.layers)


def test_bias_can_stay_dense() -> None:
    s = DNS(models.build("lenet-300-100"), prune_bias=False)
    assert all(layer.tensors == ["weight"] for layer in s.layers)
    assert s.prunable_total() == 784 * 300 + 300 * 100 + 100 * 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": -1.0}, "gamma"),
        ({"power": -0.5}, "power"),
        ({"include": ["nope*"]}, "matches no Linear/Conv/attention layer"),
        ({"include": ["fc1"], "exclude": ["fc1"]}, "empty"),
        ({"crates": {"fc9": 2.0}}, "names no selected layer"),
        ({"phases": ["conv", "attention"], "phase_length": 10}, "phases"),
        ({"phases": ["conv", "fc"]}, "phase_length"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SurgeryError, match=message):
        DNS(models.build("lenet-300-100"), **kwargs)  # type: ignore[arg-type]


def test_bad_targets_raise_clear_errors() -> None:
    with pytest.raises(SurgeryError, match="or an accuracy budget alone"):
        Target()
    with pytest.raises(SurgeryError, match="not both"):
        Target(compression=2.0, layer_kept={"fc1": 0.5})
    assert Target(max_accuracy_drop=0.5).searching and not Target(compression=2.0, max_accuracy_drop=0.5).searching
    with pytest.raises(SurgeryError, match="searched for by dns, agp and han"):
        make_surgery("one-shot", models.build("lenet-300-100"), 100, Target(max_accuracy_drop=0.5))
    with pytest.raises(SurgeryError, match="≥ 1"):
        Target(compression=0.5)
    with pytest.raises(SurgeryError, match=r"\(0, 1\]"):
        Target(layer_kept={"fc1": 1.5})
    with pytest.raises(SurgeryError, match="unknown method"):
        make_surgery("magic", models.build("lenet-300-100"), 100, Target(compression=2))
    with pytest.raises(SurgeryError, match="names no selected layer"):
        make_surgery("dns", models.build("lenet-300-100"), 100, Target(layer_kept={"conv1": 0.5}))


def test_gradients_reach_pruned_weights_only_with_dns() -> None:
    x = torch.randn(8, 1, 8, 8)
    for method, expect_grad in (("dns", True), ("agp", False)):
        m = tiny()
        s = make_surgery(method, m, 10, Target(compression=4.0), MethodSettings(schedule=Schedule(ramp_end=0.0)))
        s.step(0)
        layer = s.layers[1]
        pruned = layer.mask("weight") == 0
        assert pruned.any()
        m(x).square().sum().backward()
        grad = layer.dense("weight").grad
        assert grad is not None
        assert bool((grad[pruned] != 0).any()) is expect_grad
        # kept weights always get the gradient of the masked product
        assert bool((grad[~pruned] != 0).any())


def test_straight_through_gradient_equals_gradient_of_masked_product() -> None:
    m = tiny()
    s = DNS(m, crate=0.5, iter_stop=100)
    s.step(0)
    x = torch.randn(4, 1, 8, 8)
    m(x).sum().backward()
    layer = s.layers[1]
    w_masked = (layer.dense("weight") * layer.mask("weight")).detach().requires_grad_()
    conv = nn.Conv2d(1, 4, 3)
    with torch.no_grad():
        conv.weight.copy_(s.layers[0].dense("weight") * s.layers[0].mask("weight"))
        assert conv.bias is not None
        conv.bias.copy_(s.layers[0].dense("bias") * s.layers[0].mask("bias"))
        bias = layer.dense("bias") * layer.mask("bias")
    out = nn.functional.linear(torch.relu(conv(x)).flatten(1), w_masked, bias)
    out.sum().backward()  # type: ignore[no-untyped-call]
    assert w_masked.grad is not None
    grad = layer.dense("weight").grad
    assert grad is not None
    assert torch.allclose(grad, w_masked.grad, atol=1e-6)


def _per_tensor_grads(method: str, x: torch.Tensor) -> tuple[list[torch.Tensor], nn.Module, object]:
    """Gradients of the dense tensors when the model's hooks are gone, so every layer reads W ⊙ T on its own."""
    m = tiny()
    s = make_surgery(method, m, 10, Target(compression=4.0), MethodSettings(schedule=Schedule(ramp_end=0.0)))
    s.step(0)
    s.unbatch()
    m(x).square().sum().backward()
    return [layer.dense(t).grad.clone() for layer in s.layers for t in layer.tensors], m, s  # type: ignore[union-attr]


@pytest.mark.parametrize("method", ["dns", "agp"])
def test_a_training_pass_reads_every_masked_tensor_from_one_batch_with_the_same_gradients(method: str) -> None:
    """With gradients on, the layers read W ⊙ T from the batch the model's pre-hook made (one call for
    all of them) and the dense tensors get the gradients that one tensor at a time gives: ∂L/∂(W ⊙ T)
    for DNS, masked for AGP. The batch is gone once the pass ends."""
    from dns_core.surgery import MASKED

    x = torch.randn(8, 1, 8, 8)
    expected, _, _ = _per_tensor_grads(method, x)
    m = tiny()
    s = make_surgery(method, m, 10, Target(compression=4.0), MethodSettings(schedule=Schedule(ramp_end=0.0)))
    s.step(0)
    seen: list[bool] = []
    for layer in s.layers:
        layer.module.register_forward_pre_hook(lambda module, args: seen.append(MASKED in module.__dict__))
    m(x).square().sum().backward()
    assert seen == [True, True]
    got = [layer.dense(t).grad for layer in s.layers for t in layer.tensors]
    for g, want in zip(got, expected, strict=True):
        assert g is not None
        assert torch.allclose(g, want, atol=1e-6)
    assert all(MASKED not in layer.module.__dict__ for layer in s.layers)
    pruned = s.layers[1].mask("weight") == 0
    assert pruned.any()
    assert bool((got[2][pruned] != 0).any()) is (method == "dns")  # type: ignore[index]


def test_evaluation_a_deep_copy_and_a_failed_pass_read_masked_tensors_one_at_a_time() -> None:
    """No batch without gradients (no second copy of the weights through an evaluation), none in a
    deep copy of the model (its hooks belong to the original's surgery), and none left behind by a
    forward pass that raised."""
    from dns_core.surgery import MASKED

    m = tiny()
    s = DNS(m, crate=0.5, iter_stop=100)
    s.step(0)
    seen: list[bool] = []
    for layer in s.layers:
        layer.module.register_forward_pre_hook(lambda module, args: seen.append(MASKED in module.__dict__))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = m(x)
    assert seen == [False, False]
    twin = copy.deepcopy(m)
    seen.clear()
    twin(x).sum().backward()
    assert seen == [False, False]  # the twin's layers, one at a time
    assert torch.allclose(twin(x), out, atol=1e-6)
    assert all(p.grad is None for p in m.parameters())  # the original was not touched
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 3, 8, 8))  # wrong channel count: the first convolution raises
    assert all(MASKED not in layer.module.__dict__ for layer in s.layers)
    seen.clear()
    m(x).sum().backward()
    assert seen == [True, True]  # the next pass batches again
    hooks = len(m._forward_pre_hooks), len(m._forward_hooks)
    s.unbatch()
    assert (len(m._forward_pre_hooks), len(m._forward_hooks)) == (hooks[0] - 1, hooks[1] - 1)
    seen.clear()
    m(x).sum().backward()
    assert seen == [False, False]  # unbatched: one tensor at a time, also with gradients


def test_a_layer_called_twice_in_one_pass_sums_both_gradients() -> None:
    """A model that calls one masked layer twice (weights shared across depth, as ALBERT does), and
    calls itself inside its own forward pass, gets the gradient of both uses on the dense weights."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor, again: bool = True) -> torch.Tensor:
            y: torch.Tensor = self.fc(torch.tanh(self.fc(x)))
            if not again:
                return y
            out: torch.Tensor = self(y, again=False)
            return out

    torch.manual_seed(0)
    m = Twice()
    s = DNS(m, crate=0.3, iter_stop=100)
    s.step(0)
    x = torch.randn(5, 6)
    m(x).square().sum().backward()
    layer = s.layers[0]
    w, b = layer.dense("weight"), layer.dense("bias")
    masked_w = (w * layer.mask("weight")).detach().requires_grad_()
    masked_b = (b * layer.mask("bias")).detach().requires_grad_()
    y = x
    for _ in range(4):
        y = nn.functional.linear(y, masked_w, masked_b)
        y = torch.tanh(y) if _ % 2 == 0 else y
    y.square().sum().backward()  # type: ignore[no-untyped-call]
    assert w.grad is not None and masked_w.grad is not None
    assert torch.allclose(w.grad, masked_w.grad, atol=1e-5)
    assert s._hooks  # squash removes the hooks with the masks
    hooks = len(m._forward_pre_hooks), len(m._forward_hooks)
    s.squash()
    assert (len(m._forward_pre_hooks), len(m._forward_hooks)) == (hooks[0] - 1, hooks[1] - 1)


def test_splicing_restores_a_weight_driven_above_the_band() -> None:
    m = tiny()
    s = DNS(m, crate=0.0, gamma=0.0, iter_stop=100)
    s.step(0)
    layer = s.layers[1]
    theta = s.thresholds()[layer.name]
    idx = (layer.mask("weight") == 0).nonzero()[0]
    i, j = int(idx[0]), int(idx[1])
    w = layer.dense("weight")
    with torch.no_grad():
        w[i, j] = 1.05 * theta  # inside the band: stays pruned
    s.step(1)
    assert layer.mask("weight")[i, j] == 0
    with torch.no_grad():
        w[i, j] = -1.11 * theta  # past 1.1θ (sign does not matter): spliced back
    s.step(2)
    assert layer.mask("weight")[i, j] == 1
    with torch.no_grad():
        w[i, j] = 0.95 * theta  # back inside the band: stays kept
    s.step(3)
    assert layer.mask("weight")[i, j] == 1
    with torch.no_grad():
        w[i, j] = 0.89 * theta
    s.step(4)
    assert layer.mask("weight")[i, j] == 0


def test_statistics_are_taken_once_from_dense_weights() -> None:
    m = tiny()
    s = DNS(m, crate=1.0, gamma=0.0, iter_stop=100)
    s.step(0)
    before = dict(s.stats)
    with torch.no_grad():
        for layer in s.layers:
            layer.dense("weight").mul_(0.01)
    s.step(1)
    assert s.stats == before


def test_no_surgery_at_or_after_iter_stop() -> None:
    m = tiny()
    s = DNS(m, crate=0.5, gamma=0.0, iter_stop=3)
    s.step(0)
    masks = [layer.mask("weight").clone() for layer in s.layers]
    with torch.no_grad():
        for layer in s.layers:
            layer.dense("weight").mul_(5.0)  # would splice everything back
    s.step(3)
    assert all(torch.equal(a, layer.mask("weight")) for a, layer in zip(masks, s.layers, strict=False))


def test_phases_run_conv_then_fc() -> None:
    m = tiny()
    s = DNS(m, crate=1.0, gamma=0.0, iter_stop=100, phases=["conv", "fc"], phase_length=2)
    s.step(0)
    conv, fc = s.layers
    assert conv.kept() < conv.total()
    assert fc.kept() == fc.total()
    s.step(2)
    assert fc.kept() < fc.total()


def test_squash_equals_masked_weights() -> None:
    m = tiny()
    s = DNS(m, crate=0.3, iter_stop=100)
    s.step(0)
    expected = s.masked_state_dict()
    x = torch.randn(5, 1, 8, 8)
    out_masked = m(x)
    s.squash()
    assert not any(k.endswith(("_orig", "_mask")) for k in m.state_dict())
    assert [type(x) for x in m] == [type(x) for x in tiny()]
    for k, v in m.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert torch.allclose(m(x), out_masked)
    assert isinstance(m[3].weight, nn.Parameter)


def test_masks_live_in_the_state_dict_under_prune_style_names() -> None:
    m = tiny()
    dense_weight = m[3].weight
    s = DNS(m, crate=0.5, iter_stop=100, prune_bias=False)
    keys = list(m.state_dict())
    assert keys == ["0.bias", "0.weight_orig", "0.weight_mask", "3.bias", "3.weight_orig", "3.weight_mask"]
    assert s.layers[1].dense("weight") is dense_weight  # the optimizer keeps stepping the same tensor
    assert s.model_total() == sum(p.numel() for p in tiny().parameters())  # masks are buffers, not parameters
    with pytest.raises(SurgeryError, match="already has masks"):
        DNS(m)


def test_squash_restores_the_layer_class_and_parameter_order() -> None:
    m = tiny()
    before = [(n, type(p)) for n, p in m.named_parameters()]
    s = DNS(m, crate=0.5, iter_stop=100)
    s.step(0)
    s.squash()
    assert [(n, type(p)) for n, p in m.named_parameters()] == before
    assert type(m[0]) is nn.Conv2d and type(m[3]) is nn.Linear
    DNS(m, crate=0.5)  # a squashed model can take masks again


def test_checkpoints_from_parametrize_masks_still_load() -> None:
    """Model state written when masks were torch.nn.utils.parametrize modules (before 2026-11-30)."""
    from torch.nn.utils import parametrize

    class OldMask(nn.Module):
        def __init__(self, like: torch.Tensor) -> None:
            super().__init__()
            self.mask: torch.Tensor
            self.register_buffer("mask", (torch.rand_like(like) > 0.5).to(like.dtype))

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * self.mask

    old = tiny()
    for i in (0, 3):
        for t in ("weight", "bias"):
            parametrize.register_parametrization(old[i], t, OldMask(getattr(old[i], t)), unsafe=True)
    state = old.state_dict()
    assert "3.parametrizations.weight.original" in state and "3.parametrizations.weight.0.mask" in state

    m = tiny()
    s = DNS(m, crate=0.5, iter_stop=100)
    m.load_state_dict(state)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(m(x), old(x))
    assert torch.equal(s.layers[1].mask("weight"), state["3.parametrizations.weight.0.mask"])


def test_state_dict_round_trip_keeps_statistics_masks_and_rng() -> None:
    m = tiny()
    m2 = copy.deepcopy(m)  # the same dense weights, no masks
    s = DNS(m, crate=0.5, gamma=1e-2, iter_stop=100, seed=3)
    for t in range(5):
        s.step(t)
    state = copy.deepcopy(s.state_dict())
    s2 = DNS(m2, crate=0.5, gamma=1e-2, iter_stop=100, seed=99)
    s2.load_state_dict(state)
    assert s2.stats == s.stats
    for a, b in zip(s.layers, s2.layers, strict=False):
        assert torch.equal(a.mask("weight"), b.mask("weight"))
    # same RNG: the same layers run surgery at the same next steps
    draws = [float(torch.rand((), generator=s.generator)) for _ in range(5)]
    draws2 = [float(torch.rand((), generator=s2.generator)) for _ in range(5)]
    assert draws == draws2


def test_target_mode_hits_exact_count_with_band() -> None:
    m = models.build("lenet-300-100")
    s = ScheduledSurgery(m, Target(compression=20.0), ramp=Ramp(0, 0, "one-shot"), iter_stop=100)
    s.step(0)
    assert s.compression() == pytest.approx(20.0, rel=0.01)
    kept_before = [layer.mask("weight").clone() for layer in s.layers]
    s.step(50)  # a later update at the same count with unchanged weights changes nothing
    assert all(torch.equal(a, layer.mask("weight")) for a, layer in zip(kept_before, s.layers, strict=False))


def test_per_layer_kept_fractions() -> None:
    m = models.build("lenet-300-100")
    s = ScheduledSurgery(m, Target(layer_kept={"fc1": 0.02, "fc2": 0.1, "fc3": 0.5}), ramp=Ramp(0, 0, "one-shot"))
    s.step(0)
    kept = {r.name: r.kept_fraction for r in s.report()}
    assert kept == pytest.approx({"fc1": 0.02, "fc2": 0.1, "fc3": 0.5}, abs=0.002)


def test_ramp_shapes() -> None:
    cubic = Ramp(0, 100, "cubic")
    assert cubic.kept(0, 1000, 10) == 1000
    assert cubic.kept(100, 1000, 10) == 10
    assert 10 < cubic.kept(50, 1000, 10) < 505  # faster than linear early
    steps = Ramp(0, 100, "steps", rounds=2)
    assert steps.kept(0, 1000, 10) == pytest.approx(100.0)  # first round prunes at t0
    assert steps.kept(50, 1000, 10) == pytest.approx(10.0)
    with pytest.raises(SurgeryError):
        Ramp(10, 5)


def test_layer_floor_keeps_the_total_exact() -> None:
    m = models.build("lenet-300-100")
    s = ScheduledSurgery(m, Target(compression=100.0), ramp=Ramp(0, 0, "one-shot"), min_layer_kept=0.005)
    s.step(0)
    kept = {r.name: r for r in s.report()}
    assert all(r.kept >= 0.005 * r.total for r in kept.values())
    assert sum(r.kept for r in kept.values()) == s.final_kept
    with pytest.raises(SurgeryError, match="more than the target allows"):
        ScheduledSurgery(models.build("lenet-300-100"), Target(compression=100.0), ramp=Ramp(0, 0), min_layer_kept=0.02)


def test_scheduled_surgery_stops_at_iter_stop() -> None:
    m = tiny()
    s = ScheduledSurgery(m, Target(compression=4.0), ramp=Ramp(0, 10, "cubic"), interval=5, iter_stop=20)
    for t in range(20):
        s.step(t)
    assert s.compression() == pytest.approx(4.0, rel=0.05)
    before = [layer.mask("weight").clone() for layer in s.layers]
    with torch.no_grad():
        for layer in s.layers:
            layer.dense("weight").copy_(torch.randn_like(layer.dense("weight")))
    s.step(20)
    assert s.frozen
    assert all(torch.equal(a, layer.mask("weight")) for a, layer in zip(before, s.layers, strict=True))


def test_each_method_runs_at_its_own_timing_unless_a_schedule_is_given() -> None:
    target = Target(compression=10.0)
    dns = make_surgery("dns", models.build("lenet-300-100"), 1000, target)
    agp = make_surgery("agp", models.build("lenet-300-100"), 1000, target)
    assert isinstance(dns, ScheduledSurgery) and isinstance(agp, ScheduledSurgery)
    # DNS: target reached at 30% of the budget, surgery until 50%; AGP: ramp over the first half
    assert (dns.ramp.t1, dns.iter_stop) == (300, 500)
    assert (agp.ramp.t1, agp.iter_stop) == (500, 501)
    given = make_surgery("dns", models.build("lenet-300-100"), 1000, target,
                         MethodSettings(schedule=Schedule(ramp_end=0.6, surgery_end=0.8)))  # fmt: skip
    assert isinstance(given, ScheduledSurgery) and (given.ramp.t1, given.iter_stop) == (600, 800)


@pytest.mark.parametrize(("method", "unread"), [
    ("dns", ("han_rounds",)),
    (CRATE_DRIVEN, ("han_rounds",)),  # reads surgery_end as its iter_stop
    ("agp", ("surgery_end", "han_rounds")),
    ("han", ("surgery_end",)),
    ("one-shot", ("surgery_end", "han_rounds")),
])  # fmt: skip
def test_the_schedule_fields_a_method_does_not_read_are_named(method: str, unread: tuple[str, ...]) -> None:
    """The report gives None for these: a surgery_end after the ramp changes no mask outside DNS's rules."""
    from dns_core.methods import unread_schedule_fields

    assert unread_schedule_fields(method) == unread
    if "surgery_end" in unread:
        target = Target(compression=10.0)
        early = make_surgery(method, models.build("lenet-300-100"), 1000, target,
                             MethodSettings(schedule=Schedule(ramp_end=0.3, surgery_end=0.4)))  # fmt: skip
        late = make_surgery(method, models.build("lenet-300-100"), 1000, target,
                            MethodSettings(schedule=Schedule(ramp_end=0.3, surgery_end=0.9)))  # fmt: skip
        assert isinstance(early, ScheduledSurgery) and isinstance(late, ScheduledSurgery)
        assert early.iter_stop == late.iter_stop == early.ramp.t1 + 1


def test_a_short_dns_ramp_updates_its_masks_often_enough() -> None:
    """DNS's ramp gets at least DNS_RAMP_UPDATES mask updates (one at most every 50 iterations);
    AGP keeps one every 50 iterations whatever the budget."""
    from dns_core.methods import DNS_RAMP_UPDATES

    assert Schedule(interval=50).update_interval(360) == 50
    assert Schedule(interval=50, ramp_updates=64).update_interval(360) == 5
    assert Schedule(interval=50, ramp_updates=64).update_interval(7_500) == 50
    assert Schedule(interval=50, ramp_updates=64).update_interval(10) == 1
    assert Schedule(interval=50, ramp_updates=64).update_interval(0) == 50
    target = Target(compression=10.0)

    def built(method: str, iterations: int) -> ScheduledSurgery:
        s = make_surgery(method, models.build("lenet-300-100"), iterations, target)
        assert isinstance(s, ScheduledSurgery)
        return s

    short = built("dns", 1200)
    assert short.interval == 360 // DNS_RAMP_UPDATES == 5
    # the ramp's updates: every 5 iterations from 0 to 360
    updates = [t for t in range(short.iter_stop) if short.ramp.t0 <= t <= short.ramp.t1 and t % short.interval == 0]
    assert len(updates) >= DNS_RAMP_UPDATES
    assert built("dns", 25_000).interval == 50
    assert built("agp", 1200).interval == 50
    # a schedule given whole runs as given
    given = make_surgery("dns", models.build("lenet-300-100"), 1200, target,
                         MethodSettings(schedule=Schedule(ramp_end=0.3, surgery_end=0.5)))  # fmt: skip
    assert isinstance(given, ScheduledSurgery) and given.interval == 50


@pytest.mark.parametrize("method", ["dns", "agp"])
def test_layer_allocation_cuts_every_layer_where_the_global_threshold_leaves_one_dense(method: str) -> None:
    """A small layer of large weights beside a big layer of small ones: one magnitude threshold over
    both keeps the small layer whole; cutting each layer relative to its own spread prunes both."""

    def run(allocation: str) -> dict[str, float]:
        torch.manual_seed(0)
        small = nn.Linear(64, 4)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), small)
        with torch.no_grad():
            small.weight.mul_(20)
            small.bias.mul_(20)
        settings = MethodSettings(allocation=allocation)
        surgery = make_surgery(method, model, 100, Target(compression=3.0), settings)
        for t in range(100):
            surgery.step(t)
        assert abs(surgery.compression() - 3.0) < 0.05
        return {r.name: r.kept_fraction for r in surgery.report()}

    globally = run("global")
    assert globally["2"] >= 0.9 and globally["0"] < 0.3, globally  # the small layer nearly whole
    layer = run("layer")
    assert all(0.3 < f < 0.37 for f in layer.values()), layer  # both cut to about a third
    uniform = run("uniform")
    assert all(abs(f - uniform["0"]) < 0.01 for f in uniform.values()), uniform  # the same fraction everywhere
    # balanced: the ranking still favours the small layer, up to its ceiling 1 - (1 - 1/3)/4
    balanced = run("balanced")
    ceiling = 1 - (1 - 1 / 3) / BALANCE
    assert abs(balanced["2"] - ceiling) <= 1 / 260, balanced  # within one weight (the band is rounded)
    assert globally["0"] < balanced["0"] < 1 / 3, balanced
    with pytest.raises(SurgeryError, match="unknown allocation"):
        make_surgery(method, nn.Linear(4, 4), 10, Target(compression=2.0), MethodSettings(allocation="even"))


class _Reordered(nn.Module):
    """Registers its head before its stem: only the forward pass tells which runs first."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8 * 4 * 4, 10)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.body(torch.relu(self.stem(x)))).flatten(1))
        return out


def test_the_first_convolution_and_the_head_are_found_by_the_forward_pass() -> None:
    model = _Reordered()
    assert first_and_last(model, torch.zeros(2, 3, 4, 4)) == ["stem", "head"]
    assert first_and_last(model) == ["stem"]  # registration order without an example: wrong, as expected
    mlp = models.build("lenet-300-100")
    assert first_and_last(mlp, torch.zeros(2, 1, 28, 28)) == ["fc3"]  # an MLP's first layer is no convolution


@pytest.mark.parametrize(
    ("first_last", "compression", "dense"),
    [
        ("auto", 4.0, ["stem.0", "fc"]),  # both small beside what the target keeps
        ("auto", 16.0, ["stem.0"]),  # the head (650) would pass 10% of the kept weights: only the stem
        ("auto", 108.0, []),  # both together would take too much
        ("dense", 16.0, ["stem.0", "fc"]),
        ("prune", 4.0, []),
    ],
)
def test_the_first_convolution_and_the_head_stay_dense_while_they_are_small(
    first_last: str, compression: float, dense: list[str]
) -> None:
    model = models.build("resnet-small")
    example = torch.zeros(2, 1, 28, 28)
    settings = MethodSettings(first_last=first_last)
    surgery = make_surgery("dns", model, 100, Target(compression=compression), settings, example=example)
    assert surgery.left_dense == dense
    pruned = {layer.name for layer in surgery.layers}
    assert not pruned & set(dense) and {"stem.0", "fc"} - set(dense) <= pruned
    for t in range(100):
        surgery.step(t)
    assert isinstance(surgery, ScheduledSurgery)
    assert sum(layer.kept() for layer in surgery.layers) == surgery.final_kept  # the target holds either way
    total = sum(p.numel() for p in model.parameters())
    assert surgery.final_kept + total - surgery.prunable_total() == total // compression
    modules = dict(model.named_modules())
    assert all("weight_mask" not in dict(modules[n].named_buffers()) for n in dense)  # no mask: untouched


def test_the_crate_driven_method_and_per_layer_targets_prune_the_first_and_last_layers() -> None:
    example = torch.zeros(2, 1, 28, 28)
    crates = make_surgery("dns-fixed-crates", models.build("lenet-5"), 100, None, example=example)
    assert crates.left_dense == [] and {layer.name for layer in crates.layers} >= {"conv1", "fc2"}
    per_layer = make_surgery("agp", models.build("lenet-5"), 100, Target(layer_kept={"fc2": 0.5}), example=example)
    assert per_layer.left_dense == []


def test_a_selection_of_only_the_first_and_last_layers_prunes_them() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    surgery = make_surgery("dns", model, 10, Target(compression=2.0), example=torch.zeros(2, 1, 28, 28))
    assert surgery.left_dense == [] and len(surgery.layers) == 2


# -- fidelity: three mutations of the reference rule that these tests catch ---------------------------------


def test_statistics_pool_the_bias_with_the_weights() -> None:
    """μ and σ of a layer are taken over its weights and its bias together (zeros left out), as the
    authors' code does; statistics from the weights alone would differ here."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([3.0, -2.0, 0.0, 5.0]))  # large, and one exact zero
    surgery = DNS(nn.Sequential(layer), crate=0.5, gamma=0.0)
    surgery.compute_statistics()
    values = torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])
    values = values[values != 0].abs().double()
    stats = surgery.stats["0"]
    assert stats.count == 32 + 3
    assert stats.mu == pytest.approx(float(values.mean()), rel=1e-6)
    assert stats.sigma == pytest.approx(float(((values**2).mean() - values.mean() ** 2).sqrt()), rel=1e-6)


def test_each_layer_draws_its_own_surgery_chance(monkeypatch: pytest.MonkeyPatch) -> None:
    """At a surgery probability of 0.5 each layer decides on its own draw: over 200 iterations the layers
    often do not update together (one draw shared by all layers would make them always agree)."""
    from dns_core import rule

    torch.manual_seed(0)
    surgery = DNS(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)), crate=0.2, iter_stop=10**6)
    owner = {layer.name: i for i, layer in enumerate(surgery.layers)}
    updates: list[set[int]] = []
    real = DNS._surgery

    def record(self: DNS, chosen: list[Any]) -> None:
        updates[-1].update(owner[entry.layer.name] for entry in chosen)
        real(self, chosen)

    monkeypatch.setattr(DNS, "_surgery", record)
    monkeypatch.setattr(rule, "surgery_probability", lambda t, gamma, power: 0.5)
    for t in range(200):
        updates.append(set())
        surgery.step(t)
    assert sum(0 < len(u) < 3 for u in updates) > 100, updates[:10]  # some layers update, others not
    counts = [sum(i in u for u in updates) for i in range(3)]
    assert all(60 < c < 140 for c in counts), counts  # each layer about half the time


def test_bias_masks_are_updated_like_the_weights() -> None:
    """A bias entry under 0.9θ is pruned and one over 1.1θ spliced back, as the weights are."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 6)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([1e-4, -1e-4, 2.0, -2.0, 1e-5, 3.0]))
    surgery = DNS(nn.Sequential(layer), crate=0.0, gamma=0.0, iter_stop=10)
    surgery.step(0)
    pruned = surgery.layers[0]
    bias_mask = pruned.mask("bias")
    assert bias_mask.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    with torch.no_grad():
        pruned.dense("bias")[0] = 5.0  # grows back over 1.1θ: spliced at the next step
    surgery.step(1)
    assert pruned.mask("bias")[0] == 1.0


class _Encoder(nn.Module):
    """Token features through two nn.TransformerEncoder layers (q, k, v inside nn.MultiheadAttention)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.encoder(self.embed(x)).mean(1))
        return out


@pytest.mark.parametrize("method", ["dns", "agp", "dns-fixed-crates"])
def test_attention_projections_are_pruned_like_any_linear(method: str) -> None:
    """nn.MultiheadAttention keeps q, k, v in its own in_proj_weight: it is a layer of the selection, its
    masked projections compute the attention, and squashing gives back the model's own state-dict keys."""
    torch.manual_seed(0)
    model, x = _Encoder(), torch.randn(4, 5, 8)
    keys = list(model.state_dict())
    target = None if method == "dns-fixed-crates" else Target(compression=4.0)
    surgery = make_surgery(method, model, 60, target, MethodSettings(first_last="prune"), example=x)
    names = [layer.name for layer in surgery.layers]
    assert {"encoder.layers.0.self_attn", "encoder.layers.0.self_attn.out_proj"} <= set(names)
    attention = surgery.layers[names.index("encoder.layers.1.self_attn")]
    assert attention.tensors == ["in_proj_weight", "in_proj_bias"]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for t in range(60):
        surgery.step(t)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    mask = attention.mask("in_proj_weight")
    assert 0 < float(mask.mean()) < 1
    block = model.encoder.layers[1].self_attn
    assert torch.equal(block.in_proj_weight, attention.dense("in_proj_weight") * mask)  # what the block computes with
    model.eval()
    with torch.no_grad():
        before = model(x)
    surgery.squash()
    with torch.no_grad():
        after = model(x)
    assert list(model.state_dict()) == keys and torch.allclose(before, after, atol=1e-6)
    assert float((block.in_proj_weight == 0).float().mean()) == pytest.approx(1 - float(mask.mean()))


@pytest.mark.parametrize("method", ["dns", "agp"])
def test_balanced_allocation_neither_empties_a_small_layer_nor_leaves_one_whole(method: str) -> None:
    """Three layers: a small one of tiny weights (the plain ranking empties it), a small one of large
    weights (the plain ranking keeps it whole) and a big one. Balanced keeps each inside its band."""

    def run(allocation: str) -> dict[str, float]:
        torch.manual_seed(1)
        tiny, big = nn.Linear(16, 32), nn.Linear(512, 2)
        model = nn.Sequential(tiny, nn.ReLU(), nn.Linear(32, 512), nn.ReLU(), big)
        with torch.no_grad():
            for p in (tiny.weight, tiny.bias):
                p.mul_(1e-3)
            for p in (big.weight, big.bias):
                p.mul_(50)
        chosen = MethodSettings(allocation=allocation, first_last="prune")
        surgery = make_surgery(method, model, 100, Target(compression=8.0), chosen)
        for t in range(100):
            surgery.step(t)
        assert abs(surgery.compression() - 8.0) < 0.05
        return {r.name: r.kept_fraction for r in surgery.report()}

    plain = run("global")
    assert plain["0"] < 0.01 and plain["4"] > 0.9, plain
    balanced = run("balanced")
    f = 1 / 8
    assert f / BALANCE - 0.01 <= balanced["0"] <= f, balanced  # held at its floor, not emptied
    assert 0.5 < balanced["4"] <= 1 - (1 - f) / BALANCE + 0.01, balanced  # held at its ceiling, not whole


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 40), min_size=1, max_size=5),
    scales=st.lists(st.floats(1e-3, 1e3), min_size=5, max_size=5),
    share=st.floats(0.01, 1.0),
    balance=st.floats(1.0, 10.0),
)
def test_the_band_holds_and_the_count_is_exact(
    sizes: list[int], scales: list[float], share: float, balance: float
) -> None:
    torch.manual_seed(0)
    linears = [nn.Linear(n, 1, bias=False) for n in sizes]
    with torch.no_grad():
        for linear, scale in zip(linears, scales, strict=False):
            linear.weight.mul_(scale)
    model = nn.Sequential(*linears)
    total = sum(sizes)
    s = ScheduledSurgery(model, Target(compression=2.0), ramp=Ramp(0, 0, "one-shot"), balance=balance)
    k = max(1, round(share * total))
    s._banded(k, balance)
    assert sum(layer.kept() for layer in s.layers) == k
    f = k / total
    for layer in s.layers:
        n = layer.total()
        assert math.floor(n * f / balance) <= layer.kept() <= max(n - math.floor(n * (1 - f) / balance), 0)


def _bands(draw: st.DrawFn) -> tuple[list[torch.Tensor], list[int], list[int], int]:
    """Layers of scores (continuous, or some layers of a few repeated values so that ties straddle the bounds),
    each with a band low <= high, and how many candidates to choose."""
    tied = draw(st.booleans())
    flats, lows, highs = [], [], []
    for n in draw(st.lists(st.integers(1, 60), min_size=1, max_size=4)):
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        flat = torch.rand(n, generator=g) * draw(st.floats(1e-3, 1e3))
        if tied and draw(st.booleans()):
            flat = torch.round(flat * 3 / flat.max().clamp_min(1e-9))
        lo = draw(st.integers(0, n))
        flats.append(flat)
        lows.append(lo)
        highs.append(draw(st.integers(lo, n)))
    room = sum(hi - lo for lo, hi in zip(lows, highs, strict=True))
    return flats, lows, highs, draw(st.integers(-1, room + 2))


@settings(max_examples=300, deadline=None)
@given(st.composite(_bands)())
@example(([torch.tensor([3.0, 3.0, 2.0]), torch.tensor([2.5])], [1, 0], [3, 1], 2))  # a tie across a band's lower edge
@example(([torch.tensor([1.0, 1.0, 2.0, 0.0]), torch.tensor([0.5])], [0, 0], [2, 1], 3))  # across its upper end
def test_band_counts_by_threshold_equal_those_by_sorting(
    case: tuple[list[torch.Tensor], list[int], list[int], int],
) -> None:
    """The balanced allocation's counts from partial selections equal those from sorting every layer,
    and the partial selections decline (None) only where equal scores straddle a boundary."""
    flats, lows, highs, rest = case
    by_sorting = surgery_module._band_counts_by_sorting(flats, lows, highs, rest)
    by_threshold = surgery_module._band_counts_by_threshold(flats, lows, highs, rest)
    if by_threshold is not None:
        assert by_threshold == by_sorting
    elif all(len(set(f.tolist())) == f.numel() for f in flats) and len({v for f in flats for v in f.tolist()}) == sum(
        f.numel() for f in flats
    ):
        pytest.fail("no score repeats, yet the threshold path declined")


def test_a_balanced_run_takes_the_same_masks_with_and_without_sorting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A target-driven DNS run with the default balanced allocation: the masks after every update are
    the same whether the counts come from partial selections or from sorting every layer, and the
    partial selections do serve the run."""
    taken: list[bool] = []
    threshold = surgery_module._band_counts_by_threshold

    def recording(*args: Any) -> list[int] | None:
        counts = threshold(*args)
        taken.append(counts is not None)
        return counts

    def run(fast: bool) -> list[list[torch.Tensor]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10))
        if fast:
            monkeypatch.setattr(surgery_module, "_band_counts_by_threshold", recording)
        else:
            monkeypatch.setattr(surgery_module, "_band_counts_by_threshold", lambda *args: None)
        s = ScheduledSurgery(model, Target(compression=8.0), ramp=Ramp(0, 60, "cubic"), interval=5, balance=BALANCE)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
        masks = []
        for t in range(70):
            s.step(t)
            masks.append([layer.mask(n).clone() for layer in s.layers for n in layer.tensors])
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        return masks

    slow, fast = run(False), run(True)
    assert taken and all(taken)
    for a, b in zip(slow, fast, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
