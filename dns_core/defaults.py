"""The lists of what a compression run may ask for, and the engine's defaults, here once.

:class:`dns_core.spec.CompressSpec` reads them, as do
:class:`~dns_core.methods.MethodSettings`, :class:`~dns_core.train.TrainConfig`, the data loaders
and the sparse codecs. Nothing here imports torch or another module of the engine.
"""

from __future__ import annotations

from typing import Literal, get_args

Method = Literal["dns", "dns-fixed-crates", "han", "one-shot", "agp"]
Codec = Literal["float16", "int8", "shared"]
BuiltinSet = Literal["fashion-mnist", "digits"]
Objective = Literal["ce", "distill", "ce+distill"]
Allocation = Literal["balanced", "global", "layer", "uniform"]
FirstLast = Literal["auto", "dense", "prune"]

#: The compression methods (see :func:`dns_core.methods.make_surgery`).
METHODS: tuple[str, ...] = get_args(Method)
#: The value codecs of the compact sparse file (see :mod:`dns_core.sparse`).
CODECS: tuple[str, ...] = get_args(Codec)
#: The data sets that ship by name (see :func:`dns_core.data.load_builtin`).
BUILTIN_SETS: tuple[str, ...] = get_args(BuiltinSet)
#: Training objectives (see :class:`dns_core.train.TrainConfig`).
OBJECTIVES: tuple[str, ...] = get_args(Objective)

#: How a target-driven method shares the kept weights among layers: one magnitude ranking over all
#: layers with every layer's kept fraction held inside a band around the overall fraction f, at least
#: f/κ and at most 1 - (1 - f)/κ with κ = :data:`BALANCE` ("balanced": the ranking decides, but no
#: layer stays dense and none is emptied), one magnitude threshold over all layers with no band
#: ("global", the paper's rule), each layer's magnitudes over its own standard deviation in one
#: ranking ("layer"), or the same kept fraction in every layer ("uniform", the band at κ = 1).
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)
ALLOCATION = "balanced"
BALANCE = 4.0

#: What happens to the first convolution and the classifier head (the first and the last Linear/Conv
#: layer the forward pass runs): "dense" keeps them out of the selection, "prune" prunes them like any
#: other layer, "auto" keeps them dense as long as they take at most :data:`EDGE_SHARE` of the weights
#: the target keeps (smallest first), else prunes them.
FIRST_LAST: tuple[str, ...] = get_args(FirstLast)
FIRST_LAST_DEFAULT = "auto"
EDGE_SHARE = 0.1

#: The methods that search for the highest compression within an accuracy budget when no compression
#: is given (see :mod:`dns_core.search`): their kept count can be retargeted mid-run. Han's iterative
#: pruning climbs the same ladder, one prune-and-retrain round per rung.
SEARCH_METHODS = ("dns", "agp", "han")
#: The same, for messages: "dns, agp and han".
SEARCH_METHODS_TEXT = f"{', '.join(SEARCH_METHODS[:-1])} and {SEARCH_METHODS[-1]}"
#: A budget search does not know its final compression in advance: "auto" decides about the first
#: convolution and the head as for this compression (the LeNets land near it, and 2^5 is on the ladder).
SEARCH_NOMINAL = 32.0

#: The method driven by its crates alone: it takes no target, whatever the spec holds.
CRATE_DRIVEN = "dns-fixed-crates"
#: The settings only that method reads (any other method refuses them rather than ignore them).
CRATE_KNOBS = ("crate", "crates", "gamma", "power")

# The defaults, here once: MethodSettings and TrainConfig take theirs from these.
CRATE = 1.0  # c_k: a layer's threshold is max(μ_k + c_k·σ_k, 0)
GAMMA = 1e-4  # γ: the surgery probability is (1 + γ·t)^(−power)
POWER = 1.0
LR = 0.01
BATCH_SIZE = 64
ITERATIONS = 25_000  # the paper's budget for LeNet-300-100
#: evaluations on validation data per run, and at most this many iterations between progress reports
EVALUATIONS = 25
LOG_EVERY = 100

#: The keys a job's JSON spec may hold in ``target`` and in ``settings``.
TARGET_KEYS = ("compression", "layer_kept", "max_accuracy_drop")
SETTING_KEYS = ("crate", "crates", "gamma", "power", "iter_stop", "iterations", "lr", "batch_size", "seed", "codec",
                "preprocess", "allocation", "first_last", "include", "exclude")  # fmt: skip
