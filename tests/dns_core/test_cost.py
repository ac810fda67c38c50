"""dns_core.cost: forward FLOPs against hand counts, on real and meta modules; the counts the upload checks record."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dns_core import cost, models, suite
from dns_core.hf import inspect_hf_folder
from dns_core.inputs import ModelInput
from dns_core.onnx_convert import check_onnx
from tests.api.test_http_uploads import onnx_mlp


def test_linear_is_two_flops_per_multiply_add() -> None:
    assert cost.forward_flops(nn.Linear(100, 10), torch.zeros(1, 100)) == 2 * 100 * 10


def test_conv2d_by_hand() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)  # 28×28 out: 8 × 28 × 28 outputs of 3 × 3 × 3 products each
    assert cost.forward_flops(conv, torch.zeros(1, 3, 28, 28)) == 2 * (8 * 28 * 28) * (3 * 3 * 3)
    strided = nn.Conv2d(3, 8, kernel_size=3, stride=2)  # 13×13 out
    assert cost.forward_flops(strided, torch.zeros(1, 3, 28, 28)) == 2 * (8 * 13 * 13) * (3 * 3 * 3)


def test_meta_device_counts_as_real_weights_do() -> None:
    real = models.build("lenet-5")
    with torch.device("meta"):
        meta = models.build("lenet-5")
    spec = models.model_input("lenet-5")
    on_meta = cost.forward_flops(meta.eval(), cost.meta_example(spec))
    assert on_meta == cost.forward_flops(real.eval(), torch.zeros(1, *spec.shape)) and on_meta is not None
    # Caffe's LeNet: conv1 1→20 5×5 (24×24 out), pool, conv2 20→50 5×5 (8×8 out), pool, fc 800→500→10
    conv = 2 * (20 * 24 * 24) * (1 * 25) + 2 * (50 * 8 * 8) * (20 * 25)
    assert on_meta == conv + 2 * (800 * 500 + 500 * 10)


def test_lenet_300_100_by_hand_and_per_example() -> None:
    net = models.build("lenet-300-100")
    one = 2 * (784 * 300 + 300 * 100 + 100 * 10)
    assert cost.forward_flops(net, torch.zeros(1, 784)) == one
    assert cost.forward_flops(net, torch.zeros(4, 784), examples=4) == one  # a batch, divided back
    assert cost.forward_flops(net, torch.zeros(4, 784)) == 4 * one


def test_keyword_inputs_and_token_examples() -> None:
    class Embedder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            logits: torch.Tensor = self.head(self.embed(input_ids).mean(1))
            return logits

    x = cost.meta_example(ModelInput("tokens", (12,)), 2)
    assert x.dtype == torch.int64 and tuple(x.shape) == (2, 12) and x.device.type == "meta"
    with torch.device("meta"):
        model = Embedder()
    assert cost.forward_flops(model, {"input_ids": x}, examples=2) == 2 * 8 * 3  # the lookup is no arithmetic


def test_a_forward_pass_that_fails_is_unknown() -> None:
    assert cost.forward_flops(nn.Linear(100, 10), torch.zeros(1, 99)) is None
    assert cost.count_flops(lambda: 1 / 0) is None


def test_upload_checks_record_flops_for_hf_folders_and_onnx(tmp_path: Path) -> None:
    folder = suite.write_suite_folder("bert", tmp_path / "bert")
    facts = inspect_hf_folder(folder, max_bytes=1 << 34)
    (length,) = facts.model_input.shape
    assert facts.flops_per_example is not None
    # about 2 FLOPs per parameter per token (the embeddings are lookups, attention adds its products)
    assert length * facts.num_parameters <= facts.flops_per_example <= 2 * length * facts.num_parameters
    (tmp_path / "mlp.onnx").write_bytes(onnx_mlp())
    onnx_facts = check_onnx(tmp_path / "mlp.onnx", max_bytes=1 << 30, max_memory_bytes=1 << 30)
    assert onnx_facts.flops_per_example == 2 * (4 * 8 + 8 * 3)  # two Gemms, per example of the trial batch


@pytest.mark.parametrize("name", sorted(models.ZOO))
def test_every_zoo_architecture_counts_on_meta(name: str) -> None:
    with torch.device("meta"):
        module = models.build(name)
    flops = cost.forward_flops(module.eval(), cost.meta_example(models.model_input(name)))
    assert flops is not None and flops >= 2 * models.count_parameters(module) * 0.9
