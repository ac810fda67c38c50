import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from dns_core import Ramp, ScheduledSurgery, Target, models
from dns_core.sparse import SparseFormatError, decode_gaps, encode_gaps, load_sparse, save_sparse


@given(st.sets(st.integers(min_value=0, max_value=5000), max_size=300))
@settings(max_examples=200, deadline=None)
def test_gap_code_round_trips(positions: set[int]) -> None:
    idx = torch.tensor(sorted(positions), dtype=torch.int64)
    assert torch.equal(decode_gaps(encode_gaps(idx)), idx)


@pytest.mark.parametrize("pos", [[0], [254], [255], [256], [0, 255], [0, 256], [509, 510, 511, 1021]])
def test_gap_code_escapes(pos: list[int]) -> None:
    idx = torch.tensor(pos)
    stream = encode_gaps(idx)
    assert torch.equal(decode_gaps(stream), idx)
    assert int((stream != 0).sum()) == len(pos)


@pytest.mark.parametrize("density", [0.0, 0.003, 0.05, 0.4, 0.9, 1.0])
def test_every_density_round_trips_exactly(tmp_path: Path, density: float) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g) * (torch.rand(300, 200, generator=g) < density)
    state = {"w": w, "b": torch.randn(7, generator=g), "i": torch.arange(5)}
    save_sparse(tmp_path / "s.safetensors", state)
    back = load_sparse(tmp_path / "s.safetensors")
    assert set(back) == set(state)
    for k in state:
        assert back[k].dtype == state[k].dtype
        assert torch.equal(back[k], state[k])


def test_pruned_lenet5_file_is_close_to_its_kept_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.build("lenet-5")
    surgery = ScheduledSurgery(model, Target(compression=50.0), ramp=Ramp(0, 0, "one-shot"))
    surgery.step(0)
    surgery.squash()
    state = model.state_dict()
    stats = save_sparse(tmp_path / "m.safetensors", state)
    nonzero = sum(int((t != 0).sum()) for t in state.values())
    assert stats.kept + stats.dense_bytes // 4 >= nonzero
    assert stats.file_bytes <= 1.3 * (stats.value_bytes + stats.dense_bytes)
    assert stats.file_bytes < sum(t.numel() * 4 for t in state.values()) / 25  # the file really shrinks
    back = load_sparse(tmp_path / "m.safetensors")
    x = torch.randn(4, 1, 28, 28)
    fresh = models.build("lenet-5")
    fresh.load_state_dict(back)
    assert torch.equal(fresh(x), model(x))


def _tamper(path: Path, edit: str) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    manifest = json.loads(meta["netsurgery.sparse"])
    if edit == "version":
        manifest["version"] = 99
    elif edit == "shape":
        manifest["tensors"]["w"]["shape"] = [3, 3]
    elif edit == "values":
        tensors["values.float32"] = tensors["values.float32"][:-1].contiguous()
    elif edit == "encoding":
        manifest["tensors"]["w"]["encoding"] = "zip"
    elif edit == "dtype":
        manifest["tensors"]["w"]["dtype"] = "object"
    elif edit == "span":
        manifest["tensors"]["w"]["index"] = [0, 10**9]
    elif edit == "count":
        manifest["tensors"]["w"]["values"] = [0, 1]
    meta["netsurgery.sparse"] = json.dumps(manifest)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("edit", ["version", "shape", "values", "encoding", "dtype", "span", "count"])
def test_inconsistent_files_raise_the_format_error(tmp_path: Path, edit: str) -> None:
    w = torch.zeros(100, 100)
    w[3, 4] = 1.0
    w[90, 1] = -2.0
    save_sparse(tmp_path / "s.safetensors", {"w": w})
    _tamper(tmp_path / "s.safetensors", edit)
    with pytest.raises(SparseFormatError):
        load_sparse(tmp_path / "s.safetensors")


def test_not_a_sparse_file(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"\x80\x04garbage")
    with pytest.raises(SparseFormatError, match="not a readable safetensors"):
        load_sparse(tmp_path / "x")
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(SparseFormatError, match="manifest"):
        load_sparse(tmp_path / "plain.safetensors")


@given(st.binary(max_size=400))
@settings(max_examples=150, deadline=None)
def test_random_bytes_raise_only_the_format_error(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(data)
    with pytest.raises(SparseFormatError):
        load_sparse(path)


@given(st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=20))
@settings(max_examples=150, deadline=None)
def test_corrupted_files_load_or_raise_the_format_error(
    tmp_path_factory: pytest.TempPathFactory, flips: list[tuple[int, int]]
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "s.safetensors"
    w = torch.zeros(40, 50)
    w[::7, ::3] = 1.5
    save_sparse(path, {"w": w, "b": torch.arange(4.0)})
    raw = bytearray(path.read_bytes())
    for pos, value in flips:
        raw[pos % len(raw)] = value
    path.write_bytes(bytes(raw))
    try:
        back = load_sparse(path)
    except SparseFormatError:
        return
    # a flip can leave a consistent file (a renamed tensor, a changed value): then it loads whole
    assert 1 <= len(back) <= 2 and all(isinstance(v, torch.Tensor) for v in back.values())


def _pruned_weights(seed: int = 0, density: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(200, 150, generator=g) * (torch.rand(200, 150, generator=g) < density)
    return {"fc.weight": w, "fc.bias": torch.randn(200, generator=g)}


@pytest.mark.parametrize(("codec", "bound"), [("float16", 1e-3), ("int8", 0.51), ("shared", 0.51)])
def test_value_codecs_stay_close_keep_zeros_and_shrink_the_file(tmp_path: Path, codec: str, bound: float) -> None:
    state = _pruned_weights()
    plain = save_sparse(tmp_path / "plain.safetensors", state)
    stats = save_sparse(tmp_path / f"{codec}.safetensors", state, codec=codec)
    back = load_sparse(tmp_path / f"{codec}.safetensors")
    w, got = state["fc.weight"], back["fc.weight"]
    assert got.dtype == torch.float32 and got.shape == w.shape
    assert torch.equal(got[w == 0], torch.zeros(int((w == 0).sum())))  # pruned entries stay exactly zero
    err = (got - w).abs().max().item()
    if codec == "float16":
        assert err <= bound * w.abs().max().item()
    elif codec == "int8":  # at most half a quantisation step
        assert err <= bound * w.abs().max().item() / 127
    else:  # at most half the widest gap between neighbouring centroids; at most 256 distinct values
        assert len(torch.unique(got[w != 0])) <= 256
        assert err <= bound * (w.max() - w.min()).item() / 16
    assert torch.equal(back["fc.bias"], state["fc.bias"])  # 1-D tensors are left lossless by default
    assert stats.file_bytes < plain.file_bytes * (0.75 if codec == "float16" else 0.6)
    meta = json.loads(load_file_meta(tmp_path / f"{codec}.safetensors"))
    assert meta["version"] == 2 and meta["tensors"]["fc.weight"]["codec"]["kind"] == codec
    assert "codec" not in meta["tensors"]["fc.bias"]


def load_file_meta(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return str((f.metadata() or {})["netsurgery.sparse"])


def test_shared_codec_with_few_distinct_values_is_exact(tmp_path: Path) -> None:
    w = torch.zeros(50, 40)
    w[::3, ::2] = torch.tensor([-0.5, 0.25, 1.0, 2.0])[torch.arange(17 * 20) % 4].reshape(17, 20)
    save_sparse(tmp_path / "s.safetensors", {"w": w}, codec="shared", clusters=8)
    assert torch.equal(load_sparse(tmp_path / "s.safetensors")["w"], w)


def test_lossless_files_keep_format_version_1(tmp_path: Path) -> None:
    save_sparse(tmp_path / "p.safetensors", _pruned_weights())
    assert json.loads(load_file_meta(tmp_path / "p.safetensors"))["version"] == 1


def test_bad_codec_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SparseFormatError, match="unknown value codec 'zip'"):
        save_sparse(tmp_path / "x", _pruned_weights(), codec="zip")
    with pytest.raises(SparseFormatError, match="clusters"):
        save_sparse(tmp_path / "x", _pruned_weights(), codec="shared", clusters=1000)


@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 255)), min_size=1, max_size=20),
       st.sampled_from(["int8", "shared"]))  # fmt: skip
@settings(max_examples=100, deadline=None)
def test_corrupted_codec_files_load_or_raise_the_format_error(
    tmp_path_factory: pytest.TempPathFactory, flips: list[tuple[int, int]], codec: str
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "s.safetensors"
    w = torch.zeros(40, 50)
    w[::7, ::3] = torch.linspace(-2, 2, 6 * 17).reshape(6, 17)
    save_sparse(path, {"w": w}, codec=codec, clusters=16)
    raw = bytearray(path.read_bytes())
    for pos, value in flips:
        raw[pos % len(raw)] = value
    path.write_bytes(bytes(raw))
    try:
        back = load_sparse(path)
    except SparseFormatError:
        return
    assert all(isinstance(v, torch.Tensor) for v in back.values())
