import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dns_core import rule


def test_statistics_pool_weights_and_bias_and_skip_exact_zeros() -> None:
    w = torch.tensor([[1.0, -3.0], [0.0, 0.0]])
    b = torch.tensor([2.0, 0.0])
    s = rule.layer_statistics([w, b])
    assert s.count == 3
    assert s.mu == pytest.approx(2.0)  # (1 + 3 + 2) / 3
    assert s.sigma == pytest.approx(math.sqrt((1 + 9 + 4) / 3 - 4.0))


def test_threshold_is_clamped_at_zero() -> None:
    s = rule.LayerStatistics(mu=1.0, sigma=2.0, count=10)
    assert rule.threshold(s, 1.5) == pytest.approx(4.0)
    assert rule.threshold(s, -1.0) == 0.0


def test_band_edges() -> None:
    theta = 1.0
    w = torch.tensor([0.90, 0.9001, 1.10, 1.1001, 0.5, 2.0])
    kept = torch.ones(6)
    pruned = torch.zeros(6)
    # kept weights: pruned at |w| <= 0.9θ only
    assert rule.update_mask(w, kept, theta).tolist() == [0, 1, 1, 1, 0, 1]
    # pruned weights: spliced at |w| > 1.1θ only
    assert rule.update_mask(w, pruned, theta).tolist() == [0, 0, 0, 1, 0, 1]


def test_nothing_changes_inside_the_band() -> None:
    g = torch.Generator().manual_seed(0)
    theta = 0.7
    w = (torch.rand(1000, generator=g) * 0.2 * theta + 0.9 * theta + 1e-6) * torch.sign(torch.randn(1000, generator=g))
    mask = (torch.rand(1000, generator=g) > 0.5).float()
    assert torch.equal(rule.update_mask(w, mask, theta), mask)


def test_in_place_update_matches_pure_update() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 40, generator=g)
    mask = (torch.rand(300, 40, generator=g) > 0.3).float()
    expected = rule.update_mask(w, mask, 0.8)
    out = mask.clone()
    rule.update_mask_(w, out, 0.8)
    assert torch.equal(out, expected)
    assert not torch.equal(expected, mask)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 3000), st.floats(0.0, 2.0), st.sampled_from([0.0, 1e-3, 0.4, 1.3])),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 2**31 - 1),
)
def test_batched_update_equals_one_tensor_at_a_time(layers: list[tuple[int, float, float]], seed: int) -> None:
    """update_masks_ over many tensors gives each mask exactly what update_mask_ gives it alone, θ = 0 included."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(n, generator=g) * scale for n, scale, _ in layers]
    thetas = [theta for _, _, theta in layers]
    masks = [(torch.rand(w.shape, generator=g) > 0.5).float() for w in weights]
    # weights on both edges of the band and exact zeros, where a different rounding would show
    for w, theta in zip(weights, thetas, strict=True):
        w[: min(4, len(w))] = torch.tensor([0.9 * theta, -1.1 * theta, 0.0, 1.1 * theta])[: min(4, len(w))]
    expected = [rule.update_mask(w, m, theta) for w, m, theta in zip(weights, masks, thetas, strict=True)]
    rule.update_masks_(weights, masks, thetas)
    for got, want in zip(masks, expected, strict=True):
        assert torch.equal(got, want)


def test_batched_update_leaves_the_weights_and_their_gradient_graph_alone() -> None:
    w = torch.randn(50, requires_grad=True)
    before = w.detach().clone()
    mask = torch.ones(50)
    rule.update_masks_([w], [mask], [0.5])
    assert torch.equal(w.detach(), before) and w.grad is None
    assert torch.equal(mask, rule.update_mask(before, torch.ones(50), 0.5))
    rule.update_masks_([], [], [])  # nothing to update is no error


def test_surgery_probability() -> None:
    assert rule.surgery_probability(0, 1e-3, 1.0) == 1.0
    assert rule.surgery_probability(1000, 1e-3, 1.0) == pytest.approx(0.5)
    assert rule.surgery_probability(1000, 1e-3, 2.0) == pytest.approx(0.25)


def test_hysteresis_topk_equals_band_rule() -> None:
    """Top-k of the hysteresis scores is exactly the banded update at the implied θ."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5000, generator=g)
    mask = (torch.rand(5000, generator=g) > 0.5).float()
    scores = rule.hysteresis_scores(w, mask)
    k = 1234
    theta = float(torch.topk(scores, k + 1).values[-1])  # the (k+1)-th score: everything above is kept
    banded = rule.update_mask(w, mask, theta)
    assert int(banded.sum()) == k
    topk = torch.zeros(5000)
    topk[torch.topk(scores, k).indices] = 1
    assert torch.equal(banded, topk)


def test_cubic_schedule() -> None:
    assert rule.cubic_schedule(0, 0, 100, 1.0, 0.1) == 1.0
    assert rule.cubic_schedule(100, 0, 100, 1.0, 0.1) == pytest.approx(0.1)
    assert rule.cubic_schedule(50, 0, 100, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.125)
