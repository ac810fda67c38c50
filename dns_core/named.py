"""torchvision and timm classification models by name: ``torchvision:resnet18``, ``timm:convnext_atto``.

A user names a model from an explicit list (:data:`ALLOWED`) and gives a JSON config of
numbers, booleans and a few known strings; the weights come as a safetensors state dict. Nothing
named by the request is imported or executed: the name picks an entry of a fixed list, and the
config's keys are checked against a fixed table (:data:`CONFIG_KEYS`), with bounds, and, when the
library imports, against the model class's constructor signature. Keys that would download or load
anything (``weights``, ``pretrained``, ``checkpoint_path`` …) or that name code (``norm_layer``,
``block`` …) are refused. Every model is built with ``weights=None`` / ``pretrained=False``.

torchvision and timm are optional (``pip install netsurgery[vision]``): without them a name is
still checked against the list and the config against the table, and then refused with a
:class:`~dns_core.errors.ModelError` saying the library is not installed on this server.

The state dict written back (:func:`dns_core.io.save_model`) has the plain keys that
``torchvision.models.get_model(name, weights=None, **config)`` or
``timm.create_model(name, pretrained=False, **config)`` loads with ``load_state_dict``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

import torch
from torch import nn

from .errors import ModelError
from .inputs import ModelInput

if TYPE_CHECKING:
    from .uploads import SafetensorsHeader

log = logging.getLogger(__name__)

#: The classification models users may name, per library. Anything else is refused before importing.
ALLOWED: Final[dict[str, frozenset[str]]] = {
    "torchvision": frozenset(
        {
            "resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "wide_resnet50_2",
            "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
            "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_v2_s",
            "convnext_tiny", "convnext_small", "regnet_y_400mf", "vit_b_16", "swin_t", "densenet121",
            "shufflenet_v2_x1_0", "squeezenet1_1", "vgg11_bn", "vgg16_bn", "alexnet",
        }
    ),
    "timm": frozenset(
        {
            "resnet18", "resnet26", "resnet34", "resnet50",
            "convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny",
            "efficientnet_b0", "mobilenetv3_small_100", "mobilenetv3_large_100",
            "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
            "deit_tiny_patch16_224", "deit_small_patch16_224", "regnety_002", "regnety_004",
        }
    ),
}  # fmt: skip

#: What the installer is told when a library is missing.
INSTALL_HINT: Final = "models by name run on GPU worker images with `pip install netsurgery[vision]`"

#: ImageNet normalisation: torchvision's classification weights (their transforms) and most of timm's.
IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
IMAGENET_STD: Final = (0.229, 0.224, 0.225)
#: timm's "inception" normalisation, which its ViT weights use.
INCEPTION_MEAN: Final = (0.5, 0.5, 0.5)
INCEPTION_STD: Final = (0.5, 0.5, 0.5)

#: Image side torchvision's weights are evaluated at (their transforms' crop size), where not 224.
TORCHVISION_SIZES: Final[dict[str, int]] = {
    "efficientnet_b1": 240,
    "efficientnet_b2": 288,
    "efficientnet_b3": 300,
    "efficientnet_v2_s": 384,
}


@dataclass(frozen=True)
class Key:
    """A config key a user may set: its JSON type and bounds (numbers) or choices (strings)."""

    kind: type
    lo: float = 0.0
    hi: float = 0.0
    choices: frozenset[str] = frozenset()
    hi_open: bool = False  # a probability: [lo, hi)

    def check(self, name: str, value: object) -> tuple[Any, str | None]:
        """The value to pass on, or a problem naming what is wrong."""
        if self.kind is bool:
            return (value, None) if type(value) is bool else (None, f"{name} must be true or false, got {value!r}")
        if self.kind is str:
            if isinstance(value, str) and value in self.choices:
                return value, None
            return None, f"{name} must be one of {', '.join(sorted(self.choices))}, got {value!r}"
        span = f"[{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.kind is int:
            if type(value) is int and self.lo <= value <= self.hi:
                return value, None
            return None, f"{name} must be an integer in {span}, got {value!r}"
        ok = type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]
        ok = ok and self.lo <= value <= self.hi and not (self.hi_open and value == self.hi)  # type: ignore[operator]
        if ok:
            return float(value), None  # type: ignore[arg-type]
        return None, f"{name} must be a number in {span}, got {value!r}"


_PROB = Key(float, 0.0, 1.0, hi_open=True)
_CLASSES = Key(int, 2, 100_000)
_SIDE = Key(int, 32, 1024)

#: The keys a config may hold, per library (a superset: each model accepts those its constructor names).
CONFIG_KEYS: Final[dict[str, dict[str, Key]]] = {
    "torchvision": {
        "num_classes": _CLASSES,
        "dropout": _PROB,
        "attention_dropout": _PROB,
        "stochastic_depth_prob": _PROB,
        "drop_rate": _PROB,  # densenet
        "zero_init_residual": Key(bool),  # resnets
        "width_mult": Key(float, 0.25, 4.0),  # mobilenet_v2
        "image_size": _SIDE,  # vit
    },
    "timm": {
        "num_classes": _CLASSES,
        "in_chans": Key(int, 1, 64),
        "img_size": _SIDE,  # vit, deit
        "drop_rate": _PROB,
        "drop_path_rate": _PROB,
        "attn_drop_rate": _PROB,
        "proj_drop_rate": _PROB,
        "pos_drop_rate": _PROB,
        "global_pool": Key(str, choices=frozenset({"avg", "max", "avgmax", "catavgmax", "token", "map"})),
    },
}

#: Keys that would make the library download or read weights or files.
LOADING_KEYS: Final = frozenset(
    {
        "weights", "weights_backbone", "pretrained", "pretrained_backbone", "pretrained_cfg",
        "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path", "progress", "cache_dir",
        "model_name", "url", "file", "hf_hub_id",
    }
)  # fmt: skip
_LOADING_SUFFIXES: Final = ("_path", "_url", "_dir", "_file", "_hub", "_hub_id")
#: Keys that name code (a layer, block or function) or change what is built beyond a classifier.
CODE_KEYS: Final = frozenset(
    {
        "block", "block_args", "block_fn", "block_setting", "norm_layer", "act_layer", "aa_layer",
        "attn_layer", "se_layer", "embed_layer", "downsample_layer", "inverted_residual_setting",
        "conv_stem_configs", "features_only", "out_indices", "scriptable", "exportable", "no_jit",
        "init_weights", "weight_init",
    }
)  # fmt: skip
_CODE_SUFFIXES: Final = ("_layer", "_fn", "_cls", "_args", "_kwargs", "_cfg", "_config")


def is_named(arch: str) -> bool:
    """True for ``torchvision:<name>`` and ``timm:<name>`` (allowed or not: :func:`split_named` judges)."""
    library, sep, _ = arch.partition(":")
    return bool(sep) and library in ALLOWED


def split_named(arch: str) -> tuple[str, str]:
    """``(library, model name)``; ModelError for a library or name not in :data:`ALLOWED` (nothing imported)."""
    library, sep, name = arch.partition(":")
    if not sep or library not in ALLOWED:
        raise ModelError(f"{arch!r} names no model library; use torchvision:<name> or timm:<name>")
    allowed = ALLOWED[library]
    if name not in allowed:
        close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(f'{library}:{c}' for c in close)}? " if close else ""
        raise ModelError(
            f"{library} model {name!r} is not offered; {hint}allowed {library} models: {', '.join(sorted(allowed))}"
        )
    return library, name


def library(name: str) -> ModuleType:
    """Import torchvision or timm; ModelError saying it is not installed when it does not import.

    A torchvision built for another torch fails with RuntimeError ("operator torchvision::nms does
    not exist"), OSError or ImportError rather than ModuleNotFoundError: all mean "not available".
    """
    if name not in ALLOWED:
        raise ModelError(f"{name!r} is not a model library netsurgery uses")
    try:
        return importlib.import_module(name)
    except (ImportError, RuntimeError, OSError, AttributeError) as e:
        log.info("%s does not import: %s: %s", name, type(e).__name__, e)
        raise ModelError(f"{name} is not installed on this server: {INSTALL_HINT}") from None


def _refusal(key: str) -> str | None:
    k = key.lower()
    if k in LOADING_KEYS or k.endswith(_LOADING_SUFFIXES) or k.startswith("pretrained"):
        return (
            f"{key!r} would download or load weights: models are built with random weights "
            "(weights=None, pretrained=False) and yours are read from the safetensors file"
        )
    if k in CODE_KEYS or k.endswith(_CODE_SUFFIXES):
        return f"{key!r} names code or changes what is built: a config holds numbers, booleans and a few known strings"
    return None


def _static_check(
    library_name: str, name: str, config: object, accepted: frozenset[str] | None = None
) -> dict[str, Any]:
    """Keys and values against :data:`CONFIG_KEYS` (and ``accepted``, the constructor's names, when known)."""
    arch = f"{library_name}:{name}"
    if not isinstance(config, Mapping):
        raise ModelError(f"config for {arch} must be a JSON object, got {type(config).__name__}")
    table = CONFIG_KEYS[library_name]
    usable = sorted(k for k in table if accepted is None or k in accepted)
    problems: list[str] = []
    out: dict[str, Any] = {}
    for key, value in config.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not a string")
            continue
        refused = _refusal(key)
        if refused is not None:
            problems.append(refused)
        elif key not in table or (accepted is not None and key not in accepted):
            problems.append(f"unknown key {key!r} (allowed for {arch}: {', '.join(usable)})")
        else:
            checked, problem = table[key].check(key, value)
            if problem is not None:
                problems.append(problem)
            else:
                out[key] = checked
    if problems:
        raise ModelError(f"bad config for {arch}: " + "; ".join(problems))
    return out


def _construct(library_name: str, name: str, config: Mapping[str, Any]) -> nn.Module:
    """The library's own constructor, never with weights; ``config`` checked already."""
    lib = library(library_name)
    if library_name == "torchvision":
        model = lib.models.get_model(name, weights=None, **config)
    else:
        model = lib.create_model(name, pretrained=False, **config)
    if not isinstance(model, nn.Module):  # pragma: no cover (both libraries return modules)
        raise ModelError(f"{library_name}:{name} did not build a torch module")
    return model


def _build(library_name: str, name: str, config: Mapping[str, Any]) -> nn.Module:
    """:func:`_construct`, also under ``torch.device("meta")``.

    A constructor that reads values while initialising (``.item()`` on a drop-path schedule) cannot
    run on the meta device: then the model is built on the CPU and moved to meta.
    """
    try:
        return _construct(library_name, name, config)
    except (RuntimeError, NotImplementedError):
        if torch.empty(0).device.type != "meta":
            raise
        with torch.device("cpu"):
            model = _construct(library_name, name, config)
        return model.to("meta")


def _available(library_name: str, name: str) -> None:
    lib = library(library_name)
    present = name in lib.models.list_models() if library_name == "torchvision" else lib.is_model(name)
    if not present:
        version = getattr(lib, "__version__", "?")
        raise ModelError(f"{library_name}:{name} is not in the installed {library_name} {version}; {INSTALL_HINT}")


_ACCEPTED: dict[str, frozenset[str]] = {}


def accepted_keys(arch: str) -> frozenset[str]:
    """The :data:`CONFIG_KEYS` this model's class takes by name (needs the library; built once on meta)."""
    if arch in _ACCEPTED:
        return _ACCEPTED[arch]
    library_name, name = split_named(arch)
    _available(library_name, name)
    with torch.device("meta"):
        cls = type(_build(library_name, name, {}))
    params = inspect.signature(cls.__init__).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    keys = frozenset(k for k in CONFIG_KEYS[library_name] if k in named)
    _ACCEPTED[arch] = keys
    return keys


def check_named_config(arch: str, config: object) -> dict[str, Any]:
    """Validate a user's JSON config for ``arch``; the config ready for :func:`build_named`.

    In order: the name against :data:`ALLOWED`, the keys and values against :data:`CONFIG_KEYS`
    (no import), then, with the library: the name in the installed version, the keys against the
    model class's constructor, and a trial build on the meta device. ModelError names every problem.
    """
    library_name, name = split_named(arch)
    out = _static_check(library_name, name, config)
    out = _static_check(library_name, name, out, accepted_keys(arch))
    try:
        with torch.device("meta"):
            _build(library_name, name, out)
    except Exception as e:  # the constructor's own refusal of a value (assert, TypeError, ValueError …)
        raise ModelError(f"{arch} does not build with config {dict(out)}: {type(e).__name__}: {e}") from None
    return out


def build_named(arch: str, **config: Any) -> nn.Module:
    """The model with random weights (``weights=None`` / ``pretrained=False``); keys checked against the table."""
    library_name, name = split_named(arch)
    return _build(library_name, name, _static_check(library_name, name, config))


def _timm_cfg(name: str) -> tuple[tuple[int, ...] | None, tuple[float, ...] | None, tuple[float, ...] | None]:
    """timm's registered input size, mean and std for ``name`` (read from its registry, nothing downloaded)."""
    try:
        timm = library("timm")
        cfg = timm.models.get_pretrained_cfg(name)  # the default tag's cfg; None when none is registered
        if cfg is None:
            return None, None, None
        fields = cfg if isinstance(cfg, Mapping) else vars(cfg)  # a dict (older timm) or a PretrainedCfg dataclass
        size, mean, std = fields.get("input_size"), fields.get("mean"), fields.get("std")
        return (
            tuple(int(v) for v in size) if size else None,
            tuple(float(v) for v in mean) if mean else None,
            tuple(float(v) for v in std) if std else None,
        )
    except Exception as e:  # missing library, or a registry API of another timm version: the static defaults
        log.debug("no timm pretrained cfg for %s: %s", name, e)
        return None, None, None


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...] | None:
    if len(values) == channels:
        return values
    if channels == 1:  # a grey model of an RGB family: the mean of the three
        return (sum(values) / len(values),)
    return None


def named_input(arch: str, config: Mapping[str, Any] | None = None) -> ModelInput:
    """What the model takes: an image (C, H, W) with its normalisation.

    torchvision: 3 channels, ``image_size`` (vit) or the size its weights are evaluated at (224
    unless :data:`TORCHVISION_SIZES` says otherwise), ImageNet mean/std. timm: ``in_chans``
    (3), ``img_size`` or the registered input size, and the registered mean/std (read from timm's
    registry when it imports; else ImageNet's, or 0.5 for ViT).
    """
    library_name, name = split_named(arch)
    config = dict(config or {})
    if library_name == "torchvision":
        side = int(config.get("image_size") or TORCHVISION_SIZES.get(name, 224))
        return ModelInput("image", (3, side, side), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    size, mean, std = _timm_cfg(name)
    vit = name.startswith("vit_")
    mean = mean or (INCEPTION_MEAN if vit else IMAGENET_MEAN)
    std = std or (INCEPTION_STD if vit else IMAGENET_STD)
    channels = int(config.get("in_chans", 3))
    height, width = (size[1], size[2]) if size and len(size) == 3 else (224, 224)
    if config.get("img_size"):
        height = width = int(config["img_size"])
    return ModelInput(
        "image", (channels, height, width), mean=_per_channel(mean, channels), std=_per_channel(std, channels)
    )


# ---------------------------------------------------------------------------------------- state dicts

_FLOAT_DTYPES: Final = frozenset({"F64", "F32", "F16", "BF16"})
_MAX_LISTED: Final = 20


@dataclass(frozen=True)
class StateEntry:
    """One tensor of a state dict as a file must hold it: its shape, and whether it is floating-point."""

    shape: tuple[int, ...]
    floating: bool


def state_shapes(module: nn.Module) -> dict[str, StateEntry]:
    """Every state-dict tensor of ``module`` (works on the meta device: shapes only)."""
    return {k: StateEntry(tuple(v.shape), v.is_floating_point()) for k, v in module.state_dict().items()}


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown if len(items) <= _MAX_LISTED else f"{shown} and {len(items) - _MAX_LISTED} more"


def compare_state(expected: Mapping[str, StateEntry], header: SafetensorsHeader, what: str = "the model") -> None:
    """ModelError listing the tensors ``header`` lacks, has in excess, or holds with a wrong shape or dtype."""
    got = header.tensors
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong: list[str] = []
    for key in sorted(set(expected) & set(got)):
        want, (dtype, shape) = expected[key], got[key]
        if want.shape != shape:
            wrong.append(f"{key}: expected {list(want.shape)}, got {list(shape)}")
        elif want.floating != (dtype in _FLOAT_DTYPES):
            kind = "floating-point" if want.floating else "integer"
            wrong.append(f"{key}: expected {kind} values, got {dtype}")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {_listing(unexpected)}")
        if wrong:
            parts.append(f"mis-shaped {_listing(wrong)}")
        raise ModelError(f"the weights do not match {what}: " + " | ".join(parts))


def check_named_state(arch: str, config: Mapping[str, Any], header: SafetensorsHeader) -> int:
    """Compare a safetensors header with ``arch`` built on the meta device; its parameter count.

    ``config`` is checked (:func:`check_named_config`) first; ModelError for any mismatch.
    """
    checked = check_named_config(arch, config)
    with torch.device("meta"):
        module = build_named(arch, **checked)
    compare_state(state_shapes(module), header, f"{arch} with config {checked}")
    return sum(p.numel() for p in module.parameters())
