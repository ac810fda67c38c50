"""The one-pass mask update (dns_core.fused) against the eager rule, and DNS's hand-over of W ⊙ T."""

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dns_core import DNS, fused, rule
from dns_core.surgery import MASKED

BAND, HIGH = rule.SPLICE_FACTOR - rule.PRUNE_FACTOR, rule.SPLICE_FACTOR


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so that -0.0 and 0.0 differ and a NaN equals itself."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def fused_update(
    weights: list[torch.Tensor], masks: list[torch.Tensor], thetas: list[float], products: bool = True
) -> list[torch.Tensor]:
    pairs = [fused.prepare(w, m, BAND * th, HIGH * th) for w, m, th in zip(weights, masks, thetas, strict=True)]
    assert all(p is not None for p in pairs), "numba is a dependency: every contiguous float32/64 CPU pair is taken"
    return fused.run([p for p in pairs if p is not None], products=products)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3000), st.floats(1e-3, 10.0), st.floats(0.0, 2.0)), min_size=1, max_size=5),
    st.sampled_from([torch.float32, torch.float64]),
    st.integers(0, 2**31 - 1),
)
def test_the_one_pass_update_equals_the_eager_rule_bit_for_bit(
    layers: list[tuple[int, float, float]], dtype: torch.dtype, seed: int
) -> None:
    """Masks and W ⊙ T from the compiled pass equal the eager passes' and the eager product bit for
    bit, on both edges of the band, at ±0, ±inf and NaN, in float32 and float64; so do the masks of
    the pass without products. Masks holding -0.0 come out as the eager passes write them (0.0),
    though the kernels store only the entries that change."""
    g = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(n, generator=g, dtype=torch.float64) * scale).to(dtype) for n, scale, _ in layers]
    thetas = [theta for _, _, theta in layers]
    for w, theta in zip(weights, thetas, strict=True):
        edges = [0.9 * theta, -1.1 * theta, 0.0, -0.0, 1.1 * theta, math.inf, -math.inf, math.nan]
        w[: min(len(edges), len(w))] = torch.tensor(edges[: len(w)], dtype=dtype)
    # 1.0, 0.0 and -0.0 (a mask loaded from elsewhere may hold negative zeros)
    masks = [(torch.rand(w.shape, generator=g) > 0.5).to(dtype) for w in weights]
    masks = [torch.where((m == 0) & (torch.rand(m.shape, generator=g) > 0.5), -0.0, m) for m in masks]
    only = [m.clone() for m in masks]
    eager = [m.clone() for m in masks]
    rule.update_masks_(weights, eager, thetas)
    products = fused_update(weights, masks, thetas)
    assert fused_update(weights, only, thetas, products=False) == []
    for w, got, alone, want, product in zip(weights, masks, only, eager, products, strict=True):
        assert torch.equal(bits(got), bits(want))
        assert torch.equal(bits(alone), bits(want))
        assert torch.equal(bits(product), bits(w * want))


def test_a_bound_float32_rounds_either_way_is_compared_as_pytorch_compares_it() -> None:
    """|w| exactly at the float32 rounding of 1.1θ, where rounding θ's bounds differently would flip
    the mask: thetas whose 1.1θ float32 rounds up and whose 1.1θ it rounds down."""
    ups, downs = [], []
    for k in range(1, 2000):
        theta = k / 997
        high = float(np.float32(HIGH * theta))
        if high > HIGH * theta:
            ups.append(theta)
        elif high < HIGH * theta:
            downs.append(theta)
    assert ups and downs
    for theta in ups[:20] + downs[:20]:
        w = torch.tensor(
            [float(np.float32(HIGH * theta)), float(np.nextafter(np.float32(HIGH * theta), np.float32(0)))]
        )
        for start in (0.0, 1.0):
            eager = torch.full((2,), start)
            rule.update_masks_([w], [eager], [theta])
            got = torch.full((2,), start)
            fused_update([w], [got], [theta])
            assert torch.equal(got, eager), (theta, start, got, eager)


@pytest.mark.parametrize(
    "weight",
    [
        torch.randn(8, 4).t(),  # not contiguous
        torch.randn(8, 4, dtype=torch.float16),
        torch.randn(8, 4, dtype=torch.bfloat16),
        torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last),
    ],
    ids=["transposed", "float16", "bfloat16", "channels-last"],
)
def test_tensors_the_kernel_cannot_take_stay_with_the_eager_passes(weight: torch.Tensor) -> None:
    assert fused.prepare(weight, torch.ones_like(weight), 0.1, 0.5) is None
    assert fused.prepare(torch.randn(8, 4), torch.ones(8, 4, dtype=torch.float64), 0.1, 0.5) is None


def test_a_run_moves_the_version_counters_of_what_it_writes() -> None:
    w, m = torch.randn(100), torch.ones(100)
    pair = fused.prepare(w, m, 0.1, 0.5)
    assert pair is not None
    before = w._version, m._version
    (product,) = fused.run([pair], products=True)
    seen = product._version
    fused.run([pair], products=True)
    assert w._version == before[0] and m._version > before[1] and product._version > seen


def lenet_like() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 12 * 12, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def train(model: nn.Module, surgery: DNS, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for t in range(steps):
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        surgery.step(t)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()


def _record_handed(surgery: DNS, handed: list[bool]) -> Callable[..., None]:
    """A pre-hook noting whether the layer's batched W ⊙ T is a product the last update handed over."""

    def hook(module: nn.Module, args: object) -> None:
        batch = module.__dict__.get(MASKED)
        ptrs = {h.product.data_ptr() for h in surgery._handoff.values()}
        handed.append(batch is not None and batch["weight"].data_ptr() in ptrs)

    return hook


def test_dns_trains_the_same_with_the_one_pass_update_as_with_the_eager_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forty training steps of DNS: the compiled update with W ⊙ T handed to the forward pass, the
    eager passes, and the eager passes one tensor at a time end with the same masks and weights, bit
    for bit, and the compiled run really handed its products over."""
    runs = []
    for mode in ("fused", "eager", "eager-unbatched"):
        model = lenet_like()
        surgery = DNS(model, crate=0.3, gamma=1e-2, power=1.0, iter_stop=10**6)
        if mode == "eager":
            surgery.compiled = False
        if mode == "eager-unbatched":
            monkeypatch.setattr(fused, "prepare", lambda *a: None)  # as where numba is missing
        if mode == "eager-unbatched":
            surgery.unbatch()
        handed: list[bool] = []
        for layer in surgery.layers:
            layer.module.register_forward_pre_hook(_record_handed(surgery, handed))
        train(model, surgery, 40)
        monkeypatch.undo()
        runs.append((mode, {k: v.clone() for k, v in model.state_dict().items()}, handed))
    (_, reference, handed), *others = runs
    assert sum(handed) > 40, "the compiled run's forward passes took the products its updates made"
    assert reference["0.weight_mask"].min() == 0 and reference["4.weight_mask"].min() == 0
    for mode, state, used in others:
        assert not any(used), mode
        assert state.keys() == reference.keys()
        for key, value in state.items():
            assert torch.equal(bits(value), bits(reference[key])), (mode, key)


def test_a_handed_product_is_read_only_while_weights_masks_and_storage_are_unchanged() -> None:
    """After an update, a training pass reads the product the update made; after an in-place change of
    W, of T, or a new storage for W, it computes W ⊙ T afresh, and the next update works on the new
    storage."""
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    surgery = DNS(model, crate=0.5, gamma=0.0, iter_stop=10**6)
    layer = surgery.layers[0]
    x = torch.randn(4, 20)
    read: list[torch.Tensor] = []
    layer.module.register_forward_pre_hook(lambda module, args: read.append(module.__dict__[MASKED]["weight"]))

    def forward_reads_handed() -> bool:
        read.clear()
        model(x).sum().backward()
        value = read[-1]
        assert torch.equal(value, layer.dense("weight") * layer.mask("weight"))
        return any(value.data_ptr() == h.product.data_ptr() for h in surgery._handoff.values())

    surgery.step(0)
    assert layer.mask("weight").min() == 0
    assert forward_reads_handed()
    assert forward_reads_handed()  # a second pass with nothing changed (gradient accumulation)
    with torch.no_grad():
        layer.dense("weight").mul_(1.5)
    assert not forward_reads_handed()
    surgery.step(1)
    assert forward_reads_handed()
    layer.set_mask("weight", torch.ones_like(layer.mask("weight")))
    assert not forward_reads_handed()
    surgery.step(2)
    param = layer.dense("weight")
    param.data = param.data.clone() * 3  # new storage, same parameter object and version
    assert not forward_reads_handed()
    surgery.step(3)  # the update reads the new storage (the plan notices the move)
    theta = surgery.thresholds()[layer.name]
    assert torch.equal(layer.mask("weight"), rule.update_mask(param.detach(), layer.mask("weight"), theta))
    assert forward_reads_handed()


def test_a_graph_kept_across_a_mask_update_refuses_to_backpropagate() -> None:
    """The update rewrites the handed products in place and says so to autograd: backpropagating a
    pass made before the update raises instead of using the new values."""
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    surgery = DNS(model, crate=0.5, gamma=0.0, iter_stop=10**6)
    surgery.step(0)
    loss = model(torch.randn(4, 20)).square().sum()
    surgery.step(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_kernels_compile_in_memory_where_no_cache_folder_can_be_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only install without a writable cache folder (numba finds no cache locator) still
    gets the compiled pass, compiled in memory, and it gives the eager rule's masks."""
    caching = pytest.importorskip("numba.core.caching")
    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])
    fused.kernels.cache_clear()
    try:
        compiled = fused.kernels()
        assert compiled is not None
        # nothing is written to disk
        assert all(type(getattr(k, "_cache", None)).__name__ == "NullCache" for k in compiled)
        w = torch.linspace(-2.0, 2.0, 4001)
        m = (torch.arange(4001) % 2).float()
        eager = m.clone()
        rule.update_masks_([w], [eager], [1.0])
        (product,) = fused_update([w], [m], [1.0])
        assert torch.equal(m, eager)
        assert torch.equal(product, w * eager)
    finally:
        fused.kernels.cache_clear()
