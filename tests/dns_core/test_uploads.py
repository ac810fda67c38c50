"""Untrusted files: every refused format gets its own error, nothing runs, parsers only raise our errors."""

import contextlib
import gzip
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from dns_core import models
from dns_core.data import DataError, Dataset, check_fits, load_data_file, validation_split
from dns_core.io import load_model, save_model
from dns_core.uploads import (
    FileTooLarge,
    InvalidFile,
    RefusedFormat,
    Sniffed,
    UploadError,
    check_archive,
    sniff,
    validate_safetensors,
)


class _Payload:
    """Unpickling this creates the directory ``target``: the proof that a load would run code."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.target),))


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    return tmp_path / "SENTINEL_code_ran"


def _loaders() -> list[Callable[[Path], object]]:
    return [sniff, validate_safetensors, load_data_file, lambda p: load_model(p, "lenet-300-100")]


def test_the_pickle_payload_really_runs_when_unpickled(tmp_path: Path, sentinel: Path) -> None:
    """The hostile file is real: plain pickle.load in another process creates the sentinel."""
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(sentinel), protocol=4))
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"], check=True)
    assert sentinel.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("name", ["model.pt", "weights.safetensors", "data.npz", "model.onnx"])
def test_pickles_are_refused_by_content_and_never_run(tmp_path: Path, sentinel: Path, protocol: int, name: str) -> None:
    path = tmp_path / name  # the name lies; the content decides
    path.write_bytes(pickle.dumps(_Payload(sentinel), protocol=protocol))
    for load in _loaders():
        with pytest.raises(RefusedFormat, match="pickle"):
            load(path)
    assert not sentinel.exists()


def test_torch_save_archives_are_refused_and_never_run(tmp_path: Path, sentinel: Path) -> None:
    new, legacy = tmp_path / "new.safetensors", tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(2), "evil": _Payload(sentinel)}, new)
    torch.save({"w": torch.ones(2), "evil": _Payload(sentinel)}, legacy, _use_new_zipfile_serialization=False)
    for load in _loaders():
        with pytest.raises(RefusedFormat, match=r"torch\.save archive"):
            load(new)
        with pytest.raises(RefusedFormat, match="pickle"):
            load(legacy)
    assert not sentinel.exists()


def test_torchscript_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    torch.jit.script(nn.Linear(3, 2)).save(str(path))  # type: ignore[no-untyped-call]
    for load in _loaders():
        with pytest.raises(RefusedFormat, match="TorchScript"):
            load(path)


def test_torch_export_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    torch.export.save(torch.export.export(nn.Linear(3, 2), (torch.randn(1, 3),)), str(path))
    for load in _loaders():
        with pytest.raises(RefusedFormat, match=r"torch\.export"):
            load(path)


def test_torch_package_is_refused(tmp_path: Path) -> None:
    from torch.package.package_exporter import PackageExporter

    path = tmp_path / "model.pt"
    with PackageExporter(str(path)) as exporter:
        exporter.save_pickle("m", "m.pkl", {"a": 1})
    with pytest.raises(RefusedFormat, match=r"torch\.package"):
        sniff(path)


def test_archives_are_recognised_not_refused_and_torch_zips_still_are(tmp_path: Path, sentinel: Path) -> None:
    """A zip or tar is sniffed as such (unpacked later by dns_core.archives); a torch.save archive
    stays refused however it is wrapped, and nothing loads either as weights."""
    import tarfile

    plain = _zip(tmp_path / "folder.zip", {"bert/config.json": b"{}", "bert/vocab.txt": b"a\n"})
    assert sniff(plain).kind == "zip"
    with tarfile.open(tmp_path / "folder.tgz", "w:gz") as tf:
        tf.add(plain, arcname="bert/folder.zip")
    assert sniff(tmp_path / "folder.tgz") == Sniffed("tar", gzipped=True)
    for path in (plain, tmp_path / "folder.tgz"):
        with pytest.raises(RefusedFormat, match="not safetensors weights"):
            load_model(path, "lenet-300-100")
    saved = tmp_path / "w.pt"
    torch.save({"evil": _Payload(sentinel)}, saved)
    with zipfile.ZipFile(saved) as zf:
        entries = {f"wrapped/{name}": zf.read(name) for name in zf.namelist()}
    with pytest.raises(RefusedFormat, match=r"torch\.save archive"):
        sniff(_zip(tmp_path / "wrapped.zip", entries))
    gz = tmp_path / "evil.gz"
    gz.write_bytes(gzip.compress(pickle.dumps(_Payload(sentinel))))
    for load in _loaders():
        with pytest.raises(RefusedFormat, match="gzip-compressed pickle"):
            load(gz)
    assert not sentinel.exists()


def test_refusals_say_how_to_convert(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(RefusedFormat) as err:
        load_model(path, "lenet-300-100")
    assert "torch.onnx.export" in str(err.value) and "save_file" in str(err.value)


# --- safetensors headers -------------------------------------------------------------------------


def _weights(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(3, 4), "b": torch.arange(5, dtype=torch.int64)}, str(path))
    return path


def _rewrite_header(path: Path, edit: Callable[[dict[str, Any]], None], data: bytes | None = None) -> None:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + (raw[8 + n :] if data is None else data))


def test_valid_safetensors_pass(tmp_path: Path) -> None:
    h = validate_safetensors(_weights(tmp_path))
    assert h.tensors == {"a": ("F32", (3, 4)), "b": ("I64", (5,))}


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = _weights(tmp_path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(InvalidFile, match="truncated"):
        validate_safetensors(path)
    path.write_bytes(b"\x05\x00\x00")
    with pytest.raises(InvalidFile, match="truncated"):
        validate_safetensors(path)


def test_lying_header_length(tmp_path: Path) -> None:
    path = _weights(tmp_path)
    raw = path.read_bytes()
    path.write_bytes((len(raw) * 3).to_bytes(8, "little") + raw[8:])
    with pytest.raises(InvalidFile, match="header claims"):
        validate_safetensors(path)
    path.write_bytes((1 << 40).to_bytes(8, "little") + raw[8:])
    with pytest.raises(FileTooLarge, match="header of"):
        validate_safetensors(path)


def test_offsets_that_lie(tmp_path: Path) -> None:
    path = _weights(tmp_path)

    def overlap(h: dict[str, Any]) -> None:
        assert h["b"]["data_offsets"] == [0, 40]
        h["a"]["data_offsets"] = [32, 80]

    _rewrite_header(path, overlap)
    with pytest.raises(InvalidFile, match="overlaps"):
        validate_safetensors(path)

    path = _weights(tmp_path)

    def wrong_length(h: dict[str, Any]) -> None:
        h["a"]["shape"] = [3, 5]

    _rewrite_header(path, wrong_length)
    with pytest.raises(InvalidFile, match="needs 60 bytes"):
        validate_safetensors(path)

    path = _weights(tmp_path)
    _rewrite_header(path, lambda h: None, data=path.read_bytes()[-88:] + b"extra")
    with pytest.raises(InvalidFile, match="after the last tensor"):
        validate_safetensors(path)


def test_dtype_allow_list(tmp_path: Path) -> None:
    path = _weights(tmp_path)

    def bad(h: dict[str, Any]) -> None:
        h["b"]["dtype"] = "F8_E4M3"
        h["b"]["shape"] = [40]

    _rewrite_header(path, bad)
    with pytest.raises(InvalidFile, match="dtype 'F8_E4M3'"):
        validate_safetensors(path)


def test_oversized_files(tmp_path: Path) -> None:
    path = _weights(tmp_path)
    for load in (sniff, validate_safetensors, load_data_file):
        with pytest.raises(FileTooLarge, match="limit"):
            load(path, max_bytes=100)
    with pytest.raises(FileTooLarge):
        load_model(path, "lenet-300-100", max_bytes=100)


# --- archives and data ---------------------------------------------------------------------------


def test_npz_with_object_arrays_is_refused(tmp_path: Path, sentinel: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, inputs=np.array([_Payload(sentinel), 1], dtype=object))
    with pytest.raises(DataError, match="object arrays"):
        load_data_file(path)
    assert not sentinel.exists()


def _zip(path: Path, entries: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (0o120777 << 16) | 0
            zf.writestr(info, "/etc/passwd")
    return path


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("entries", "link", "message"),
    [
        ({"../../escape.npy": _npy(np.zeros(3))}, None, "outside the archive"),
        ({"/abs.npy": _npy(np.zeros(3))}, None, "outside the archive"),
        ({"inputs.npy": _npy(np.zeros(3))}, "targets.npy", "is a link"),
        ({f"a{i}.npy": _npy(np.zeros(1)) for i in range(100)}, None, "100 entries"),
        ({"inputs.npy": _npy(np.zeros(2_000_000, dtype=np.uint8))}, None, "expands"),
    ],
)
def test_hostile_archives(tmp_path: Path, entries: dict[str, bytes], link: str | None, message: str) -> None:
    path = _zip(tmp_path / "d.npz", entries, link)
    with pytest.raises(UploadError, match=message):
        load_data_file(path)
    with pytest.raises(UploadError, match=message):
        check_archive(path)


def test_data_files_load_by_content(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((20, 1, 28, 28), dtype=np.float32)
    y = np.arange(20) % 10
    np.savez(tmp_path / "d.bin", inputs=x, targets=y)  # numpy appends .npz
    save_file({"inputs": torch.from_numpy(x), "targets": torch.from_numpy(y)}, str(tmp_path / "d.data"))
    for name in ("d.bin.npz", "d.data"):
        ds = load_data_file(tmp_path / name)
        assert torch.equal(ds.inputs, torch.from_numpy(x))
        assert ds.targets is not None and torch.equal(ds.targets, torch.from_numpy(y))

    images = np.zeros((20, 28, 28), dtype=np.uint8)
    images[:, 3, 4] = 255
    (tmp_path / "img.gz").write_bytes(gzip.compress(_idx(images)))
    (tmp_path / "lab").write_bytes(_idx(y.astype(np.uint8)))
    ds = load_data_file(tmp_path / "img.gz", tmp_path / "lab")
    assert ds.inputs.shape == (20, 1, 28, 28) and float(ds.inputs[0, 0, 3, 4]) == 1.0
    assert ds.targets is not None and ds.targets.tolist() == y.tolist()


def _idx(a: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.float32: 0x0D}[a.dtype.type]
    head = bytes([0, 0, code, a.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 3), np.float32)}, "expected arrays 'inputs'"),
        ({"inputs": np.zeros((4, 3), np.float32), "extra": np.zeros(1)}, "found extra, inputs"),
        ({"inputs": np.zeros((4, 3), np.float32), "targets": np.zeros(3, np.int64)}, "4 inputs but 3 targets"),
        ({"inputs": np.zeros((4, 3), np.float32), "targets": np.zeros(4, np.float32)}, "1-D integer"),
        ({"inputs": np.full((4, 3), np.nan, np.float32)}, "NaN"),
        ({"inputs": np.zeros(4, np.float32)}, "batch dimension"),
        ({"inputs": np.zeros((4, 3), np.float32), "targets": -np.ones(4, np.int64)}, "non-negative"),
    ],
)
def test_bad_data_says_what_is_wrong(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=message):
        load_data_file(tmp_path / "d.npz")


def test_models_are_not_data(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07\x12\x04test")
    with pytest.raises(DataError, match="model, not data"):
        load_data_file(tmp_path / "m.onnx")


def test_shapes_are_checked_against_the_model() -> None:
    model = models.build("lenet-5")
    ok = Dataset(torch.randn(6, 1, 28, 28), torch.arange(6))
    assert check_fits(model, ok) == 10
    with pytest.raises(DataError, match=r"inputs of shape \[3, 32, 32\]"):
        check_fits(model, Dataset(torch.randn(6, 3, 32, 32), torch.arange(6)))
    with pytest.raises(DataError, match="targets go up to 12 but the model has 10 outputs"):
        check_fits(model, Dataset(torch.randn(2, 1, 28, 28), torch.tensor([1, 12])))


def test_validation_split_given_or_carved() -> None:
    data = Dataset(torch.randn(100, 4), torch.arange(100) % 3)
    train, valid = validation_split(data, fraction=0.2, seed=1)
    assert (len(train), len(valid)) == (80, 20)
    again = validation_split(data, fraction=0.2, seed=1)[1]
    assert torch.equal(again.inputs, valid.inputs)
    with pytest.raises(DataError, match="both have targets"):
        validation_split(data, Dataset(torch.randn(5, 4)))
    with pytest.raises(DataError, match="differ"):
        validation_split(data, Dataset(torch.randn(5, 3), torch.zeros(5, dtype=torch.int64)))


# --- zoo weights with a config --------------------------------------------------------------------


def test_zoo_config_is_checked_against_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_model(path, models.build("lenet-5", num_classes=4), "lenet-5", {"num_classes": 4})
    model, arch = load_model(path)
    assert arch == "lenet-5" and model(torch.randn(1, 1, 28, 28)).shape == (1, 4)
    with pytest.raises(ValueError, match=r"unknown key 'hidden'.*num_classes must be an integer"):
        load_model(path, "lenet-5", {"hidden": 3, "num_classes": "4"})
    with pytest.raises(ValueError, match=r"mis-shaped fc2\.bias.*fc2\.weight"):
        load_model(path, "lenet-5", {})
    with pytest.raises(ValueError, match="unknown architecture 'gpt'"):
        load_model(path, "gpt")


# --- fuzzing: nothing but our own errors ---------------------------------------------------------


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bytes_raise_only_our_errors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "f"
    path.write_bytes(data)
    for load in (sniff, validate_safetensors, load_data_file):
        with contextlib.suppress(UploadError, DataError):
            load(path)


def _valid_files(tmp_path: Path) -> list[Path]:
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    np.savez(tmp_path / "d.npz", inputs=x, targets=np.arange(6))
    save_file({"inputs": torch.from_numpy(x), "targets": torch.arange(6)}, str(tmp_path / "d.safetensors"))
    (tmp_path / "d.idx").write_bytes(_idx(np.arange(24, dtype=np.uint8).reshape(6, 4)))
    return [tmp_path / "d.npz", tmp_path / "d.safetensors", tmp_path / "d.idx"]


def corrupt(path: Path, flips: list[tuple[int, int]]) -> Path:
    """``path`` with the byte at each position (modulo its length) set to the given value."""
    raw = bytearray(path.read_bytes())
    for pos, value in flips:
        raw[pos % len(raw)] = value
    path.write_bytes(bytes(raw))
    return path


@given(st.integers(0, 2), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=12))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_corrupted_data_files_load_or_raise_our_errors(
    tmp_path: Path, which: int, flips: list[tuple[int, int]]
) -> None:
    path = corrupt(_valid_files(tmp_path)[which], flips)
    try:
        ds = load_data_file(path)
    except (UploadError, DataError):
        return
    assert isinstance(ds, Dataset) and ds.inputs.dtype == torch.float32
