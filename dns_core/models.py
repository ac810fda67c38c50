"""Built-in architectures ("the zoo") with the paper's exact shapes.

Every constructor takes ``in_channels`` / ``num_classes`` style keyword arguments so that a
JSON config can rebuild the same module later (see :func:`build`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import named
from .errors import ModelError
from .inputs import ModelInput


class LeNet300100(nn.Module):
    """LeNet-300-100: a 784-300-100-10 MLP with ReLU (266,610 parameters)."""

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 exactly as Caffe's ``lenet_train_test.prototxt`` (431,080 parameters).

    conv1 (20 5x5) → max-pool 2 → conv2 (50 5x5) → max-pool 2 → ip1 (500) → ReLU → ip2 (10).
    Caffe's LeNet has no non-linearity after the convolutions; neither has this one.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        side = ((image_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class AlexNetSmall(nn.Module):
    """An AlexNet-style network scaled to 28-32 px inputs: 5 convs (ReLU, max-pool) + 3 FC with dropout."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 192, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(192, 192, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(192, 128, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(128 * side * side, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class VGGSmall(nn.Module):
    """A VGG-style network: stacks of 3x3 conv + BatchNorm + ReLU, max-pool between stages."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and an identity (or 1x1) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A CIFAR-style ResNet (3 stages of basic blocks; ``depth`` blocks per stage)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, depth: int = 1, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        blocks: list[nn.Module] = []
        c = width
        for stage, w in enumerate((width, 2 * width, 4 * width)):
            for i in range(depth):
                blocks.append(BasicBlock(c, w, 2 if (i == 0 and stage > 0) else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


ZOO: dict[str, Callable[..., nn.Module]] = {
    "lenet-300-100": LeNet300100,
    "lenet-5": LeNet5,
    "alexnet-small": AlexNetSmall,
    "vgg-small": VGGSmall,
    "resnet-small": ResNetSmall,
}

#: Input shape (without the batch dimension) each architecture expects by default.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "lenet-300-100": (1, 28, 28),
    "lenet-5": (1, 28, 28),
    "alexnet-small": (1, 28, 28),
    "vgg-small": (1, 28, 28),
    "resnet-small": (1, 28, 28),
}


def build(name: str, **config: Any) -> nn.Module:
    """Build a zoo architecture, or a torchvision/timm model (``torchvision:resnet18``), by name.

    ``config`` goes to its constructor (for a named model: with ``weights=None`` / ``pretrained=False``,
    see :mod:`dns_core.named`).
    """
    if named.is_named(name):
        return named.build_named(name, **config)
    try:
        factory = ZOO[name]
    except KeyError:
        raise ModelError(f"unknown architecture {name!r}; known: {', '.join(sorted(ZOO))}") from None
    return factory(**config)


def count_parameters(model: nn.Module) -> int:
    """All parameters of ``model`` (weights and biases), as the paper counts them."""
    return sum(p.numel() for p in model.parameters())


#: What each architecture's JSON config may hold: key -> (type, minimum, maximum). Anything else is refused.
CONFIG_SCHEMA: dict[str, dict[str, tuple[type, int, int]]] = {
    "lenet-300-100": {"in_features": (int, 1, 1 << 20), "num_classes": (int, 2, 100_000)},
    "lenet-5": {"in_channels": (int, 1, 64), "num_classes": (int, 2, 100_000), "image_size": (int, 12, 512)},
    "alexnet-small": {"in_channels": (int, 1, 64), "num_classes": (int, 2, 100_000), "image_size": (int, 16, 512)},
    "vgg-small": {"in_channels": (int, 1, 64), "num_classes": (int, 2, 100_000), "widths": (list, 1, 8)},
    "resnet-small": {
        "in_channels": (int, 1, 64),
        "num_classes": (int, 2, 100_000),
        "depth": (int, 1, 16),
        "width": (int, 1, 1024),
    },
}


def check_config(name: str, config: Any) -> dict[str, Any]:
    """Validate a user's JSON config for architecture ``name`` against :data:`CONFIG_SCHEMA`.

    Names like ``torchvision:resnet18`` go to :func:`dns_core.named.check_named_config`.
    Returns the config ready for :func:`build`; raises ``ModelError`` naming every problem.
    """
    if named.is_named(name):
        return named.check_named_config(name, config)
    if name not in CONFIG_SCHEMA:
        raise ModelError(f"unknown architecture {name!r}; known: {', '.join(sorted(ZOO))}")
    if not isinstance(config, dict):
        raise ModelError(f"config for {name} must be a JSON object, got {type(config).__name__}")
    schema = CONFIG_SCHEMA[name]
    problems = [f"unknown key {k!r} (allowed: {', '.join(schema)})" for k in config if k not in schema]
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key not in schema:
            continue
        kind, lo, hi = schema[key]
        if kind is int:
            if type(value) is not int or not lo <= value <= hi:
                problems.append(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
            else:
                out[key] = value
        else:  # a list of positive integers (channel widths), lo..hi entries
            ok = isinstance(value, list) and lo <= len(value) <= hi
            ok = ok and all(type(v) is int and 1 <= v <= 4096 for v in value)
            if not ok:
                problems.append(f"{key} must be a list of {lo}-{hi} integers in [1, 4096], got {value!r}")
            else:
                out[key] = tuple(value)
    if problems:
        raise ModelError(f"bad config for {name}: " + "; ".join(problems))
    return out


def model_input(name: str, config: dict[str, Any] | None = None) -> ModelInput:
    """What architecture ``name`` with ``config`` takes as one example (checked config, or None for defaults)."""
    if named.is_named(name):
        return named.named_input(name, config)
    if name not in INPUT_SHAPES:
        raise ModelError(f"unknown architecture {name!r}; known: {', '.join(sorted(ZOO))}")
    config = config or {}
    if name == "lenet-300-100":
        features = int(config.get("in_features", 784))
        if features != 784:  # the MLP flattens whatever it gets: a vector of in_features
            return ModelInput("features", (features,))
        return ModelInput("image", INPUT_SHAPES[name])
    channels, height, width = INPUT_SHAPES[name]
    channels = int(config.get("in_channels", channels))
    side = config.get("image_size")
    if side is not None:
        height = width = int(side)
    return ModelInput("image", (channels, height, width))


def input_shape(name: str, config: dict[str, Any] | None = None) -> tuple[int, ...]:
    """One example's shape for architecture ``name`` with ``config`` (zoo: :data:`INPUT_SHAPES` adjusted)."""
    return model_input(name, config).shape
