"""torchvision / timm models by name (dns_core.named) and the dispatch through dns_core.models.

torchvision and timm are not installed on the CI machine: the list, the config table, the
not-installed refusal and the state-dict comparison are tested as they are; what needs a library is
tested against a stand-in module put in ``sys.modules`` (same calls as the real one), and against
the real libraries where they import (``pytest.importorskip``).
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dns_core import models, named
from dns_core.errors import ModelError
from dns_core.inputs import ModelInput
from dns_core.io import load_model, save_model
from dns_core.uploads import validate_safetensors


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


HAVE_TORCHVISION = _importable("torchvision")
HAVE_TIMM = _importable("timm")


@pytest.fixture
def no_import(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and fail) any import that dns_core.named attempts."""
    tried: list[str] = []

    def refuse(name: str, package: str | None = None) -> types.ModuleType:
        tried.append(name)
        raise AssertionError(f"dns_core.named imported {name}")

    monkeypatch.setattr(importlib, "import_module", refuse)
    return tried


# ------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("torchvision:resnet18", True),
        ("timm:convnext_atto", True),
        ("torchvision:not_a_model", True),  # named, and refused later by the list
        ("lenet-5", False),
        ("hf:bert", False),
        ("torchvision", False),
        ("", False),
    ],
)
def test_is_named(arch: str, expected: bool) -> None:
    assert named.is_named(arch) is expected


def test_allowed_lists() -> None:
    assert {"resnet18", "mobilenet_v3_small", "efficientnet_b0", "vit_b_16", "alexnet"} <= named.ALLOWED["torchvision"]
    assert {"resnet18", "convnext_atto", "vit_tiny_patch16_224", "regnety_002"} <= named.ALLOWED["timm"]
    # every allowed name is a plain identifier: no scheme (hf-hub:…), tag (.a1_in1k) or path
    for names in named.ALLOWED.values():
        assert all(n.isidentifier() for n in names)


def test_name_outside_the_list_is_refused_without_importing(no_import: list[str]) -> None:
    with pytest.raises(
        ModelError, match=r"torchvision model 'resnet19' is not offered; did you mean torchvision:resnet18"
    ):
        named.check_named_config("torchvision:resnet19", {})
    with pytest.raises(ModelError, match=r"allowed timm models: .*convnext_atto"):
        named.check_named_config("timm:hf-hub:someone/evil", {})
    with pytest.raises(ModelError, match="not offered"):
        named.build_named("timm:resnet18.a1_in1k")
    with pytest.raises(ModelError, match="names no model library"):
        named.split_named("keras:resnet18")
    assert no_import == []


# ----------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("arch", "key", "value", "message"),
    [
        ("torchvision:resnet18", "weights", "IMAGENET1K_V1", "would download or load weights"),
        ("torchvision:resnet18", "weights_backbone", "DEFAULT", "would download or load weights"),
        ("torchvision:resnet18", "progress", True, "would download or load weights"),
        ("timm:resnet18", "pretrained", True, "would download or load weights"),
        ("timm:resnet18", "pretrained_cfg", "a1_in1k", "would download or load weights"),
        ("timm:resnet18", "pretrained_cfg_overlay", {"file": "/etc/passwd"}, "would download or load weights"),
        ("timm:resnet18", "checkpoint_path", "/tmp/x.pth", "would download or load weights"),
        ("timm:resnet18", "cache_dir", "/tmp", "would download or load weights"),
        ("timm:resnet18", "mirror_url", "http://x", "would download or load weights"),
        ("torchvision:resnet18", "norm_layer", "torch.nn.Identity", "names code"),
        ("timm:resnet18", "act_layer", "os.system", "names code"),
        ("torchvision:resnet18", "block", "Bottleneck", "names code"),
        ("timm:resnet18", "features_only", True, "names code"),
        ("timm:resnet18", "scriptable", True, "names code"),
        ("torchvision:resnet18", "layers", [1, 1, 1, 1], "unknown key 'layers'"),
        ("timm:resnet18", "image_size", 224, "unknown key 'image_size'"),  # torchvision's name, not timm's
        ("torchvision:resnet18", "in_chans", 1, "unknown key 'in_chans'"),  # timm's name, not torchvision's
    ],
)
def test_refused_keys(arch: str, key: str, value: Any, message: str, no_import: list[str]) -> None:
    with pytest.raises(ModelError, match=message):
        named.check_named_config(arch, {"num_classes": 10, key: value})
    with pytest.raises(ModelError, match=message):
        named.build_named(arch, **{key: value})
    assert no_import == []


@pytest.mark.parametrize(
    ("arch", "key", "value", "message"),
    [
        ("torchvision:resnet18", "num_classes", 1, r"num_classes must be an integer in \[2, 100000\], got 1"),
        ("torchvision:resnet18", "num_classes", 100_001, "num_classes must be an integer"),
        ("torchvision:resnet18", "num_classes", True, "num_classes must be an integer"),
        ("torchvision:resnet18", "num_classes", 10.0, "num_classes must be an integer"),
        ("torchvision:resnet18", "num_classes", "10", "num_classes must be an integer"),
        ("torchvision:resnet18", "num_classes", [10], "num_classes must be an integer"),
        ("timm:resnet18", "in_chans", 0, r"in_chans must be an integer in \[1, 64\]"),
        ("timm:resnet18", "in_chans", 65, "in_chans must be an integer"),
        ("timm:vit_tiny_patch16_224", "img_size", 2048, r"img_size must be an integer in \[32, 1024\]"),
        ("timm:resnet18", "drop_rate", 1.0, r"drop_rate must be a number in \[0, 1\)"),
        ("timm:resnet18", "drop_rate", -0.1, "drop_rate must be a number"),
        ("timm:resnet18", "drop_rate", math.nan, "drop_rate must be a number"),
        ("timm:resnet18", "drop_rate", math.inf, "drop_rate must be a number"),
        ("timm:resnet18", "drop_rate", False, "drop_rate must be a number"),
        ("timm:resnet18", "global_pool", "__import__('os')", "global_pool must be one of avg, avgmax"),
        ("torchvision:resnet18", "zero_init_residual", 1, "zero_init_residual must be true or false"),
        ("torchvision:mobilenet_v2", "width_mult", 100, r"width_mult must be a number in \[0.25, 4\]"),
    ],
)
def test_bounds(arch: str, key: str, value: Any, message: str, no_import: list[str]) -> None:
    with pytest.raises(ModelError, match=message):
        named.check_named_config(arch, {key: value})
    assert no_import == []


def test_no_table_key_is_a_refused_one() -> None:
    for table in named.CONFIG_KEYS.values():
        assert all(named._refusal(key) is None for key in table)


def test_every_problem_is_named_at_once(no_import: list[str]) -> None:
    with pytest.raises(ModelError) as e:
        named.check_named_config("timm:resnet18", {"pretrained": True, "num_classes": 0, "foo": 1})
    text = str(e.value)
    assert "bad config for timm:resnet18" in text
    assert "'pretrained' would download" in text and "num_classes must be" in text and "unknown key 'foo'" in text


@pytest.mark.parametrize("config", [[], "num_classes=10", None, 10])
def test_config_must_be_an_object(config: object) -> None:
    with pytest.raises(ModelError, match="must be a JSON object"):
        named.check_named_config("torchvision:resnet18", config)


# ---------------------------------------------------------------------------------- not installed


@pytest.mark.skipif(HAVE_TORCHVISION, reason="torchvision imports here")
def test_torchvision_not_installed() -> None:
    message = (
        "torchvision is not installed on this server: models by name run on GPU worker images with "
        "`pip install netsurgery[vision]`"
    )
    with pytest.raises(ModelError) as e:
        named.check_named_config("torchvision:resnet18", {"num_classes": 10})
    assert str(e.value) == message
    with pytest.raises(ModelError, match="torchvision is not installed on this server"):
        named.build_named("torchvision:resnet18", num_classes=10)
    # through the zoo's entry points, as the service calls them (a ModelError is a 4xx there)
    with pytest.raises(ModelError, match="torchvision is not installed on this server"):
        models.check_config("torchvision:resnet18", {"num_classes": 10})
    with pytest.raises(ModelError, match="torchvision is not installed"), torch.device("meta"):
        models.build("torchvision:resnet18", num_classes=10)


@pytest.mark.skipif(HAVE_TIMM, reason="timm imports here")
def test_timm_not_installed() -> None:
    with pytest.raises(ModelError, match=r"^timm is not installed on this server: .*pip install netsurgery\[vision\]"):
        named.check_named_config("timm:convnext_atto", {"num_classes": 10, "in_chans": 1})


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("operator torchvision::nms does not exist"),
        ImportError("libcudart.so.12: cannot open shared object file"),
        OSError("undefined symbol"),
        ModuleNotFoundError("No module named 'torchvision'"),
    ],
)
def test_a_broken_library_reads_as_not_installed(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    def broken(name: str, package: str | None = None) -> types.ModuleType:
        raise error

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModelError) as e:
        named.check_named_config("torchvision:resnet18", {"num_classes": 10})
    assert str(e.value).startswith("torchvision is not installed on this server: models by name run on GPU")
    assert "nms" not in str(e.value)


# ------------------------------------------------------- a stand-in torchvision (same calls as the real one)


class _Net(nn.Module):
    """Takes what torchvision's AlexNet takes (num_classes, dropout), plus a layer argument."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, norm_layer: Any = None) -> None:
        super().__init__()
        if not 0 <= dropout <= 0.8:
            raise ValueError(f"dropout {dropout} too high")
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x)).mean((2, 3))
        out: torch.Tensor = self.fc(self.drop(x))
        return out


class _ReadsValues(_Net):
    """A constructor that reads a tensor's value (as timm's drop-path schedules do): no meta device."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        rate = float(torch.linspace(0, dropout, 3)[1].item())
        super().__init__(num_classes, rate)


@pytest.fixture
def fake_torchvision(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def get_model(name: str, **config: Any) -> nn.Module:
        calls.append({"name": name, **config})
        assert config.pop("weights") is None
        return (_ReadsValues if name == "squeezenet1_1" else _Net)(**config)

    module = types.ModuleType("torchvision")
    module.models = types.SimpleNamespace(  # type: ignore[attr-defined]
        get_model=get_model, list_models=lambda: ["alexnet", "squeezenet1_1", "resnet18"]
    )
    module.__version__ = "0.0-test"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", module)
    monkeypatch.setattr(named, "_ACCEPTED", {})
    return calls


def test_keys_are_checked_against_the_constructor(fake_torchvision: list[dict[str, Any]]) -> None:
    assert named.accepted_keys("torchvision:alexnet") == {"num_classes", "dropout"}
    assert named.check_named_config("torchvision:alexnet", {"num_classes": 10, "dropout": 0}) == {
        "num_classes": 10,
        "dropout": 0.0,
    }
    # in the table, but not a parameter of this model's class
    with pytest.raises(
        ModelError, match=r"unknown key 'zero_init_residual' \(allowed for torchvision:alexnet: dropout, num_classes\)"
    ):
        named.check_named_config("torchvision:alexnet", {"zero_init_residual": True})
    # the constructor's own refusal of a value becomes a ModelError
    with pytest.raises(ModelError, match=r"torchvision:alexnet does not build with config .*dropout 0\.9 too high"):
        named.check_named_config("torchvision:alexnet", {"dropout": 0.9})
    # allowed by the list but absent from the installed version
    with pytest.raises(ModelError, match=r"torchvision:vgg16_bn is not in the installed torchvision 0\.0-test"):
        named.check_named_config("torchvision:vgg16_bn", {})
    # every build went through get_model with weights=None
    assert fake_torchvision and all(c["weights"] is None for c in fake_torchvision)


def test_build_and_the_meta_device(fake_torchvision: list[dict[str, Any]]) -> None:
    model = named.build_named("torchvision:alexnet", num_classes=7)
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 7)
    with torch.device("meta"):
        meta = models.build("torchvision:alexnet", **models.check_config("torchvision:alexnet", {"num_classes": 7}))
    assert meta.state_dict()["fc.weight"].device.type == "meta"
    # a constructor that cannot run on meta is built on the CPU and moved there
    with torch.device("meta"):
        moved = named.build_named("torchvision:squeezenet1_1", num_classes=5)
    weight = moved.state_dict()["fc.weight"]
    assert weight.device.type == "meta" and weight.shape == (5, 4)
    assert named.check_named_config("torchvision:squeezenet1_1", {"num_classes": 5}) == {"num_classes": 5}


def test_state_check_and_round_trip(fake_torchvision: list[dict[str, Any]], tmp_path: Path) -> None:
    arch, config = "torchvision:alexnet", {"num_classes": 6}
    model = named.build_named(arch, **config)
    path = tmp_path / "w.safetensors"
    save_model(path, model, arch, config)
    header = validate_safetensors(path)
    assert named.check_named_state(arch, config, header) == sum(p.numel() for p in model.parameters())
    with pytest.raises(
        ModelError, match=r"mis-shaped fc.bias: expected \[3\], got \[6\], fc.weight: expected \[3, 4\], got \[6, 4\]"
    ):
        named.check_named_state(arch, {"num_classes": 3}, header)
    # the file's plain keys load into the constructor's model, and io.load_model rebuilds it from the header
    loaded, name = load_model(path)
    assert name == arch
    x = torch.randn(2, 3, 8, 8)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))


# ------------------------------------------------------------------------------- state comparison


def _header(tmp_path: Path, state: dict[str, torch.Tensor]) -> Any:
    path = tmp_path / "s.safetensors"
    save_file(state, str(path))
    return validate_safetensors(path)


def test_compare_state_with_a_zoo_module(tmp_path: Path) -> None:
    module = models.build("lenet-5")
    expected = named.state_shapes(module)
    assert expected["conv1.weight"] == named.StateEntry((20, 1, 5, 5), True)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    named.compare_state(expected, _header(tmp_path, state))  # matches

    bad = dict(state)
    bad.pop("fc2.bias")
    bad["extra.weight"] = torch.zeros(2)
    bad["fc2.weight"] = torch.zeros(4, 500)
    bad["conv1.bias"] = torch.zeros(20, dtype=torch.int32)
    with pytest.raises(ModelError) as e:
        named.compare_state(expected, _header(tmp_path, bad), "lenet-5")
    text = str(e.value)
    assert text.startswith("the weights do not match lenet-5: ")
    assert "missing fc2.bias" in text and "unexpected extra.weight" in text
    assert "fc2.weight: expected [10, 500], got [4, 500]" in text
    assert "conv1.bias: expected floating-point values, got I32" in text


def test_compare_state_integer_buffers(tmp_path: Path) -> None:
    module = models.build("vgg-small")
    expected = named.state_shapes(module)
    assert expected["features.1.num_batches_tracked"] == named.StateEntry((), False)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    named.compare_state(expected, _header(tmp_path, state))
    state["features.1.num_batches_tracked"] = torch.zeros((), dtype=torch.float32)
    with pytest.raises(ModelError, match="num_batches_tracked: expected integer values, got F32"):
        named.compare_state(expected, _header(tmp_path, state))


def test_compare_state_lists_at_most_twenty(tmp_path: Path) -> None:
    expected = {f"t{i:02d}": named.StateEntry((1,), True) for i in range(25)}
    with pytest.raises(ModelError, match=r"missing t00, .*t19 and 5 more"):
        named.compare_state(expected, _header(tmp_path, {"x": torch.zeros(1)}))


# ---------------------------------------------------------------------------------------- inputs


def test_named_input_torchvision(no_import: list[str]) -> None:
    mi = named.named_input("torchvision:resnet18", {"num_classes": 10})
    assert (mi.kind, mi.shape) == ("image", (3, 224, 224))
    assert mi.mean == (0.485, 0.456, 0.406) and mi.std == (0.229, 0.224, 0.225)
    assert named.named_input("torchvision:efficientnet_b3").shape == (3, 300, 300)
    assert named.named_input("torchvision:vit_b_16", {"image_size": 384}).shape == (3, 384, 384)
    assert no_import == []


@pytest.mark.skipif(HAVE_TIMM, reason="timm imports here: its registry is read instead")
def test_named_input_timm_defaults() -> None:
    mi = named.named_input("timm:convnext_atto", {"in_chans": 1, "num_classes": 10})
    assert mi.shape == (1, 224, 224)
    assert mi.mean is not None and mi.mean[0] == pytest.approx(sum(named.IMAGENET_MEAN) / 3)
    vit = named.named_input("timm:vit_tiny_patch16_224", {"img_size": 96})
    assert (vit.shape, vit.mean, vit.std) == ((3, 96, 96), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert named.named_input("timm:resnet18", {"in_chans": 2}).mean is None  # no 2-channel normalisation known


# ------------------------------------------------------------------------------------ the zoo


def test_zoo_dispatch_unchanged(no_import: list[str]) -> None:
    assert models.check_config("lenet-5", {"num_classes": 4}) == {"num_classes": 4}
    assert models.check_config("vgg-small", {"widths": [8, 16]}) == {"widths": (8, 16)}
    with pytest.raises(ModelError, match="unknown architecture 'lenet-7'"):
        models.check_config("lenet-7", {})
    assert models.count_parameters(models.build("lenet-5")) == 431_080
    assert models.input_shape("lenet-5") == models.INPUT_SHAPES["lenet-5"] == (1, 28, 28)
    assert models.input_shape("lenet-5", {"in_channels": 3, "image_size": 32}) == (3, 32, 32)
    assert models.model_input("lenet-300-100", {"in_features": 20}) == ModelInput("features", (20,))
    assert models.input_shape("torchvision:resnet18") == (3, 224, 224)
    assert set(models.ZOO) == set(models.CONFIG_SCHEMA) == set(models.INPUT_SHAPES)
    assert no_import == []


# ------------------------------------------------------------------- the real libraries, where present


def test_real_torchvision(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision", reason="torchvision is installed on GPU worker images only")
    arch = "torchvision:resnet18"
    assert named.accepted_keys(arch) == {"num_classes", "zero_init_residual"}
    config = named.check_named_config(arch, {"num_classes": 10})
    with pytest.raises(ModelError, match="unknown key 'dropout'"):
        named.check_named_config(arch, {"dropout": 0.1})
    model = named.build_named(arch, **config).eval()
    path = tmp_path / "r.safetensors"
    save_model(path, model, arch, config)
    named.check_named_state(arch, config, validate_safetensors(path))
    theirs = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    from safetensors.torch import load_file

    theirs.load_state_dict(load_file(str(path)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x))
    assert named.check_named_config("torchvision:vit_b_16", {"num_classes": 10, "image_size": 64}) == {
        "num_classes": 10,
        "image_size": 64,
    }
    with pytest.raises(ModelError, match="does not build"):
        named.check_named_config("torchvision:vit_b_16", {"image_size": 70})  # not a multiple of the patch


def test_real_timm(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm", reason="timm is installed on GPU worker images only")
    arch = "timm:convnext_atto"
    assert {"num_classes", "in_chans", "drop_rate", "drop_path_rate", "global_pool"} <= named.accepted_keys(arch)
    assert "img_size" not in named.accepted_keys(arch)
    config = named.check_named_config(arch, {"num_classes": 10, "in_chans": 1})
    assert named.named_input(arch, config).shape == (1, 224, 224)
    model = named.build_named(arch, **config).eval()
    path = tmp_path / "c.safetensors"
    save_model(path, model, arch, config)
    named.check_named_state(arch, config, validate_safetensors(path))
    loaded, _ = load_model(path)
    theirs = timm.create_model("convnext_atto", pretrained=False, num_classes=10, in_chans=1).eval()
    theirs.load_state_dict(loaded.state_dict())
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x))
    vit = named.named_input("timm:vit_tiny_patch16_224", {"img_size": 96})
    assert vit.shape == (3, 96, 96) and vit.mean == (0.5, 0.5, 0.5)
