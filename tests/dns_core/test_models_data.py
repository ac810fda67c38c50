import gzip
import struct
from pathlib import Path

import pytest
import torch

from dns_core import models
from dns_core.data import DataError, load_fashion_mnist, read_idx
from dns_core.io import load_model, save_model


def test_paper_parameter_counts() -> None:
    assert models.count_parameters(models.build("lenet-300-100")) == 266_610
    assert models.count_parameters(models.build("lenet-5")) == 431_080


@pytest.mark.parametrize("name", sorted(models.ZOO))
def test_every_zoo_model_runs(name: str) -> None:
    m = models.build(name).eval()
    assert m(torch.randn(2, *models.INPUT_SHAPES[name])).shape == (2, 10)


def test_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'lenet-7'"):
        models.build("lenet-7")


def _idx(path: Path, data: bytes, shape: tuple[int, ...], code: int = 0x08, compress: bool = False) -> None:
    raw = bytes([0, 0, code, len(shape)]) + struct.pack(">" + "I" * len(shape), *shape) + data
    path.write_bytes(gzip.compress(raw) if compress else raw)


def test_idx_reader(tmp_path: Path) -> None:
    _idx(tmp_path / "a.gz", bytes(range(6)), (2, 3), compress=True)
    assert read_idx(tmp_path / "a.gz").tolist() == [[0, 1, 2], [3, 4, 5]]
    _idx(tmp_path / "b", struct.pack(">2i", 1, -2), (2,), code=0x0C)
    assert read_idx(tmp_path / "b").tolist() == [1, -2]
    _idx(tmp_path / "c", bytes(5), (2, 3))
    with pytest.raises(DataError, match="announces 6"):
        read_idx(tmp_path / "c")
    (tmp_path / "d").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="not an IDX"):
        read_idx(tmp_path / "d")


def test_fashion_mnist_missing_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_fashion_mnist_layout(tmp_path: Path) -> None:
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", bytes(2 * 28 * 28), (2, 28, 28), compress=True)
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", bytes([3, 7]), (2,), compress=True)
    d = load_fashion_mnist("test", root=tmp_path)
    assert d.inputs.shape == (2, 1, 28, 28)
    assert d.targets is not None and d.targets.tolist() == [3, 7]


def test_safetensors_round_trip_and_mismatch(tmp_path: Path) -> None:
    m = models.build("lenet-5")
    save_model(tmp_path / "m.safetensors", m, "lenet-5")
    back, arch = load_model(tmp_path / "m.safetensors")
    assert arch == "lenet-5"
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(back(x), m(x))
    with pytest.raises(ValueError, match=r"missing .*fc3\.weight"):
        load_model(tmp_path / "m.safetensors", "lenet-300-100")
