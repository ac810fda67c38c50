"""A suite of tiny Hugging Face classifiers with random weights, for tests and device checks.

One of each architecture :mod:`dns_core.hf` accepts, small enough that a forward and backward pass
of 32 examples takes milliseconds on a CPU: images 3×32×32, token sequences of 16 ids below 128.
Weights are random but seeded (the same on every call), every parameter non-zero. Needs
transformers only (no torchvision).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

IMAGE_SIZE = 32
SEQ_LEN = 16
VOCAB = 128
NUM_LABELS = 10
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
SEED = 0


def _seeded(build: Callable[[], PreTrainedModel]) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = build()
        with torch.no_grad():
            for p in model.parameters():  # zero-initialised biases and the like: random too
                p.add_(torch.randn_like(p) * 0.02)
    cast(nn.Module, model).float().eval()  # the class's own eval (typed through nn.Module)
    return model


def _labels(n: int = NUM_LABELS) -> dict[str, Any]:
    return {"id2label": {i: f"class_{i}" for i in range(n)}, "label2id": {f"class_{i}": i for i in range(n)}}


def resnet() -> PreTrainedModel:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", **_labels()
    )
    return _seeded(lambda: ResNetForImageClassification(config))


def convnext() -> PreTrainedModel:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(
        num_channels=3, patch_size=2, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=IMAGE_SIZE,
        **_labels(),
    )  # fmt: skip
    return _seeded(lambda: ConvNextForImageClassification(config))


def mobilenet_v2() -> PreTrainedModel:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config = MobileNetV2Config(
        num_channels=3, image_size=IMAGE_SIZE, depth_multiplier=0.25, min_depth=4, finegrained_output=False, **_labels()
    )
    return _seeded(lambda: MobileNetV2ForImageClassification(config))


def efficientnet() -> PreTrainedModel:
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    config = EfficientNetConfig(
        num_channels=3, image_size=IMAGE_SIZE, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
        depth_divisor=4, **_labels(),
    )  # fmt: skip
    return _seeded(lambda: EfficientNetForImageClassification(config))


def vit() -> PreTrainedModel:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=IMAGE_SIZE, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, **_labels(),
    )  # fmt: skip
    return _seeded(lambda: ViTForImageClassification(config))


def bert() -> PreTrainedModel:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=SEQ_LEN, **_labels(),
    )  # fmt: skip
    return _seeded(lambda: BertForSequenceClassification(config))


def distilbert() -> PreTrainedModel:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=SEQ_LEN, **_labels()
    )
    return _seeded(lambda: DistilBertForSequenceClassification(config))


#: name -> a function building the model (random, seeded weights).
SUITE: dict[str, Callable[[], PreTrainedModel]] = {
    "resnet": resnet,
    "convnext": convnext,
    "mobilenet_v2": mobilenet_v2,
    "efficientnet": efficientnet,
    "vit": vit,
    "bert": bert,
    "distilbert": distilbert,
}
#: the suite's models that take token sequences; the others take images
TEXT = frozenset({"bert", "distilbert"})


def write_suite_folder(name: str, out: Path) -> Path:
    """Write suite model ``name`` as a Hugging Face folder at ``out`` (config.json, model.safetensors,
    and preprocessor_config.json for image models); returns ``out``."""
    if name not in SUITE:
        raise KeyError(f"no suite model {name!r}; choose one of {', '.join(SUITE)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    SUITE[name]().save_pretrained(str(out))
    if name not in TEXT:
        pre = {
            "do_resize": True,
            "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(IMAGE_MEAN),
            "image_std": list(IMAGE_STD),
        }
        (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return out
