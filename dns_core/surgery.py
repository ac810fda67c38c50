"""Masked layers and the surgery schedules that change their masks.

One mechanism serves every method. Each selected Linear / ConvNd layer keeps its dense tensor W
as the parameter ``<name>_orig`` and a 0/1 mask T as the buffer ``<name>_mask`` (weight, and bias
unless told otherwise; the names ``torch.nn.utils.prune`` uses), and reading ``layer.weight``
gives W ⊙ T, so the layer's own forward computes with the masked weights. What differs between
methods is only

- the gradient: DNS passes ∂L/∂(W ⊙ T) straight through to every dense weight, pruned ones
  included, so that they can grow back (splice); the baselines mask it, as pruning always has;
- how and when masks change (:meth:`Surgery.step`).

The masked tensors are properties of a subclass the layer's class is swapped to (what
``torch.nn.utils.parametrize`` does too, without its module-per-tensor layers, which cost about
a fifth of the surgery step's overhead on LeNet-5). Serialize through ``state_dict()``.

Lifecycle, as in ``torch.ao.pruning``: construct (prepare) → ``step(t)`` before each training
iteration → ``state_dict()`` / ``load_state_dict()`` for checkpoints → ``squash()`` to get the
plain pruned model W ⊙ T.
"""

from __future__ import annotations

import fnmatch
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import fused, rule
from .errors import ConfigError


class SurgeryError(ConfigError):
    """Bad surgery settings (empty selection, unknown layer names, out-of-range knobs)."""


class _StraightThrough(torch.autograd.Function):
    """W ⊙ T forward; identity backward, so every dense weight receives ∂L/∂(W ⊙ T)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _StraightThroughAll(torch.autograd.Function):
    """:class:`_StraightThrough` for many tensors in one call: W_i ⊙ T_i forward, identity backward.

    The masks come as a plain list: they take no gradient, and autograd need not look at them.
    ``ready`` holds, per tensor, W_i ⊙ T_i where the mask update has just computed it (the same
    values; see :meth:`Surgery._handed_products`) and None where it is to be computed here.
    """

    @staticmethod
    def forward(
        ctx: Any, masks: list[torch.Tensor], ready: list[torch.Tensor | None], *dense: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        todo = [i for i, r in enumerate(ready) if r is None]
        if len(todo) == len(dense):
            return tuple(torch._foreach_mul(list(dense), masks))
        made = iter(torch._foreach_mul([dense[i] for i in todo], [masks[i] for i in todo]) if todo else ())
        # an alias, so that autograd's bookkeeping lands on a fresh tensor object, not the handed one
        return tuple(r.detach() if r is not None else next(made) for r in ready)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        return (None, None, *grads)


ORIG, MASK = "_orig", "_mask"
#: the attribute holding a module's masked tensors computed for the whole model's forward pass
MASKED = "_netsurgery_masked"


def _masked_property(name: str, straight_through: bool) -> property:
    orig, mask = name + ORIG, name + MASK

    def straight(module: nn.Module) -> torch.Tensor:
        batch = module.__dict__.get(MASKED)
        if batch is not None:
            return batch[name]
        return _StraightThrough.apply(module._parameters[orig], module._buffers[mask])  # type: ignore[no-untyped-call]

    def masked(module: nn.Module) -> torch.Tensor:
        batch = module.__dict__.get(MASKED)
        if batch is not None:
            return batch[name]
        return module._parameters[orig] * module._buffers[mask]  # type: ignore[operator]

    getter: Callable[[nn.Module], torch.Tensor] = straight if straight_through else masked
    return property(getter, doc=f"{name} ⊙ mask, from the parameter {orig} and the buffer {mask}")


_MASKED_CLASSES: dict[tuple[type, tuple[str, ...], bool], type] = {}


def _masked_class(cls: type, tensors: tuple[str, ...], straight_through: bool) -> type:
    """The subclass of ``cls`` whose ``tensors`` read as W ⊙ T (one class per combination)."""
    key = (cls, tensors, straight_through)
    if key not in _MASKED_CLASSES:
        attrs: dict[str, Any] = {t: _masked_property(t, straight_through) for t in tensors}
        attrs["__doc__"] = f"{cls.__name__} with masked {', '.join(tensors)} (dns_core.surgery)"
        _MASKED_CLASSES[key] = type(f"Masked{cls.__name__}", (cls,), attrs)
    return _MASKED_CLASSES[key]


def attach_masks(module: nn.Module, tensors: Sequence[str], straight_through: bool) -> None:
    """Move each tensor W of ``module`` to ``<name>_orig``, add an all-ones ``<name>_mask``."""
    if type(module) in _MASKED_CLASSES.values():
        raise SurgeryError(f"{type(module).__name__} already has masks: squash or rebuild the model first")
    order = list(module._parameters)
    for t in tensors:
        param = module._parameters.pop(t)
        assert param is not None
        module.register_parameter(t + ORIG, param)
        module.register_buffer(t + MASK, torch.ones_like(param, requires_grad=False))
    module._netsurgery_order = order  # type: ignore[assignment]  # parameter order to restore on squash
    module.__class__ = _masked_class(type(module), tuple(tensors), straight_through)


def detach_masks(module: nn.Module, tensors: Sequence[str]) -> None:
    """Undo :func:`attach_masks`, leaving W ⊙ T in the original parameter objects."""
    order: list[str] = module.__dict__.pop("_netsurgery_order")
    module.__class__ = module.__class__.__mro__[1]
    with torch.no_grad():
        for t in tensors:
            param = module._parameters[t + ORIG]
            assert param is not None
            param.mul_(module._buffers.pop(t + MASK))  # type: ignore[arg-type]
    params = dict(module._parameters)
    for t in tensors:
        params[t] = params.pop(t + ORIG)
    module._parameters.clear()
    module._parameters.update({k: params[k] for k in order})


def _upgrade_keys(tensors: Sequence[str]) -> Callable[..., None]:
    """A load_state_dict pre-hook reading checkpoints written with torch.nn.utils.parametrize."""

    def hook(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for t in tensors:
            for old, new in ((f"parametrizations.{t}.original", t + ORIG), (f"parametrizations.{t}.0.mask", t + MASK)):
                if prefix + old in state and prefix + new not in state:
                    state[prefix + new] = state.pop(prefix + old)

    return hook


@dataclass
class PrunedLayer:
    """A selected layer and its masked tensors (``"weight"``, maybe ``"bias"``)."""

    name: str
    module: nn.Module
    tensors: list[str]
    kind: str  # "conv" or "fc"
    upgrade_hook: Any = None  # handle of the pre-hook that reads parametrize-era checkpoints

    def dense(self, tensor: str) -> torch.Tensor:
        """The dense (unmasked) parameter W."""
        param = self.module._parameters[tensor + ORIG]
        assert param is not None
        return param

    def mask(self, tensor: str) -> torch.Tensor:
        buf = self.module._buffers[tensor + MASK]
        assert buf is not None
        return buf

    def set_mask(self, tensor: str, value: torch.Tensor) -> None:
        self.mask(tensor).copy_(value)

    def kept(self) -> int:
        return sum(int(torch.count_nonzero(self.mask(t))) for t in self.tensors)

    def total(self) -> int:
        return sum(self.mask(t).numel() for t in self.tensors)


class _BatchedMasks:
    """Forward hooks on a surgery's model: every W ⊙ T of a training forward pass in one call.

    Read one at a time, each masked tensor costs a call into PyTorch and, with the straight-through
    gradient, a Python function forward and backward: a fixed cost per tensor that small layers
    and many-layer models pay at every step. Before the model's forward pass with gradients on,
    :meth:`before` multiplies all of them at once (``torch._foreach_mul``, one kernel launch per
    batch of tensors on CUDA) under one autograd function, and the layers read their tensor from
    that batch; where the last mask update computed W ⊙ T itself and nothing has changed since
    (:meth:`Surgery._handed_products`), the batch takes that product instead of multiplying
    again. :meth:`after` drops the batch when the pass ends, normally or not. Without gradients
    (evaluation) the layers keep computing one tensor at a time, so no second copy of every
    weight lives through the pass. The hooks hold the surgery weakly and act only on its own
    model: a deep copy of the model (which copies its hooks) computes one tensor at a time too.
    """

    def __init__(self, surgery: Surgery) -> None:
        self.surgery = weakref.ref(surgery)
        #: per call of the model in progress, whether it made the batch (nested calls read the outer one's)
        self.calls: list[bool] = []

    def before(self, model: nn.Module, args: Any) -> None:
        surgery = self.surgery()
        if surgery is None or surgery.model is not model:
            return
        make = torch.is_grad_enabled() and not any(self.calls)
        self.calls.append(make)
        if not make:
            return
        slots = [(layer, t) for layer in surgery.layers for t in layer.tensors]
        if not slots:
            return
        dense = [layer.dense(t) for layer, t in slots]
        masks = [layer.mask(t) for layer, t in slots]
        if surgery.straight_through:
            straight: Callable[..., Sequence[torch.Tensor]] = _StraightThroughAll.apply
            out = straight(masks, surgery._handed_products(dense, masks), *dense)
        else:
            out = torch._foreach_mul(dense, masks)
        for (layer, t), value in zip(slots, out, strict=True):
            layer.module.__dict__.setdefault(MASKED, {})[t] = value

    def after(self, model: nn.Module, args: Any, output: Any) -> None:
        surgery = self.surgery()
        if surgery is None or surgery.model is not model or not self.calls:
            return
        if self.calls.pop():
            for layer in surgery.layers:
                layer.module.__dict__.pop(MASKED, None)


@dataclass(frozen=True)
class _Handoff:
    """W ⊙ T computed by a mask update, with the storage and versions of W, T and the product it is
    valid for."""

    dense: torch.Tensor
    mask: torch.Tensor
    product: torch.Tensor
    state: tuple[int, ...]

    @staticmethod
    def _state(dense: torch.Tensor, mask: torch.Tensor, product: torch.Tensor) -> tuple[int, ...]:
        return (dense._version, mask._version, product._version, dense.data_ptr(), mask.data_ptr())

    @staticmethod
    def of(dense: torch.Tensor, mask: torch.Tensor, product: torch.Tensor) -> _Handoff:
        return _Handoff(dense, mask, product, _Handoff._state(dense, mask, product))

    def valid_for(self, dense: torch.Tensor, mask: torch.Tensor) -> bool:
        return self.dense is dense and self.mask is mask and self._state(dense, mask, self.product) == self.state


@dataclass(frozen=True)
class LayerReport:
    name: str
    kept: int
    total: int

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.total if self.total else 0.0


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All Linear, ConvNd and MultiheadAttention modules of ``model`` with their qualified names.

    A MultiheadAttention holds its query, key and value projections as its own tensors (its output
    projection is a Linear of its own), so it is a layer here: torchvision's ViT and every
    ``nn.TransformerEncoder`` keep their q, k, v weights there.
    """
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd | nn.MultiheadAttention):
            out.append((name, module))
    return out


def masked_tensors(module: nn.Module, prune_bias: bool = True) -> list[str]:
    """The names of ``module``'s tensors a surgery masks: the weight (q, k, v projections for attention),
    and the bias with ``prune_bias``."""
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            names = ["in_proj_weight"]
        else:
            names = ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        if prune_bias and module.in_proj_bias is not None:
            names.append("in_proj_bias")
        return names
    names = ["weight"]
    if prune_bias and getattr(module, "bias", None) is not None:
        names.append("bias")
    return names


def execution_order(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Names of the prunable layers in the order a forward pass of ``example`` first runs them.

    Layers the pass never reaches come after, in registration order; without ``example`` (or when
    the pass fails) the order is the registration order of :func:`prunable_layers`.
    """
    layers = prunable_layers(model)
    if example is None:
        return [n for n, _ in layers]
    seen: list[str] = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if name not in seen:
                seen.append(name)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    except Exception:  # the order is a hint: the registration order stands in
        seen = []
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen + [n for n, _ in layers if n not in seen]


def first_and_last(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """The model's first convolution (when the first layer the forward pass runs is a ConvNd) and
    its classifier head (the last Linear/ConvNd layer it runs), by :func:`execution_order`."""
    order = execution_order(model, example)
    if not order:
        return []
    modules = dict(prunable_layers(model))
    edges = [order[0]] if isinstance(modules[order[0]], nn.modules.conv._ConvNd) else []
    if order[-1] not in edges:
        edges.append(order[-1])
    return edges


def select_layers(
    model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> list[tuple[str, nn.Module]]:
    """Prunable layers whose names match an ``include`` pattern and no ``exclude`` pattern."""
    candidates = prunable_layers(model)
    names = [n for n, _ in candidates]
    for pattern in [*include, *exclude]:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise SurgeryError(
                f"layer pattern {pattern!r} matches no Linear/Conv/attention layer; prunable layers: {', '.join(names)}"
            )
    chosen = [
        (n, m)
        for n, m in candidates
        if any(fnmatch.fnmatchcase(n, p) for p in include) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]
    if not chosen:
        raise SurgeryError("the layer selection is empty: nothing to prune")
    return chosen


def resolve_per_layer(
    layers: Sequence[PrunedLayer], overrides: Mapping[str, float] | None, default: float, what: str
) -> dict[str, float]:
    """Per-layer values: ``default`` unless a pattern (exact name or glob) in ``overrides`` matches."""
    values = {layer.name: default for layer in layers}
    for pattern, value in (overrides or {}).items():
        hits = [layer.name for layer in layers if fnmatch.fnmatchcase(layer.name, pattern)]
        if not hits:
            raise SurgeryError(f"{what}: {pattern!r} names no selected layer; selected: {', '.join(v for v in values)}")
        for name in hits:
            values[name] = float(value)
    return values


class Surgery:
    """Base class: attaches masks to the selected layers of ``model`` (in place).

    Subclasses implement :meth:`_update`. ``prune_bias`` masks biases with the weight's rule, as
    the reference code does.
    """

    straight_through = False
    method = "masked"

    def __init__(
        self,
        model: nn.Module,
        *,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        prune_bias: bool = True,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.layers: list[PrunedLayer] = []
        for name, module in select_layers(model, include, exclude):
            tensors = masked_tensors(module, prune_bias)
            attach_masks(module, tensors, self.straight_through)
            hook = module.register_load_state_dict_pre_hook(_upgrade_keys(tensors))  # type: ignore[no-untyped-call]
            kind = "conv" if isinstance(module, nn.modules.conv._ConvNd) else "fc"
            self.layers.append(PrunedLayer(name, module, tensors, kind, hook))
        batch = _BatchedMasks(self)
        self._hooks = [
            model.register_forward_pre_hook(batch.before),
            model.register_forward_hook(batch.after, always_call=True),
        ]
        self.iteration = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.frozen = False
        #: layers left out of the selection on purpose and kept dense (see methods.dense_edges)
        self.left_dense: list[str] = []
        #: per mask (by identity), the W ⊙ T its last update computed (see :meth:`_handed_products`)
        self._handoff: dict[int, _Handoff] = {}

    # -- reporting ---------------------------------------------------------------------------
    def report(self) -> list[LayerReport]:
        """Kept/total of every selected layer and of the layers left dense on purpose (all kept), in
        the model's order."""
        rows = {layer.name: LayerReport(layer.name, layer.kept(), layer.total()) for layer in self.layers}
        if self.left_dense:
            modules = dict(self.model.named_modules())
            for name in self.left_dense:
                n = sum(p.numel() for p in modules[name].parameters(recurse=False))
                rows[name] = LayerReport(name, n, n)
            return [rows[name] for name, _ in prunable_layers(self.model) if name in rows]
        return list(rows.values())

    def prunable_total(self) -> int:
        return sum(layer.total() for layer in self.layers)

    def model_total(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def nonzero(self) -> int:
        """Non-zero parameters of the model as it computes (W ⊙ T for pruned tensors)."""
        masked = {id(layer.dense(t)) for layer in self.layers for t in layer.tensors}
        nz = sum(layer.kept() for layer in self.layers)
        # a kept weight that is exactly zero is not a parameter either
        nz -= sum(
            int(((layer.mask(t) != 0) & (layer.dense(t) == 0)).sum()) for layer in self.layers for t in layer.tensors
        )
        for p in self.model.parameters():
            if id(p) not in masked:
                nz += int(torch.count_nonzero(p))
        return nz

    def compression(self) -> float:
        """All parameters over the non-zero ones, as the paper counts."""
        nz = self.nonzero()
        return self.model_total() / nz if nz else math.inf

    # -- schedule ------------------------------------------------------------------------------
    def step(self, t: int) -> bool:
        """Run surgery for iteration ``t`` (call before its forward pass, and after the previous
        iteration's backward pass). True if masks changed."""
        self.iteration = t
        if self.frozen:
            return False
        return self._update(t)

    def _update(self, t: int) -> bool:
        raise NotImplementedError

    @property
    def batched(self) -> bool:
        """Whether a training forward pass computes every W ⊙ T in one call (see :meth:`unbatch`)."""
        return bool(self._hooks)

    def _hand_over(
        self, dense: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], products: Sequence[torch.Tensor]
    ) -> None:
        """Keep the products W ⊙ T a mask update computed, for the next training forward pass."""
        for d, m, p in zip(dense, masks, products, strict=True):
            self._handoff[id(m)] = _Handoff.of(d, m, p)

    def _handed_products(
        self, dense: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]
    ) -> list[torch.Tensor | None]:
        """Per (W, T) pair, the W ⊙ T handed over by the last mask update, or None.

        A product counts only while W, T and the product itself are the very tensors it was made
        from, in the same storage, and none has changed since (their version counters, which every
        in-place PyTorch op moves: an optimizer step, ``load_state_dict``, ``set_mask``), so it is
        W ⊙ T exactly.
        """
        if not self._handoff:
            return [None] * len(dense)
        out: list[torch.Tensor | None] = []
        for d, m in zip(dense, masks, strict=True):
            handed = self._handoff.get(id(m))
            out.append(handed.product if handed is not None and handed.valid_for(d, m) else None)
        return out

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: masks, iteration, RNG and subclass state."""
        return {
            "method": self.method,
            "iteration": self.iteration,
            "frozen": self.frozen,
            "rng": self.generator.get_state(),
            "masks": {f"{layer.name}.{t}": layer.mask(t).clone() for layer in self.layers for t in layer.tensors},
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["method"] != self.method:
            raise SurgeryError(f"state is for method {state['method']!r}, not {self.method!r}")
        masks = state["masks"]
        for layer in self.layers:
            for t in layer.tensors:
                key = f"{layer.name}.{t}"
                if key not in masks:
                    raise SurgeryError(f"state has no mask for {key}")
                layer.set_mask(t, masks[key])
        self.iteration = int(state["iteration"])
        self.frozen = bool(state["frozen"])
        self.generator.set_state(state["rng"])
        self._load_extra_state(state["extra"])

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        pass

    def unbatch(self) -> None:
        """Layers read W ⊙ T one tensor at a time from now on: the model's batching hooks come off.

        Same results bit for bit; what is left is the per-tensor cost the batch saves
        (``netsurgery bench overhead`` measures both in one run).
        """
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._handoff.clear()

    # -- result ----------------------------------------------------------------------------------
    def squash(self) -> nn.Module:
        """Remove the masks and leave the plain pruned model W ⊙ T (in place); returns it."""
        self.unbatch()
        for layer in self.layers:
            detach_masks(layer.module, layer.tensors)
            layer.upgrade_hook.remove()
        self.layers = []
        return self.model

    def masked_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict the squashed model would have (W ⊙ T), without squashing."""
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            hidden = {
                f"{layer.name}.{t}{suffix}" if layer.name else f"{t}{suffix}"
                for layer in self.layers
                for t in layer.tensors
                for suffix in (ORIG, MASK)
            }
            for key, value in self.model.state_dict().items():
                if key not in hidden:
                    out[key] = value.clone()
            for layer in self.layers:
                for t in layer.tensors:
                    prefix = f"{layer.name}." if layer.name else ""
                    out[prefix + t] = (layer.dense(t) * layer.mask(t)).detach().clone()
        return out


@dataclass(frozen=True)
class _PlanEntry:
    """A layer's part in DNS's mask update: θ, its (dense, mask) pairs, and those pairs prepared for
    :mod:`dns_core.fused` (None where one of them cannot be)."""

    layer: PrunedLayer
    theta: float
    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    fused: list[fused.Pair] | None

    @staticmethod
    def of(layer: PrunedLayer, theta: float, compiled: bool) -> _PlanEntry:
        pairs = [(layer.dense(n), layer.mask(n)) for n in layer.tensors]
        band, high = (rule.SPLICE_FACTOR - rule.PRUNE_FACTOR) * theta, rule.SPLICE_FACTOR * theta
        prepared = [fused.prepare(d, m, band, high) if compiled else None for d, m in pairs]
        ready = [p for p in prepared if p is not None]
        return _PlanEntry(layer, theta, pairs, ready if len(ready) == len(pairs) else None)

    def current(self) -> bool:
        """Whether the layer still holds these very tensors, in the same storage."""
        layer = self.layer
        return all(
            layer.dense(n) is d and layer.mask(n) is m for n, (d, m) in zip(layer.tensors, self.pairs, strict=True)
        ) and (self.fused is None or all(p.current() for p in self.fused))


class DNS(Surgery):
    """Dynamic Network Surgery with fixed per-layer crates: the reference rule, exactly.

    - ``crate``: default compression-rate knob c; θ_k = max(μ_k + c_k·σ_k, 0). ``crates`` maps
      layer names or glob patterns to their own c_k.
    - ``gamma``, ``power``: at iteration t each layer runs surgery with probability
      (1 + γ·t)^(−power), drawn from this object's own generator (so resume is exact).
    - ``iter_stop``: no surgery at or after this iteration; training goes on with frozen masks.
    - ``phases``: optional order of layer kinds, e.g. ``("conv", "fc")``: each kind runs surgery
      only in its window of ``phase_length`` iterations (the paper's way to avoid vanishing
      gradients); layers wait with full masks before their window and freeze after it.

    The statistics μ, σ are taken once, from the dense weights at the first surgery step, and
    are part of :meth:`state_dict`: a resumed run restores them instead of recomputing them from
    weights that are already sparse (the reference code's resume bug).
    """

    straight_through = True
    method = "dns-fixed-crates"
    #: run the mask update as one compiled pass per tensor where the tensors allow (dns_core.fused);
    #: False keeps the eager PyTorch passes (same masks bit for bit; the overhead bench's comparison)
    compiled = True

    def __init__(
        self,
        model: nn.Module,
        *,
        crate: float = 1.0,
        crates: Mapping[str, float] | None = None,
        gamma: float = 1e-4,
        power: float = 1.0,
        iter_stop: int = 14_000,
        phases: Sequence[str] | None = None,
        phase_length: int | None = None,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        prune_bias: bool = True,
        seed: int = 0,
    ) -> None:
        if gamma < 0:
            raise SurgeryError(f"gamma must be ≥ 0, got {gamma}")
        if power < 0:
            raise SurgeryError(f"power must be ≥ 0, got {power}")
        if iter_stop < 0:
            raise SurgeryError(f"iter_stop must be ≥ 0, got {iter_stop}")
        if phases is not None:
            bad = [p for p in phases if p not in ("conv", "fc")]
            if bad or len(set(phases)) != len(phases):
                raise SurgeryError(f"phases must be distinct kinds among 'conv', 'fc'; got {list(phases)}")
            if phase_length is None or phase_length <= 0:
                raise SurgeryError("phases need a positive phase_length")
        super().__init__(model, include=include, exclude=exclude, prune_bias=prune_bias, seed=seed)
        self.crates = resolve_per_layer(self.layers, crates, crate, "crates")
        self.gamma, self.power, self.iter_stop = gamma, power, iter_stop
        self.phases = list(phases) if phases else None
        self.phase_length = phase_length
        self.stats: dict[str, rule.LayerStatistics] = {}
        self._plan_cache: list[_PlanEntry] | None = None
        self._plan_compiled = self.compiled

    def compute_statistics(self) -> None:
        for layer in self.layers:
            self.stats[layer.name] = rule.layer_statistics(layer.dense(t) for t in layer.tensors)

    def thresholds(self) -> dict[str, float]:
        return {name: rule.threshold(self.stats[name], self.crates[name]) for name in self.stats}

    def _active(self, layer: PrunedLayer, t: int) -> bool:
        if self.phases is None:
            return True
        if layer.kind not in self.phases:
            return False
        assert self.phase_length is not None
        start = self.phases.index(layer.kind) * self.phase_length
        return start <= t < start + self.phase_length

    def _plan(self) -> list[_PlanEntry]:
        """Per layer: θ (fixed by the stats) and its (dense, mask) tensor pairs, each also prepared for
        the one-pass kernel where it can take them. Looked up again when a layer's tensors are no
        longer the ones looked up or their storage has moved (an in-place ``.to()``, say)."""
        if self._plan_cache is not None and (
            self._plan_compiled != self.compiled or not all(entry.current() for entry in self._plan_cache)
        ):
            self._plan_cache = None
        if self._plan_cache is None:
            if not self.stats:
                self.compute_statistics()
            thetas = self.thresholds()
            self._plan_compiled = self.compiled
            self._handoff.clear()  # products of tensors the plan no longer holds
            self._plan_cache = [_PlanEntry.of(layer, thetas[layer.name], self.compiled) for layer in self.layers]
        return self._plan_cache

    def _update(self, t: int) -> bool:
        if t >= self.iter_stop:
            self.frozen = True
            return False
        plan = self._plan()
        p = rule.surgery_probability(t, self.gamma, self.power)
        # one draw per layer per iteration, whether or not it is active, so the stream of random
        # numbers does not depend on the phase layout
        draws = torch.rand(len(plan), generator=self.generator).tolist()
        chosen = [entry for entry, draw in zip(plan, draws, strict=True) if draw < p and self._active(entry.layer, t)]
        self._surgery(chosen)
        return bool(chosen)

    def _surgery(self, chosen: Sequence[_PlanEntry]) -> None:
        """The banded update of the chosen layers' masks: one compiled pass per tensor where every
        tensor can take it (handing W ⊙ T on to the next training pass when it computes them all at
        once), else the eager passes of :func:`rule.update_masks_`."""
        if all(entry.fused is not None for entry in chosen):
            pairs = [pair for entry in chosen for pair in entry.fused or ()]
            products = fused.run(pairs, products=self.batched)
            if products:
                self._hand_over([p.weight for p in pairs], [p.mask for p in pairs], products)
            return
        weights = [d for entry in chosen for d, _ in entry.pairs]
        masks = [m for entry in chosen for _, m in entry.pairs]
        thetas = [entry.theta for entry in chosen for _ in entry.pairs]
        rule.update_masks_(weights, masks, thetas)

    def _extra_state(self) -> dict[str, Any]:
        return {name: [s.mu, s.sigma, s.count] for name, s in self.stats.items()}

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        self._plan_cache = None
        self.stats = {name: rule.LayerStatistics(float(v[0]), float(v[1]), int(v[2])) for name, v in extra.items()}


def _band_counts_by_sorting(
    flats: Sequence[torch.Tensor], lows: Sequence[int], highs: Sequence[int], rest: int
) -> list[int]:
    """Per layer, ``low`` plus how many of its ranks ``low..high-1`` (scores in descending order) are
    among the ``rest`` highest of all layers' such ranks: each layer's scores sorted."""
    ranked = [flat.sort(descending=True).values for flat in flats]
    candidates = torch.cat([r[lo:hi] for r, lo, hi in zip(ranked, lows, highs, strict=True)])
    counts = list(lows)
    if rest > 0 and candidates.numel():
        chosen = torch.zeros(candidates.numel(), dtype=torch.bool, device=candidates.device)
        chosen[torch.topk(candidates, min(rest, candidates.numel()), sorted=False).indices] = True
        offset = 0
        for i, (lo, hi) in enumerate(zip(lows, highs, strict=True)):
            counts[i] += int(chosen[offset : offset + hi - lo].sum())
            offset += hi - lo
    return counts


def _kth_largest(flat: torch.Tensor, rank: int) -> torch.Tensor:
    """The score at 0-based ``rank`` in descending order, from a partial selection of the nearer end."""
    n = flat.numel()
    if rank < n // 2:
        return torch.topk(flat, rank + 1, sorted=False).values.min()
    return torch.topk(flat, n - rank, largest=False, sorted=False).values.max()


def _band_counts_by_threshold(
    flats: Sequence[torch.Tensor], lows: Sequence[int], highs: Sequence[int], rest: int
) -> list[int] | None:
    """What :func:`_band_counts_by_sorting` gives, from partial selections and counts instead of a
    sort of every layer, or None where equal scores straddle a boundary (a band's edge or the
    ``rest``-th candidate), so that which of them counts would depend on the sort's order.

    Without such ties a layer's ranks from ``low`` on are exactly its scores up to the value at
    rank ``low``, and the ``rest`` highest candidates are exactly those at or above the
    ``rest``-th highest value. The upper ends of the bands (``high``) are looked at only where
    that many candidates of a layer are chosen: where none is reached, the candidates past them
    are below every chosen one, and the counts are the same as if they had been left out."""
    tails: list[torch.Tensor] = []  # each layer's scores from rank ``low`` on
    for flat, lo, hi in zip(flats, lows, highs, strict=True):
        n = flat.numel()
        if not 0 <= lo <= hi <= n or bool(torch.isnan(flat).any()):
            return None
        if lo == 0:
            tails.append(flat)
            continue
        if lo == n:
            tails.append(flat[:0])
            continue
        top = _kth_largest(flat, lo)
        if int((flat > top).sum()) != lo:
            return None
        tails.append(flat[flat <= top])
    if rest <= 0:
        return list(lows)
    room = [hi - lo for lo, hi in zip(lows, highs, strict=True)]
    above = _among_highest(tails, rest)
    if above is None:
        return None
    if any(a > r for a, r in zip(above, room, strict=True)):
        # a band's upper end binds: the candidates are the scores between both ends
        bands: list[torch.Tensor] = []
        for tail, r in zip(tails, room, strict=True):
            if r == 0:
                tail = tail[:0]
            elif r < tail.numel():
                bottom = _kth_largest(tail, r - 1)
                if int((tail < bottom).sum()) != tail.numel() - r:
                    return None
                tail = tail[tail >= bottom]
            bands.append(tail)
        above = _among_highest(bands, rest)
        if above is None:
            return None
    return [lo + a for lo, a in zip(lows, above, strict=True)]


def _among_highest(parts: Sequence[torch.Tensor], rest: int) -> list[int] | None:
    """How many of each part's scores are among the ``rest`` highest of all parts (all of them when
    there are no more), or None where equal scores straddle the ``rest``-th."""
    total = sum(p.numel() for p in parts)
    if rest >= total:
        return [p.numel() for p in parts]
    threshold = _kth_largest(torch.cat(list(parts)), rest - 1)
    above = [int((p >= threshold).sum()) for p in parts]
    return above if sum(above) == rest else None


@dataclass
class Target:
    """What the user asks for instead of crates.

    ``compression``: overall × (all parameters over non-zero ones), or ``layer_kept``: kept
    fraction per layer name / pattern. ``max_accuracy_drop``: budget in percentage points on
    validation data (enforced by the training loop's controller, see ``train.AccuracyBudget``).
    The budget alone asks for the highest compression within it (:attr:`searching`, see
    :mod:`dns_core.search`).
    """

    compression: float | None = None
    layer_kept: dict[str, float] | None = None
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        if self.compression is not None and self.layer_kept is not None:
            raise SurgeryError("give a target compression or per-layer kept fractions, not both")
        if self.compression is None and self.layer_kept is None and self.max_accuracy_drop is None:
            raise SurgeryError(
                "give a target compression, per-layer kept fractions, or an accuracy budget alone "
                "(the highest compression within it)"
            )
        if self.compression is not None and self.compression < 1:
            raise SurgeryError(f"target compression must be ≥ 1, got {self.compression}")
        for name, f in (self.layer_kept or {}).items():
            if not 0 < f <= 1:
                raise SurgeryError(f"kept fraction for {name!r} must be in (0, 1], got {f}")
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise SurgeryError("max_accuracy_drop must be ≥ 0")

    @property
    def searching(self) -> bool:
        """Only a budget: search for the highest compression within it."""
        return self.compression is None and self.layer_kept is None


@dataclass
class Ramp:
    """When masks tighten: from iteration ``t0`` (dense) to ``t1`` (the target's kept count).

    ``shape="cubic"`` is Zhu & Gupta's gradual schedule (kept count falls fast early, slowly
    late). ``shape="steps"`` is Han et al.'s iterative pruning: ``rounds`` prune steps at
    t0, t0 + span/R, …, the kept count shrinking by the same factor each round, with retraining
    (fixed masks) in between. ``shape="one-shot"`` cuts to the target at t0.
    """

    t0: int
    t1: int
    shape: str = "cubic"
    rounds: int = 1

    def __post_init__(self) -> None:
        if self.shape not in ("cubic", "steps", "one-shot"):
            raise SurgeryError(f"unknown ramp shape {self.shape!r}")
        if self.t1 < self.t0 or self.t0 < 0:
            raise SurgeryError(f"ramp needs 0 ≤ t0 ≤ t1, got {self.t0}, {self.t1}")
        if self.rounds < 1:
            raise SurgeryError("rounds must be ≥ 1")

    def kept(self, t: int, start: float, end: float) -> float:
        """Kept count at ``t`` going from ``start`` (at t0) to ``end``."""
        if t < self.t0:
            return start
        if self.shape == "one-shot" or t >= self.t1:
            return end
        if self.shape == "cubic":
            return rule.cubic_schedule(t, self.t0, self.t1, start, end)
        r = min(self.rounds, (t - self.t0) * self.rounds // max(self.t1 - self.t0, 1) + 1)
        return float(start * (end / start) ** (r / self.rounds))


class ScheduledSurgery(Surgery):
    """Surgery driven by a kept-count schedule toward a :class:`Target` (DNS and the baselines).

    Every ``interval`` iterations from ``ramp.t0`` until ``iter_stop`` it picks the k entries with
    the highest scores, k following the ramp. Allocation is ``"global"`` (one ranking over all
    selected layers, so large redundant layers give up most, as in the paper's per-layer
    figures) or, with per-layer kept fractions, per layer.

    - ``splice=True`` (target-driven DNS): straight-through gradients, and scores that encode
      the 0.9θ/1.1θ hysteresis band (:func:`rule.hysteresis_scores`): a pruned weight returns
      once it clearly beats the threshold.
    - ``splice=False`` (baselines): masked gradients and scores |W ⊙ T|, so pruning is final.
    - ``normalize="std"``: scores divided by each layer's standard deviation (Han et al.'s
      per-layer q·σ threshold).
    - ``uniform=True``: no ranking across layers; every layer keeps the same fraction of its
      weights (the ramp's kept count shared in proportion to layer size).
    - ``balance=κ``: one ranking, but each layer keeps between f/κ and 1 - (1 - f)/κ of its
      weights, f being the overall kept fraction at that step; κ → ∞ is the plain global ranking,
      κ = 1 is uniform.
    """

    def __init__(
        self,
        model: nn.Module,
        target: Target,
        *,
        ramp: Ramp,
        interval: int = 50,
        iter_stop: int | None = None,
        splice: bool = True,
        normalize: str = "none",
        uniform: bool = False,
        balance: float | None = None,
        min_layer_kept: float = 0.0,
        method: str = "dns",
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        prune_bias: bool = True,
        seed: int = 0,
    ) -> None:
        if interval <= 0:
            raise SurgeryError(f"interval must be positive, got {interval}")
        if normalize not in ("none", "std"):
            raise SurgeryError(f"normalize must be 'none' or 'std', got {normalize!r}")
        if not 0 <= min_layer_kept < 1:
            raise SurgeryError(f"min_layer_kept must be in [0, 1), got {min_layer_kept}")
        if balance is not None and not balance >= 1:
            raise SurgeryError(f"balance must be at least 1, got {balance}")
        self.straight_through = splice
        self.method = method
        super().__init__(model, include=include, exclude=exclude, prune_bias=prune_bias, seed=seed)
        self.target = target
        self.ramp = ramp
        self.interval = interval
        # surgery runs while t < iter_stop (as in DNS); by default it ends with the ramp's last step
        self.iter_stop = ramp.t1 + 1 if iter_stop is None else iter_stop
        if self.iter_stop <= ramp.t1:
            raise SurgeryError(f"iter_stop {self.iter_stop} must come after the ramp ends at {ramp.t1}")
        self.splice = splice
        self.normalize = normalize
        self.uniform = uniform
        self.balance = balance
        self.min_layer_kept = min_layer_kept
        self.layer_fractions: dict[str, float] | None = None
        if target.layer_kept is not None:
            self.layer_fractions = resolve_per_layer(self.layers, target.layer_kept, 1.0, "layer_kept")
        self.start_kept = float(self.prunable_total())
        self.final_kept = self._final_kept_count(target)
        floors = sum(math.ceil(min_layer_kept * layer.total()) for layer in self.layers)
        if floors > self.final_kept:
            raise SurgeryError(
                f"min_layer_kept={min_layer_kept} keeps {floors} parameters, more than the target allows "
                f"({self.final_kept})"
            )

    def _final_kept_count(self, target: Target) -> int:
        if target.compression is None:
            assert self.layer_fractions is not None
            return sum(
                round(f * layer.total()) for layer, f in zip(self.layers, self.layer_fractions.values(), strict=False)
            )
        other = self.model_total() - self.prunable_total()
        budget = math.floor(self.model_total() / target.compression) - other
        if budget <= 0:
            raise SurgeryError(f"target {target.compression}x leaves no room: {other} parameters are not prunable")
        return budget

    def retarget(self, t: int, compression: float, ramp_to: int) -> None:
        """Back off (or push on): ramp from the current kept count at ``t`` to ``compression``.

        Han's iterative pruning (``method="han"``) cuts to ``compression`` at ``t`` and retrains: one of
        its prune-and-retrain rounds; the others ramp cubically until ``ramp_to``.
        """
        if self.layer_fractions is not None:
            raise SurgeryError("retarget needs an overall compression target")
        self.target = Target(compression=compression, max_accuracy_drop=self.target.max_accuracy_drop)
        self.start_kept = float(sum(layer.kept() for layer in self.layers))
        self.final_kept = self._final_kept_count(self.target)
        if not self.splice:
            # pruning is final without splicing: never ask for more weights than are kept now
            self.final_kept = min(self.final_kept, int(self.start_kept))
        self.ramp = Ramp(t, t, "one-shot") if self.method == "han" else Ramp(t, max(ramp_to, t), "cubic")
        self.iter_stop = max(self.iter_stop, self.ramp.t1 + 1)
        self.frozen = False

    def _scores(self, layer: PrunedLayer, tensor: str, scale: float) -> torch.Tensor:
        w, m = layer.dense(tensor).detach(), layer.mask(tensor)
        s = rule.hysteresis_scores(w, m) if self.splice else (w * m).abs()
        return s / scale if scale != 1.0 else s

    def _scale(self, layer: PrunedLayer) -> float:
        """Han et al.'s per-layer σ (weights and bias pooled, kept entries only), else 1."""
        if self.normalize != "std":
            return 1.0
        kept = torch.cat([layer.dense(t).detach()[layer.mask(t).bool()] for t in layer.tensors])
        sd = float(kept.std()) if kept.numel() > 1 else 0.0
        return sd if sd > 1e-12 else 1.0

    def _update(self, t: int) -> bool:
        if t >= self.iter_stop:
            self.frozen = True
            return False
        if t < self.ramp.t0 or ((t - self.ramp.t0) % self.interval and t != self.ramp.t1):
            return False
        with torch.no_grad():
            if self.layer_fractions is not None:
                changed = False
                for layer in self.layers:
                    end = self.layer_fractions[layer.name] * layer.total()
                    changed |= self._topk([layer], round(self.ramp.kept(t, layer.total(), end)))
                return changed
            kept = self.ramp.kept(t, self.start_kept, self.final_kept)
            if self.uniform:
                share = kept / self.prunable_total()
                changed = False
                for layer in self.layers:
                    changed |= self._topk([layer], round(share * layer.total()))
                return changed
            if self.balance is not None:
                return self._banded(round(kept), self.balance)
            return self._topk(self.layers, round(kept))

    def _layer_scores(self, layer: PrunedLayer) -> list[tuple[str, torch.Tensor]]:
        scale = self._scale(layer)
        return [(name, self._scores(layer, name, scale)) for name in layer.tensors]

    def _banded(self, k: int, balance: float) -> bool:
        """Keep ``k`` entries by one ranking, each layer's count held in its band (see ``balance``).

        Each layer's scores are sorted; the entries a layer must keep (its lower bound) are taken
        first, and the rest of ``k`` goes to the best of the entries between each layer's lower and
        upper bound, so the ranking decides wherever the band leaves room.
        """
        scored = [(layer, self._layer_scores(layer)) for layer in self.layers]
        sizes = [layer.total() for layer in self.layers]
        total = sum(sizes)
        k = min(max(k, 1), total)
        f = k / total
        lows = [math.floor(n * f / balance) for n in sizes]
        floors = [min(math.ceil(self.min_layer_kept * n), n) for n in sizes]
        if sum(max(lo, fl) for lo, fl in zip(lows, floors, strict=True)) <= k:
            lows = [max(lo, fl) for lo, fl in zip(lows, floors, strict=True)]
        else:
            lows = floors
        highs = [max(n - math.floor(n * (1 - f) / balance), lo) for n, lo in zip(sizes, lows, strict=True)]
        flats = [torch.cat([s.flatten() for _, s in parts]) for _, parts in scored]
        rest = k - sum(lows)
        # on CPU a few partial selections beat sorting every layer; on a GPU the sorts are cheap and
        # the selections' round trips to the host are not
        on_cpu = all(flat.device.type == "cpu" for flat in flats)
        counts = _band_counts_by_threshold(flats, lows, highs, rest) if on_cpu else None
        if counts is None:
            counts = _band_counts_by_sorting(flats, lows, highs, rest)
        changed = False
        for (layer, parts), flat, count in zip(scored, flats, counts, strict=True):
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[torch.topk(flat, count, sorted=False).indices] = True
            offset = 0
            for name, s in parts:
                new = keep[offset : offset + s.numel()].view_as(s).to(layer.mask(name).dtype)
                changed |= not torch.equal(new, layer.mask(name))
                layer.set_mask(name, new)
                offset += s.numel()
        return changed

    def _topk(self, layers: Sequence[PrunedLayer], k: int) -> bool:
        """Keep the ``k`` highest scores over ``layers``; each layer keeps at least its floor."""
        parts = []
        for layer in layers:
            parts += [(layer, name, s) for name, s in self._layer_scores(layer)]
        flat = torch.cat([s.flatten() for _, _, s in parts])
        k = min(max(k, 1), flat.numel())
        keep = torch.zeros_like(flat, dtype=torch.bool)
        if self.min_layer_kept > 0:
            # floors first, so that the total stays exactly k
            offset = 0
            for layer in layers:
                n = layer.total()
                floor = min(math.ceil(self.min_layer_kept * n), n)
                keep[offset + torch.topk(flat[offset : offset + n], floor, sorted=False).indices] = True
                offset += n
        rest = k - int(keep.sum())
        if rest > 0:
            free = flat.masked_fill(keep, -math.inf)
            keep[torch.topk(free, rest, sorted=False).indices] = True
        changed = False
        offset = 0
        for layer, name, s in parts:
            n = s.numel()
            new = keep[offset : offset + n].view_as(s).to(layer.mask(name).dtype)
            changed |= not torch.equal(new, layer.mask(name))
            layer.set_mask(name, new)
            offset += n
        return changed

    def _extra_state(self) -> dict[str, Any]:
        r = self.ramp
        return {
            "ramp": [r.t0, r.t1, r.shape, r.rounds],
            "iter_stop": self.iter_stop,
            "start_kept": self.start_kept,
            "final_kept": self.final_kept,
            "compression": self.target.compression,
        }

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        t0, t1, shape, rounds = extra["ramp"]
        self.ramp = Ramp(int(t0), int(t1), str(shape), int(rounds))
        self.iter_stop = int(extra["iter_stop"])
        self.start_kept = float(extra["start_kept"])
        self.final_kept = int(extra["final_kept"])
        if extra["compression"] is not None:
            self.target = Target(
                compression=float(extra["compression"]), max_accuracy_drop=self.target.max_accuracy_drop
            )
