"""Hugging Face folders: ``config.json`` and ``model.safetensors``, built from the config alone.

A folder as the Hub stores a model (``config.json``, the weights as safetensors, one file or an
index and its shards, and any preprocessing or tokeniser files) is accepted when its architecture
is one of :data:`HF_ARCHITECTURES`: classes of transformers' own modules, named in a table here and
imported from fixed module paths. Nothing the folder names is imported or run: ``auto_map`` and
``trust_remote_code`` are refused, the config is read as JSON and built by the architecture's own
config class, and the weights are read with safetensors (``pytorch_model.bin``, a pickle, never).

:func:`inspect_hf_folder` makes every check a job would make at start, cheaply: the config
(size, keys, bounded numbers), the model built on the meta device (no memory), a memory estimate
(:func:`estimate_memory`) against a cap, and the safetensors headers against the model's tensor
names and shapes. :func:`load_hf_folder` gives the model, in fp32, wrapped as
:class:`HFClassifier` (one tensor in, logits out), whose Linear and Conv layers the surgery prunes
by name (``model.bert.encoder.layer.0.attention.self.query``). :func:`save_hf_folder` writes the
pruned model back as a folder that ``AutoModelFor….from_pretrained`` loads.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from . import cost
from .defaults import BATCH_SIZE
from .errors import ModelError
from .inputs import ModelInput

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

Task = Literal["image", "text"]

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PREPROCESSOR = "preprocessor_config.json"
#: What a folder with only pickled weights is told.
CONVERT = (
    "convert the weights to safetensors where you trust the file: "
    "AutoModelFor….from_pretrained(folder).save_pretrained(out) writes model.safetensors"
)


@dataclass(frozen=True)
class _Arch:
    task: Task
    module: str  # transformers' own module, a fixed string
    config_class: str
    model_type: str


# class name -> (task, module of transformers, config class, model_type); nothing else is ever imported
_ARCHS: dict[str, _Arch] = {
    "BertForSequenceClassification": _Arch("text", "transformers.models.bert", "BertConfig", "bert"),
    "DistilBertForSequenceClassification": _Arch(
        "text", "transformers.models.distilbert", "DistilBertConfig", "distilbert"
    ),
    "ViTForImageClassification": _Arch("image", "transformers.models.vit", "ViTConfig", "vit"),
    "ResNetForImageClassification": _Arch("image", "transformers.models.resnet", "ResNetConfig", "resnet"),
    "ConvNextForImageClassification": _Arch("image", "transformers.models.convnext", "ConvNextConfig", "convnext"),
    "MobileNetV2ForImageClassification": _Arch(
        "image", "transformers.models.mobilenet_v2", "MobileNetV2Config", "mobilenet_v2"
    ),
    "EfficientNetForImageClassification": _Arch(
        "image", "transformers.models.efficientnet", "EfficientNetConfig", "efficientnet"
    ),
}

#: The architectures accepted (``architectures[0]`` of config.json) and their task.
HF_ARCHITECTURES: dict[str, str] = {name: a.task for name, a in _ARCHS.items()}

# Caps on what config.json may ask for before anything is built from it.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_INT = 2**31 - 1  # any integer in the config
MAX_FLOAT = 1e6  # any float's magnitude
MAX_LIST = 1024  # items of a list
MAX_DEPTH = 6  # nesting of objects and lists
MAX_LABELS = 100_000
#: layers/blocks in all (num_hidden_layers, n_layers, sum of depths, EfficientNet's repeats)
MAX_BLOCKS = 512
#: token sequences are at most this long (the model input of a text model)
MAX_SEQ_LEN = 128
#: side files copied by :func:`save_hf_folder` are at most this large
MAX_SIDE_FILE_BYTES = 64 * 1024 * 1024
#: the cap on the fp32 parameters :func:`load_hf_folder` checks against unless told otherwise
DEFAULT_MAX_BYTES = 16 * 2**30

# keys that ask for code from the folder or the Hub, or for machinery never used here
_CODE_KEYS = {"auto_map", "trust_remote_code", "custom_pipelines", "code_revision"}
_REFUSED_KEYS = {"quantization_config": "quantized models are not supported; upload the fp32/fp16 weights"}
# keys dropped before the config is built: the attention kernel and dtype are chosen here
_DROPPED_KEYS = {"attn_implementation", "torch_dtype", "dtype", "use_kernels"}
# what the wrapper relies on: outputs with .logits and nothing else kept
_FORCED = {"return_dict": True, "output_hidden_states": False, "output_attentions": False, "torchscript": False}
_SIDE_FILES = frozenset(
    {
        "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
        "vocab.txt", "vocab.json", "merges.txt",
    }
)  # fmt: skip
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class HFFacts:
    """What :func:`inspect_hf_folder` found: enough to accept or refuse the upload and to fit data to it.

    ``estimate_bytes`` is :func:`estimate_memory` for the batch size inspected with;
    ``activation_bytes`` the activations of one example, to re-estimate for another batch size:
    ``parameter_bytes + batch_size × activation_bytes``. ``flops_per_example``: the forward pass of
    one example (:func:`forward_flops`); None when not counted (not training, or it could not be).
    """

    architecture: str
    task: str
    num_parameters: int
    config: dict[str, Any]
    model_input: ModelInput
    num_labels: int
    estimate_bytes: int = 0
    parameter_bytes: int = 0
    activation_bytes: int = 0
    flops_per_example: int | None = None
    #: the prunable layers (Linear, Conv, attention) as a job names them: inside :class:`HFClassifier`
    layers: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# config.json


def _reject_constant(name: str) -> float:
    raise ModelError(f"config.json holds {name}, not a number JSON allows; fix the config")


def _json_object(path: Path) -> dict[str, Any]:
    """A small JSON file holding one object (config.json, a preprocessor config); ModelError otherwise."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ModelError(f"{path.name} is {size:,} bytes, more than the {MAX_CONFIG_BYTES:,} allowed")
    try:
        data = json.loads(path.read_bytes(), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelError(f"{path.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path.name} must hold a JSON object")
    return data


def read_config(folder: Path) -> dict[str, Any]:
    """config.json as a dict, size-capped and checked (no code hints, bounded numbers and nesting)."""
    path = folder / CONFIG
    if not path.is_file() or path.is_symlink():
        raise ModelError(
            f"no {CONFIG} in the model folder: a Hugging Face model is a folder of config.json and model.safetensors"
        )
    config = _json_object(path)
    for where, key, value in _walk(config, CONFIG, 0):
        low = key.lower()
        if low in _CODE_KEYS or "remote_code" in low:
            raise ModelError(
                f"{where} has {key!r}: this model needs its own Python code, which is never run here; "
                f"supported architectures (built from the config alone): {', '.join(HF_ARCHITECTURES)}"
            )
        if low in _REFUSED_KEYS:
            raise ModelError(f"{where} has {key!r}: {_REFUSED_KEYS[low]}")
        if isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise ModelError(f"{where}.{key} = {value} is larger than {MAX_INT:,}")
        if isinstance(value, float) and abs(value) > MAX_FLOAT:
            raise ModelError(f"{where}.{key} = {value} is larger than {MAX_FLOAT:g}")
    return config


def _walk(obj: Any, where: str, depth: int) -> Iterator[tuple[str, str, Any]]:
    """(path, key, value) of every entry of nested objects and lists, with caps on depth and length."""
    if depth > MAX_DEPTH:
        raise ModelError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield where, str(key), value
            if isinstance(value, dict | list):
                yield from _walk(value, f"{where}.{key}", depth + 1)
    elif isinstance(obj, list):
        if len(obj) > MAX_LIST:
            raise ModelError(f"{where}: a list of {len(obj):,} items, more than {MAX_LIST} allowed")
        for i, value in enumerate(obj):
            yield where, f"[{i}]", value
            if isinstance(value, dict | list):
                yield from _walk(value, f"{where}[{i}]", depth + 1)


def _architecture(config: Mapping[str, Any]) -> str:
    allowed = ", ".join(HF_ARCHITECTURES)
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise ModelError(f'{CONFIG} names no architecture ("architectures": [...]); supported: {allowed}')
    if len(archs) != 1:
        raise ModelError(f"{CONFIG} names {len(archs)} architectures ({', '.join(archs)}); give exactly one")
    name = archs[0]
    if name not in _ARCHS:
        raise ModelError(
            f"architecture {name!r} is not supported (only classifiers transformers builds from config.json "
            f"alone are): {allowed}"
        )
    arch = _ARCHS[name]
    model_type = config.get("model_type")
    if model_type != arch.model_type:
        raise ModelError(
            f"{CONFIG}: model_type {model_type!r} does not match {name}, which needs model_type {arch.model_type!r}"
        )
    return name


def _int(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(f"{CONFIG}: {key} must be an integer, got {value!r}")
    return value


def _check_counts(name: str, config: Mapping[str, Any]) -> None:
    """Bound what makes the model's module count grow (layers, blocks) and its label count."""
    labels = config.get("id2label")
    n_labels = len(labels) if isinstance(labels, dict) else _int(config, "num_labels", 2)
    if not 1 <= n_labels <= MAX_LABELS:
        raise ModelError(f"{CONFIG}: {n_labels:,} labels; a classifier here has 1 to {MAX_LABELS:,}")
    blocks = 0
    for key in ("num_hidden_layers", "n_layers"):
        if key in config:
            blocks += _int(config, key, 0)
    depths = config.get("depths")
    if isinstance(depths, list):
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in depths):
            raise ModelError(f"{CONFIG}: depths must be non-negative integers, got {depths!r}")
        blocks += sum(depths)
    if _ARCHS[name].model_type == "efficientnet":
        repeats = config.get("num_block_repeats", [1, 2, 2, 3, 3, 4, 1])
        coef = config.get("depth_coefficient", 3.1)
        if not isinstance(repeats, list) or not all(isinstance(r, int) and r >= 0 for r in repeats):
            raise ModelError(f"{CONFIG}: num_block_repeats must be non-negative integers, got {repeats!r}")
        if isinstance(coef, bool) or not isinstance(coef, int | float) or not 0 < coef <= 100:
            raise ModelError(f"{CONFIG}: depth_coefficient must be a number in (0, 100], got {coef!r}")
        blocks += sum(math.ceil(coef * r) for r in repeats)
    if blocks < 0 or blocks > MAX_BLOCKS:
        raise ModelError(f"{CONFIG}: {blocks:,} layers/blocks in all, more than the {MAX_BLOCKS} allowed")


def _classes(name: str) -> tuple[type[PretrainedConfig], type[PreTrainedModel]]:
    """The config and model classes of a table entry, from transformers' own module."""
    arch = _ARCHS[name]  # a KeyError here would be a bug: callers checked the name against the table
    module = importlib.import_module(arch.module)
    return getattr(module, arch.config_class), getattr(module, name)


def build_config(name: str, config: Mapping[str, Any]) -> PretrainedConfig:
    """The architecture's config object from the checked dict (attention kernel and dtype chosen here)."""
    config_class, _ = _classes(name)
    clean = {k: v for k, v in config.items() if k not in _DROPPED_KEYS and not k.startswith("_")}
    clean.update(_FORCED)
    try:
        built = config_class.from_dict(clean)
    except Exception as e:  # the config classes raise many types on bad values
        raise ModelError(f"{CONFIG} does not make a valid {config_class.__name__}: {e}") from None
    return built


# --------------------------------------------------------------------------------------------------
# the model input


def _side_json(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / name
    if not path.is_file() or path.is_symlink():
        return None
    return _json_object(path)


def _size(value: Any) -> tuple[int, int] | None:
    """(height, width) of a preprocessor size: an int, {height, width} or {shortest_edge}."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, dict):
        h, w, s = value.get("height"), value.get("width"), value.get("shortest_edge")
        if isinstance(h, int) and isinstance(w, int):
            return h, w
        if isinstance(s, int):
            return s, s
    return None


def _image_size(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def _per_channel(value: Any, channels: int, what: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value] * channels
    if (
        not isinstance(value, list)
        or len(value) != channels
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise ModelError(f"{PREPROCESSOR}: {what} must be {channels} numbers, got {value!r}")
    if what == "image_std" and any(v <= 0 for v in value):
        raise ModelError(f"{PREPROCESSOR}: image_std must be positive, got {value!r}")
    return tuple(float(v) for v in value)


def model_input(name: str, config: PretrainedConfig, folder: Path | None) -> ModelInput:
    """One example's input: (C, H, W) images, normalised as the preprocessor says, or (L,) token ids."""
    if _ARCHS[name].task == "text":
        positions = int(getattr(config, "max_position_embeddings", MAX_SEQ_LEN))
        return ModelInput("tokens", (max(1, min(positions, MAX_SEQ_LEN)),), vocab_size=int(config.vocab_size))
    channels = int(getattr(config, "num_channels", 3))
    pre = _side_json(folder, PREPROCESSOR) if folder is not None else None
    size: tuple[int, int] | None = None
    if name != "ViTForImageClassification" and pre is not None:  # ViT's patch grid fixes its size
        if pre.get("do_center_crop", True) is not False:
            size = _size(pre.get("crop_size"))
        if size is None and pre.get("do_resize", True) is not False:
            size = _size(pre.get("size"))
    if size is None:
        size = _image_size(getattr(config, "image_size", None)) or (224, 224)
    if not all(1 <= s <= 8192 for s in size):
        raise ModelError(f"image size {size[0]}×{size[1]} is out of range (1 to 8192 pixels a side)")
    mean = std = None
    if pre is not None and pre.get("do_normalize", True) is not False:
        mean = _per_channel(pre.get("image_mean"), channels, "image_mean")
        std = _per_channel(pre.get("image_std"), channels, "image_std")
        if (mean is None) != (std is None):
            mean = std = None
    return ModelInput("image", (channels, *size), mean=mean, std=std)


# --------------------------------------------------------------------------------------------------
# memory estimate


class _OutputBytes(torch.utils._python_dispatch.TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Adds up the bytes of every tensor an operator creates (views excluded)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.total += t.numel() * t.element_size()
        return out


def _examples(spec: ModelInput, n: int, device: str) -> torch.Tensor:
    if spec.kind == "tokens":
        return torch.zeros((n, 2, *spec.shape), dtype=torch.int64, device=device)
    return torch.zeros((n, *spec.shape), device=device)


def estimate_memory(
    model: nn.Module, spec: ModelInput, task: str, batch_size: int = BATCH_SIZE
) -> tuple[int, int, int]:
    """(total, parameter bytes, activation bytes of one example) for training ``model`` on ``spec``.

    The formula, generous on purpose:

    - parameters: 4 bytes (fp32) × 5 per parameter: the weight, its gradient, SGD's momentum, the
      surgery's mask and the dense teacher a label-free run keeps;
    - activations: every tensor the forward pass of one example creates (each operator's outputs,
      views excluded, eager attention with its L×L scores; a superset of what autograd saves), in
      training mode, times the batch size.

    ``model`` is on the meta device: the forward pass runs on shapes only and allocates nothing.
    """
    n = sum(p.numel() for p in model.parameters())
    parameter_bytes = 4 * 5 * n
    counter = _OutputBytes()
    model.train()
    x = _examples(spec, 2, "meta")  # two: batch norm in training mode refuses one example of 1×1 maps
    with torch.no_grad(), counter:
        if task == "text":
            model(input_ids=x[:, 0])  # no mask: the mask helpers read values, which meta tensors have not
        else:
            model(pixel_values=x)
    per_example = counter.total // 2
    return parameter_bytes + batch_size * per_example, parameter_bytes, per_example


def forward_flops(model: nn.Module, spec: ModelInput, task: str) -> int | None:
    """FLOPs of ``model``'s forward pass on one example of ``spec`` (:mod:`dns_core.cost`); None if it fails.

    ``model`` is on the meta device, as for :func:`estimate_memory`; text models get token ids alone
    (as there). It runs on two examples in training mode (batch norm refuses one example of 1×1 maps
    there) and the count is halved.
    """
    x = _examples(spec, 2, "meta")
    model.train()
    if task == "text":
        return cost.forward_flops(model, {"input_ids": x[:, 0]}, examples=2)
    return cost.forward_flops(model, {"pixel_values": x}, examples=2)


def _meta_model(name: str, config: PretrainedConfig) -> PreTrainedModel:
    _, model_class = _classes(name)
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"  # the estimate counts the attention scores
    try:
        with torch.device("meta"):
            model = model_class(config)
    except Exception as e:  # a config the class cannot build (inconsistent sizes and the like)
        raise ModelError(f"{CONFIG} does not build a {name}: {type(e).__name__}: {e}") from None
    return model


# --------------------------------------------------------------------------------------------------
# weights


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of the folder: model.safetensors, or the shards an index lists."""
    index, single = folder / INDEX, folder / WEIGHTS
    if index.is_file() and not index.is_symlink():
        data = _side_json(folder, INDEX)
        weight_map = data.get("weight_map") if data is not None else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{INDEX} has no weight_map")
        names = sorted({str(v) for v in weight_map.values()})
        for n in names:
            if "/" in n or "\\" in n or n.startswith(".") or not n.endswith(".safetensors"):
                raise ModelError(f"{INDEX} names {n!r}: shards must be .safetensors files beside it")
        paths = [folder / n for n in names]
        missing = [p.name for p in paths if not p.is_file() or p.is_symlink()]
        if missing:
            raise ModelError(f"{INDEX} lists shards that are not in the folder: {', '.join(missing)}")
        return paths
    if single.is_file() and not single.is_symlink():
        return [single]
    if any((folder / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ModelError(f"the folder holds pytorch_model.bin, a pickle, which is never loaded here; {CONVERT}")
    if any((folder / n).exists() for n in ("tf_model.h5", "flax_model.msgpack")):
        raise ModelError(f"the folder holds TensorFlow or Flax weights only; {CONVERT}")
    raise ModelError(f"no {WEIGHTS} in the model folder (nor a sharded {INDEX})")


def _header(files: list[Path], max_file_bytes: int | None) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    from . import uploads

    cap = uploads.MAX_FILE_BYTES if max_file_bytes is None else max_file_bytes
    tensors: dict[str, tuple[str, tuple[int, ...], Path]] = {}
    for path in files:
        header = uploads.validate_safetensors(path, max_bytes=cap)
        for key, (dtype, shape) in header.tensors.items():
            if key in tensors:
                raise ModelError(f"tensor {key!r} is in both {tensors[key][2].name} and {path.name}")
            tensors[key] = (dtype, shape, path)
    return tensors


def _renamer(model: PreTrainedModel) -> Any:
    """Checkpoint name -> the model's name, as ``from_pretrained`` renames them.

    transformers' own renamings for the class (ViT's ``encoder.layer.N.attention.attention.query``
    is ``layers.N.attention.q_proj`` since v5; ``save_pretrained`` writes the old names back), the
    legacy ``LayerNorm.gamma``/``beta``, and the base model's prefix added or removed.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    if len(renamings) != len(transforms):  # fused or split tensors: none of the table's classes has them
        raise ModelError(f"{type(model).__name__} checkpoints need weight conversions this server does not run")
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(key: str) -> str:
        new, _ = rename_source_key(key, renamings, [], prefix, meta_state)
        return str(new)

    return rename


def _listing(keys: list[str], limit: int = 12) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _match_weights(model: PreTrainedModel, header: Mapping[str, tuple[str, tuple[int, ...], Any]]) -> dict[str, str]:
    """Checkpoint name -> model name, after checking names, shapes and dtypes; ModelError with a listing.

    Names are read as ``from_pretrained`` reads them (:func:`_renamer`). Tolerated as it tolerates
    them: a missing tied weight (its source is present), a missing ``num_batches_tracked``, an
    unexpected ``position_ids`` buffer or key the class lists in ``_keys_to_ignore_on_load_unexpected``.
    """
    want = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
    tied: dict[str, str] = dict(getattr(model, "all_tied_weights_keys", None) or {})
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    rename = _renamer(model)
    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    for key in header:
        new = key if key in want else rename(key)
        if new in want and new not in mapping.values():
            mapping[key] = new
        elif not (key.endswith("position_ids") or any(p.search(key) for p in ignore)):
            unexpected.append(key)
    present = set(mapping.values())
    missing = [
        k
        for k in want
        if k not in present and not k.endswith("num_batches_tracked") and not (k in tied and tied[k] in present)
    ]
    shapes, dtypes = [], []
    for key, new in mapping.items():
        dtype, shape = header[key][0], header[key][1]
        if tuple(shape) != want[new][1]:
            shapes.append(f"{key}: expected {list(want[new][1])}, got {list(shape)}")
        elif want[new][0].is_floating_point and dtype not in _FLOAT_DTYPES:
            dtypes.append(f"{key}: {dtype}, not a float type")
    parts = []
    if missing:
        parts.append("missing " + _listing(sorted(missing)))
    if unexpected:
        parts.append("unexpected " + _listing(sorted(unexpected)))
    if shapes:
        parts.append("mis-shaped " + _listing(sorted(shapes)))
    if dtypes:
        parts.append("wrong type " + _listing(sorted(dtypes)))
    if parts:
        raise ModelError(
            f"the weights do not match {type(model).__name__} as config.json describes it: "
            + " | ".join(parts)
            + " (a checkpoint of another head or size? save the classifier with save_pretrained)"
        )
    return mapping


# --------------------------------------------------------------------------------------------------
# inspect, load, save


@dataclass(frozen=True)
class _Checked:
    name: str
    raw: dict[str, Any]
    config: PretrainedConfig
    facts: HFFacts
    files: list[Path]
    mapping: dict[str, str]


def _check(
    folder: Path, max_bytes: int, batch_size: int, max_file_bytes: int | None, *, training: bool = True
) -> _Checked:
    """Every check; ``training=False`` (loading) caps the fp32 parameters alone, not the training estimate."""
    folder = Path(folder)
    raw = read_config(folder)
    name = _architecture(raw)
    _check_counts(name, raw)
    files = _weight_files(folder)  # refuse a pickled checkpoint before building anything
    config = build_config(name, raw)
    meta = _meta_model(name, config)
    spec = model_input(name, config, folder)
    task = _ARCHS[name].task
    num_parameters = sum(p.numel() for p in meta.parameters())
    parameter_bytes = (4 * 5 if training else 4) * num_parameters
    if parameter_bytes > max_bytes:  # before the forward pass: no need to count activations
        raise ModelError(
            f"{name} as config.json describes it has {num_parameters:,} parameters: "
            + ("training it needs about " if training else "loading it needs ")
            + f"{parameter_bytes / 2**30:,.1f} GiB for the parameters alone, more than the "
            f"{max_bytes / 2**30:,.1f} GiB allowed"
        )
    total = per_example = 0
    flops = None
    if training:
        try:
            total, parameter_bytes, per_example = estimate_memory(meta, spec, task, batch_size)
        except ModelError:
            raise
        except Exception as e:  # a config whose forward pass cannot run
            raise ModelError(f"{name} as config.json describes it cannot run ({type(e).__name__}: {e})") from None
        flops = forward_flops(meta, spec, task)
    if total > max_bytes:
        raise ModelError(
            f"{name} as config.json describes it ({num_parameters:,} parameters, input {list(spec.shape)}) needs an "
            f"estimated {total / 2**30:,.1f} GiB to train with batches of {batch_size} "
            f"({parameter_bytes / 2**30:,.2f} GiB parameters, {per_example / 2**20:,.1f} MiB activations an "
            f"example), more than the {max_bytes / 2**30:,.1f} GiB allowed"
        )
    mapping = _match_weights(meta, _header(files, max_file_bytes))
    num_labels = int(config.num_labels or 0)
    from .surgery import prunable_layers

    facts = HFFacts(
        name, task, num_parameters, raw, spec, num_labels,
        estimate_bytes=total, parameter_bytes=parameter_bytes, activation_bytes=per_example,
        flops_per_example=flops, layers=tuple(f"model.{n}" for n, _ in prunable_layers(meta)),
    )  # fmt: skip
    return _Checked(name, raw, config, facts, files, mapping)


def inspect_hf_folder(
    folder: Path, *, max_bytes: int, batch_size: int = BATCH_SIZE, max_file_bytes: int | None = None
) -> HFFacts:
    """Every check a job makes at start, without loading a weight: ModelError (or an upload error) if refused.

    ``max_bytes`` caps :func:`estimate_memory` for batches of ``batch_size``; ``max_file_bytes``
    each safetensors file (default :data:`dns_core.uploads.MAX_FILE_BYTES`).
    """
    return _check(Path(folder), max_bytes, batch_size, max_file_bytes).facts


class HFClassifier(nn.Module):
    """A transformers classifier as one tensor in, logits out.

    Images: ``x`` is float (N, C, H, W), passed as ``pixel_values``. Text: ``x`` is int64
    (N, 2, L), the token ids and the attention mask stacked along dim 1.
    """

    def __init__(self, model: PreTrainedModel, task: str, model_input: ModelInput, architecture: str) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.model_input = model_input
        self.architecture = architecture

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels or 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "text":
            return self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
        return self.model(pixel_values=x).logits


def load_hf_folder(
    folder: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, max_file_bytes: int | None = None
) -> HFClassifier:
    """The folder's model in fp32 on the CPU, in eval mode, after the checks of :func:`inspect_hf_folder`.

    The memory cap here is on the fp32 parameters alone (what loading allocates); the training
    estimate is :func:`inspect_hf_folder`'s to check, with the caller's cap and batch size.

    Built from the config by the architecture's class and filled from the safetensors files (read
    with safetensors, never unpickled); nothing is downloaded.
    """
    from .io import read_safetensors

    checked = _check(Path(folder), max_bytes, BATCH_SIZE, max_file_bytes, training=False)
    _, model_class = _classes(checked.name)
    model = model_class(checked.config)
    state: dict[str, torch.Tensor] = {}
    for path in checked.files:
        _, tensors = read_safetensors(path, ModelError)
        for key, value in tensors.items():
            if key in checked.mapping:
                state[checked.mapping[key]] = value
    result = model.load_state_dict(state, strict=False)
    if getattr(model, "all_tied_weights_keys", None):
        model.tie_weights()
    if result.unexpected_keys:  # _match_weights let none through; a bug otherwise
        raise ModelError(f"unexpected weights: {_listing(sorted(result.unexpected_keys))}")
    cast(nn.Module, model).float().eval()
    return HFClassifier(model, checked.facts.task, checked.facts.model_input, checked.name)


def save_hf_folder(module: HFClassifier, out: Path, source: Path | None = None) -> list[Path]:
    """Write ``module`` (squashed) to ``out`` as a Hugging Face folder; returns the files written.

    config.json and model.safetensors by ``save_pretrained``, and copies of ``source``'s
    preprocessing and tokeniser files (plain files of known names, each at most
    :data:`MAX_SIDE_FILE_BYTES`), so that ``AutoModelFor….from_pretrained(out)`` and the
    processors load it.
    """
    model = module.model
    masked = [k for k in model.state_dict() if k.endswith(("_orig", "_mask"))]
    if masked:
        raise ValueError(f"the model still has surgery masks ({masked[0]}, ...): squash it before saving")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    written = [out / CONFIG, *sorted(out.glob("*.safetensors")), *sorted(out.glob(INDEX))]
    if source is not None:
        for name in sorted(_SIDE_FILES):
            src = Path(source) / name
            if src.is_file() and not src.is_symlink() and src.stat().st_size <= MAX_SIDE_FILE_BYTES:
                shutil.copyfile(src, out / name)
                written.append(out / name)
    return list(dict.fromkeys(written))
