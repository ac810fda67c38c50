"""Hugging Face folders: the suite's models through inspect, load, surgery and save, and hostile folders."""

from __future__ import annotations

import copy
import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dns_core import hf, suite
from dns_core.data import Dataset
from dns_core.errors import ModelError
from dns_core.hf import HF_ARCHITECTURES, HFClassifier, inspect_hf_folder, load_hf_folder, save_hf_folder
from dns_core.inputs import ModelInput
from dns_core.spec import CompressSpec
from dns_core.surgery import Surgery, prunable_layers

GiB = 2**30


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("suite")
    return {name: suite.write_suite_folder(name, root / name) for name in suite.SUITE}


def _copy(folders: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folders[name], tmp_path / name))


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _batch(spec: ModelInput, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if spec.kind == "tokens":
        assert spec.vocab_size is not None
        ids = torch.randint(0, spec.vocab_size, (n, *spec.shape), generator=g)
        mask = torch.ones_like(ids)
        mask[: n // 2, spec.shape[0] // 2 :] = 0  # some padded sequences
        return torch.stack([ids, mask], 1)
    return torch.randn((n, *spec.shape), generator=g)


def _auto_class(task: str) -> Any:
    import transformers

    return (
        transformers.AutoModelForSequenceClassification
        if task == "text"
        else transformers.AutoModelForImageClassification
    )


def test_table_names_only_transformers_classifiers() -> None:
    assert set(HF_ARCHITECTURES) >= {
        "BertForSequenceClassification", "DistilBertForSequenceClassification", "ViTForImageClassification",
        "ResNetForImageClassification", "ConvNextForImageClassification", "MobileNetV2ForImageClassification",
        "EfficientNetForImageClassification",
    }  # fmt: skip
    for name, task in HF_ARCHITECTURES.items():
        _, model_class = hf._classes(name)
        assert model_class.__module__.startswith("transformers.models.")
        assert model_class.__name__ == name
        assert task in ("image", "text")
    assert {type(m).__name__ for m in (f() for f in suite.SUITE.values())} == set(HF_ARCHITECTURES)


@pytest.mark.parametrize("name", list(suite.SUITE))
def test_suite_model_round_trip(name: str, folders: dict[str, Path], tmp_path: Path) -> None:
    folder = folders[name]
    facts = inspect_hf_folder(folder, max_bytes=GiB)
    task = "text" if name in suite.TEXT else "image"
    assert (facts.task, facts.num_labels) == (task, suite.NUM_LABELS)  # 10: the built-in sets fit every model
    assert facts.architecture == json.loads((folder / "config.json").read_text())["architectures"][0]
    if task == "image":
        assert facts.model_input == ModelInput("image", (3, 32, 32), mean=suite.IMAGE_MEAN, std=suite.IMAGE_STD)
    else:
        assert facts.model_input == ModelInput("tokens", (suite.SEQ_LEN,), vocab_size=suite.VOCAB)
    assert 0 < facts.estimate_bytes < GiB and facts.num_parameters > 0

    module = load_hf_folder(folder)
    assert isinstance(module, HFClassifier) and module.model_input == facts.model_input
    assert all(p.dtype == torch.float32 for p in module.parameters())
    x = _batch(module.model_input, 8)
    module.eval()
    with torch.no_grad():
        logits = module(x)
        reference = cast(nn.Module, suite.SUITE[name]()).eval()
        expect = (
            reference(input_ids=x[:, 0], attention_mask=x[:, 1]) if task == "text" else reference(pixel_values=x)
        ).logits
    assert logits.shape == (8, facts.num_labels)
    torch.testing.assert_close(logits, expect, atol=1e-5, rtol=1e-5)  # the folder's weights, not fresh ones

    # masks apply through every selected layer's own forward: masked == weights zeroed the same way
    zeroed = copy.deepcopy(module)
    surgery = Surgery(module)
    assert {layer.name for layer in surgery.layers} == {n for n, _ in prunable_layers(zeroed)}
    g = torch.Generator().manual_seed(1)
    dead: dict[str, int] = {}
    with torch.no_grad():
        for layer in surgery.layers:
            target = dict(zeroed.named_modules())[layer.name]
            for t in layer.tensors:
                keep = (torch.rand(layer.mask(t).shape, generator=g) < 0.5).float()
                layer.set_mask(t, keep)
                getattr(target, t).mul_(keep)
            dead[layer.name] = int((layer.mask("weight") == 0).sum())
        torch.testing.assert_close(module(x), zeroed(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(module(x), logits, atol=1e-3)
    surgery.squash()

    out = tmp_path / "out"
    written = save_hf_folder(module, out, source=folder)
    assert {p.name for p in written} >= {"config.json", "model.safetensors"}
    if task == "image":
        assert (out / "preprocessor_config.json").read_bytes() == (folder / "preprocessor_config.json").read_bytes()
    loaded = _auto_class(task).from_pretrained(out).eval()
    assert type(loaded).__name__ == facts.architecture
    with torch.no_grad():
        again = (loaded(input_ids=x[:, 0], attention_mask=x[:, 1]) if task == "text" else loaded(pixel_values=x)).logits
        torch.testing.assert_close(again, module(x), atol=1e-4, rtol=1e-4)
    modules = dict(loaded.named_modules())
    for layer_name, n_dead in dead.items():
        weight = modules[layer_name.removeprefix("model.")].weight
        assert int((weight == 0).sum()) >= n_dead  # the pruned weights are zeros in the file
    # and our own loader reads the written folder back, through every check
    back = load_hf_folder(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), module(x), atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint(folders: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    suite.SUITE["bert"]().save_pretrained(str(out), max_shard_size="100KB")
    assert (out / hf.INDEX).exists() and not (out / hf.WEIGHTS).exists()
    inspect_hf_folder(out, max_bytes=GiB)
    module = load_hf_folder(out).eval()
    x = _batch(module.model_input, 4)
    with torch.no_grad():
        torch.testing.assert_close(module(x), load_hf_folder(folders["bert"]).eval()(x))


# --------------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"auto_map": {"AutoModel": "modeling_evil.EvilModel"}}, "own Python code"),
        ({"text_config": {"trust_remote_code": True}}, "own Python code"),
        ({"architectures": ["EvilForSequenceClassification"]}, "not supported"),
        ({"architectures": ["GPT2LMHeadModel"]}, "BertForSequenceClassification"),
        ({"architectures": ["BertForSequenceClassification", "BertModel"]}, "exactly one"),
        ({"architectures": None}, "names no architecture"),
        ({"model_type": "roberta"}, "model_type 'roberta' does not match"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantized"),
        ({"num_hidden_layers": 10**6}, "layers/blocks"),
        ({"num_labels": 10**9, "id2label": None}, "labels"),
        ({"hidden_size": 10**12}, "larger than"),
        ({"hidden_size": 62, "num_attention_heads": 4}, "does not build"),
    ],
)
def test_hostile_configs(folders: dict[str, Path], tmp_path: Path, changes: dict[str, Any], words: str) -> None:
    folder = _copy(folders, "bert", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=words):
        inspect_hf_folder(folder, max_bytes=GiB)
    with pytest.raises(ModelError, match=words):
        load_hf_folder(folder)


@pytest.mark.parametrize(
    "changes",
    [
        {"return_dict": False, "output_hidden_states": True, "torchscript": True},
        {"_attn_implementation": "kernels-community/flash-attn", "attn_implementation": "flash_attention_2"},
        {"dtype": "float16", "use_kernels": True},
    ],
)
def test_config_keys_overridden(folders: dict[str, Path], tmp_path: Path, changes: dict[str, Any]) -> None:
    """Output format, attention kernel (a Hub kernel would be downloaded code) and dtype are chosen here."""
    folder = _copy(folders, "bert", tmp_path)
    _edit_config(folder, **changes)
    module = load_hf_folder(folder)
    assert module.model.config._attn_implementation in ("sdpa", "eager")
    assert all(p.dtype == torch.float32 for p in module.parameters())
    x = _batch(module.model_input, 4)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(x), load_hf_folder(folders["bert"]).eval()(x))


def test_config_json_itself(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(folders, "vit", tmp_path)
    (folder / "config.json").write_text('{"architectures": ["ViTForImageClassification"], "hidden_size": NaN}')
    with pytest.raises(ModelError, match="NaN"):
        inspect_hf_folder(folder, max_bytes=GiB)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="JSON object"):
        inspect_hf_folder(folder, max_bytes=GiB)
    (folder / "config.json").write_text(" " * (hf.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ModelError, match="bytes"):
        inspect_hf_folder(folder, max_bytes=GiB)
    (folder / "config.json").unlink()
    with pytest.raises(ModelError, match=r"no config\.json"):
        inspect_hf_folder(folder, max_bytes=GiB)


def test_huge_sizes_refused_before_allocating(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(folders, "bert", tmp_path)
    _edit_config(folder, hidden_size=10**6, intermediate_size=4 * 10**6, num_attention_heads=1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"parameters.*GiB.*more than the 16.0 GiB") as info:
        inspect_hf_folder(folder, max_bytes=16 * GiB)
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # no real tensor of that size
    assert "parameters" in str(info.value)
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"loading it needs .* GiB"):
        load_hf_folder(folder)
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024
    # activations alone: a ViT whose patch grid is huge
    folder = _copy(folders, "vit", tmp_path)
    _edit_config(folder, image_size=4096, patch_size=4)
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"estimated .* GiB to train with batches of 64"):
        inspect_hf_folder(folder, max_bytes=16 * GiB)
    assert time.perf_counter() - start < 10
    # the same model fits a larger cap, and the estimate grows with the batch
    small = inspect_hf_folder(folders["vit"], max_bytes=GiB, batch_size=1)
    large = inspect_hf_folder(folders["vit"], max_bytes=GiB, batch_size=64)
    assert large.estimate_bytes - small.estimate_bytes == 63 * small.activation_bytes


def test_pickled_weights_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(folders, "bert", tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 not loaded")
    with pytest.raises(ModelError, match=r"pytorch_model\.bin, a pickle.*save_pretrained"):
        inspect_hf_folder(folder, max_bytes=GiB)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ModelError, match=r"no model\.safetensors"):
        inspect_hf_folder(folder, max_bytes=GiB)
    # a pickle under the safetensors name is refused by content
    (folder / "model.safetensors").write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    with pytest.raises(ValueError, match="pickle"):
        inspect_hf_folder(folder, max_bytes=GiB)


def _rewrite_weights(folder: Path, edit: Any) -> None:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda s: s.update({"classifier.weight": torch.zeros(5, 64)}), r"mis-shaped classifier\.weight"),
        (lambda s: s.update({"evil.extra": torch.zeros(2)}), r"unexpected evil\.extra"),
        (lambda s: s.pop("classifier.weight"), r"missing classifier\.weight"),
        (lambda s: s.update({"classifier.bias": torch.zeros(suite.NUM_LABELS, dtype=torch.int32)}), "not a float type"),
    ],
)
def test_mismatched_weights(folders: dict[str, Path], tmp_path: Path, edit: Any, words: str) -> None:
    folder = _copy(folders, "bert", tmp_path)
    _rewrite_weights(folder, edit)
    with pytest.raises(ModelError, match=words):
        inspect_hf_folder(folder, max_bytes=GiB)


def test_tolerated_differences(folders: dict[str, Path], tmp_path: Path) -> None:
    """What from_pretrained reads too: a position_ids buffer, legacy LayerNorm names, fp16 weights."""

    def edit(state: dict[str, torch.Tensor]) -> None:
        state["bert.embeddings.position_ids"] = torch.arange(suite.SEQ_LEN)[None]
        state["bert.embeddings.LayerNorm.gamma"] = state.pop("bert.embeddings.LayerNorm.weight")
        state["classifier.weight"] = state["classifier.weight"].half()

    folder = _copy(folders, "bert", tmp_path)
    _rewrite_weights(folder, edit)
    inspect_hf_folder(folder, max_bytes=GiB)
    module = load_hf_folder(folder)
    original = load_hf_folder(folders["bert"])
    model, reference = cast(Any, module.model), cast(Any, original.model)
    torch.testing.assert_close(model.bert.embeddings.LayerNorm.weight, reference.bert.embeddings.LayerNorm.weight)
    assert model.classifier.weight.dtype == torch.float32


def test_save_refuses_masked_model(folders: dict[str, Path], tmp_path: Path) -> None:
    module = load_hf_folder(folders["resnet"])
    Surgery(module)
    with pytest.raises(ValueError, match="squash"):
        save_hf_folder(module, tmp_path / "out")


def test_image_input_from_preprocessor(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(folders, "resnet", tmp_path)
    pre = {
        "crop_size": {"height": 24, "width": 24},
        "size": {"shortest_edge": 28},
        "image_mean": 0.5,
        "image_std": 0.25,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    assert inspect_hf_folder(folder, max_bytes=GiB).model_input == ModelInput(
        "image", (3, 24, 24), mean=(0.5,) * 3, std=(0.25,) * 3
    )
    (folder / "preprocessor_config.json").unlink()
    assert inspect_hf_folder(folder, max_bytes=GiB).model_input == ModelInput("image", (3, 224, 224))


# --------------------------------------------------------------------------------------------------
# through the engine


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_compress_end_to_end(name: str, folders: dict[str, Path], tmp_path: Path) -> None:
    module = load_hf_folder(folders[name])
    spec = module.model_input
    g = torch.Generator().manual_seed(0)
    train = Dataset(_batch(spec, 128, seed=1), torch.randint(0, module.num_labels, (128,), generator=g))
    valid = Dataset(_batch(spec, 32, seed=2), torch.randint(0, module.num_labels, (32,), generator=g))
    run = CompressSpec(method="dns", compression=5, iterations=30, batch_size=16, device="cpu")
    result = run.compress(module, train, valid)
    report = result.report
    assert abs(report["compression"] - 5) <= 0.25, report["compression"]
    dense = set(report["left_dense"])
    assert report["layers"] and all(layer["kept"] < layer["total"] for layer in report["layers"]
                                    if layer["name"] not in dense)  # fmt: skip
    assert {layer["name"] for layer in report["layers"]} == {n for n, _ in prunable_layers(result.model)}
    assert set(report["left_dense"]) <= {"model.classifier", "model.vit.embeddings.patch_embeddings.projection"}
    out = tmp_path / "out"
    save_hf_folder(result.model, out, source=folders[name])  # type: ignore[arg-type]
    back = load_hf_folder(out)
    total = sum(p.numel() for p in back.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in back.parameters())
    assert abs(total / nonzero - report["compression"]) < 0.01
