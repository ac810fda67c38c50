"""Data beyond 1×28×28: archives unpacked safely, class folders of images, token data, the preprocess
setting, and the built-in set adapted to any model's input."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from dns_core import data as data_mod
from dns_core.archives import archive_kind, common_root, extract_archive
from dns_core.data import (
    BatchStream,
    DataError,
    Dataset,
    adapt_builtin,
    adapt_images,
    check_fits,
    load_builtin,
    load_data_file,
    load_fashion_mnist,
    load_fashion_mnist_raw,
    load_image_folder,
    token_grid,
    tokens_from_images,
    validation_split,
)
from dns_core.defaults import SETTING_KEYS
from dns_core.errors import ConfigError
from dns_core.images import Preprocess, read_image_folder
from dns_core.inputs import ModelInput
from dns_core.spec import CompressSpec
from dns_core.train import TrainConfig, fit
from dns_core.uploads import FileTooLarge, InvalidFile, RefusedFormat, UploadError, sniff
from tests.dns_core.test_uploads import corrupt

# --------------------------------------------------------------------------------------------------
# archives


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:  # type: ignore[call-overload]
        for info, payload in members:
            if payload is not None:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                tf.addfile(info)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in fields.items():
        setattr(info, k, v)
    return info


def _files(root: str = "") -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [
        (_member(f"{root}a", tarfile.DIRTYPE), None),
        (_member(f"{root}a/x.txt"), b"hello"),
        (_member(f"{root}b.txt"), b"world"),
    ]


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_tar_round_trip(tmp_path: Path, mode: str) -> None:
    path = _tar(tmp_path / "t.tar", _files("./pack/"), mode)
    assert archive_kind(path) == "tar"
    assert sniff(path).kind == "tar" and sniff(path).gzipped == (mode == "w:gz")
    dest = tmp_path / "out"
    dest.mkdir()
    names = extract_archive(path, dest)
    assert names == ["pack/a/x.txt", "pack/b.txt"]
    assert (dest / "pack/a/x.txt").read_bytes() == b"hello"
    assert common_root(names) == "pack"
    assert common_root(["a.txt", "pack/b"]) is None and common_root(["x/a", "y/b"]) is None


def test_zip_round_trip_and_sniff(tmp_path: Path) -> None:
    path = tmp_path / "z.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("m/", b"")
        zf.writestr("m/config.json", b"{}")
        zf.writestr("m/vocab.txt", b"a\n" * 1000)
    assert archive_kind(path) == "zip" and sniff(path).kind == "zip"
    dest = tmp_path / "out"
    dest.mkdir()
    assert extract_archive(path, dest) == ["m/config.json", "m/vocab.txt"]
    assert archive_kind(tmp_path / "out/m/config.json") is None


def test_a_tar_whose_first_name_starts_like_a_pickle_is_a_tar(tmp_path: Path) -> None:
    path = _tar(tmp_path / "t", [(_member("cats/1.txt"), b"x")])  # "c" is a protocol-0 pickle opcode
    assert sniff(path).kind == "tar"


def test_gzip_pickles_and_torch_zips_are_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.gz"
    path.write_bytes(gzip.compress(pickle.dumps({"a": 1}, protocol=4)))
    with pytest.raises(RefusedFormat, match="pickle"):
        sniff(path)
    path = tmp_path / "w.zip"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(RefusedFormat, match=r"torch\.save"):
        sniff(path)
    (tmp_path / "other.gz").write_bytes(gzip.compress(b"just text, not a tar"))
    with pytest.raises(RefusedFormat, match="neither IDX data nor a tar"):
        sniff(tmp_path / "other.gz")


def _refused(path: Path, error: type[Exception], match: str, **caps: float) -> None:
    dest = path.parent / f"dest-{path.name}"
    dest.mkdir()
    with pytest.raises(error, match=match):
        extract_archive(path, dest, **caps)  # type: ignore[arg-type]
    outside = {p.name for p in path.parent.parent.iterdir()}
    assert "escape.txt" not in outside and "pwned" not in outside


@pytest.mark.parametrize(
    ("member", "payload", "match"),
    [
        (_member("link", tarfile.SYMTYPE, linkname="/etc/passwd"), None, "symbolic link"),
        (_member("hard", tarfile.LNKTYPE, linkname="a/x.txt"), None, "hard link"),
        (_member("../escape.txt"), b"x", r"outside the archive"),
        (_member("a/../../escape.txt"), b"x", r"outside the archive"),
        (_member("/tmp/pwned"), b"x", "absolute"),
        (_member("C:/pwned"), b"x", "absolute"),
        (_member("a\\..\\pwned"), b"x", "backslash"),
        (_member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3), None, "character device"),
        (_member("blk", tarfile.BLKTYPE, devmajor=8, devminor=0), None, "block device"),
        (_member("fifo", tarfile.FIFOTYPE), None, "fifo"),
        (_member("b.txt"), b"again", "appears twice"),
        (_member("a/x.txt/inner"), b"x", "lies under the file"),
    ],
)
def test_hostile_tar_members_are_refused(
    tmp_path: Path, member: tarfile.TarInfo, payload: bytes | None, match: str
) -> None:
    path = _tar(tmp_path / "t.tar", [*_files(), (member, payload)])
    _refused(path, InvalidFile, match)


def test_tar_caps(tmp_path: Path) -> None:
    many = _tar(tmp_path / "many.tar", [(_member(f"f{i}"), b"x") for i in range(30)])
    _refused(many, FileTooLarge, "more than the 20 entries", max_entries=20)
    big = _tar(tmp_path / "big.tar", [(_member("a"), bytes(5000)), (_member("b"), bytes(5000))])
    _refused(big, FileTooLarge, "expands past the 8,000-byte limit", max_expanded=8000)
    bomb = _tar(tmp_path / "bomb.tgz", [(_member("zeros"), bytes(4 * 1024 * 1024))], "w:gz")
    assert bomb.stat().st_size < 20_000
    _refused(bomb, FileTooLarge, "compression bomb")


def _zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, payload in entries:
            zf.writestr(info, payload)
    return path


def _zipinfo(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (_zipinfo("link", 0o120777), "symbolic link"),
        (_zipinfo("fifo", 0o010644), "fifo"),
        (_zipinfo("dev", 0o020644), "character device"),
        ("../escape.txt", "outside the archive"),
        ("/abs.txt", "absolute"),
        ("C:\\pwned", "backslash"),
        ("D:pwned", "absolute"),
        ("ok/a.txt", "appears twice"),
    ],
)
def test_hostile_zip_entries_are_refused(tmp_path: Path, entry: zipfile.ZipInfo | str, match: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        path = _zip(tmp_path / "z.zip", [("ok/a.txt", b"fine"), (entry, b"payload")])
    _refused(path, InvalidFile, match)


def test_encrypted_zip_entries_are_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "z.zip", [("secret.txt", b"payload")])
    raw = bytearray(path.read_bytes())
    # set bit 0 (encrypted) of the general-purpose flags in the local and the central header
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    raw[local + 6] |= 1
    raw[central + 8] |= 1
    path.write_bytes(bytes(raw))
    _refused(path, InvalidFile, "encrypted")


def test_zip_caps(tmp_path: Path) -> None:
    bomb = _zip(tmp_path / "bomb.zip", [("zeros.bin", bytes(5 * 1024 * 1024))])
    _refused(bomb, FileTooLarge, r"expands \d+ times")
    many = _zip(tmp_path / "many.zip", [(f"f{i}", b"x") for i in range(30)])
    _refused(many, FileTooLarge, "30 entries", max_entries=20)
    big = _zip(tmp_path / "big.zip", [("a", np.random.default_rng(0).bytes(6000))])
    _refused(big, FileTooLarge, "expands to 6,000 bytes, more than the 5,000-byte limit", max_expanded=5000)
    # small text files compress far more than 200x without being bombs
    ok = _zip(tmp_path / "ok.zip", [("vocab.txt", b"\n" * 100_000)])
    dest = tmp_path / "ok"
    dest.mkdir()
    assert extract_archive(ok, dest) == ["vocab.txt"]


def test_extract_needs_an_empty_folder_and_an_archive(tmp_path: Path) -> None:
    path = _zip(tmp_path / "z.zip", [("a", b"x")])
    with pytest.raises(ValueError, match="empty folder"):
        extract_archive(path, tmp_path)
    (tmp_path / "plain").write_bytes(b"not an archive")
    (tmp_path / "d").mkdir()
    with pytest.raises(InvalidFile, match="not a zip or tar"):
        extract_archive(tmp_path / "plain", tmp_path / "d")


# --------------------------------------------------------------------------------------------------
# class folders of images


def _png(size: tuple[int, int] = (6, 4), mode: str = "RGB", color: object = (255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")  # type: ignore[arg-type]
    return buf.getvalue()


def _jpeg(size: tuple[int, int] = (6, 4), color: object = (0, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95)  # type: ignore[arg-type]
    return buf.getvalue()


def _image_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in files.items():
            zf.writestr(name, payload)
    return path


def test_image_folder_from_a_zip(tmp_path: Path) -> None:
    path = _image_zip(
        tmp_path / "pets.zip",
        {
            "pets/README.md": b"my pets",
            "pets/dog/1.jpg": _jpeg(),
            "pets/cat/a.png": _png(),
            "pets/cat/b.PNG": _png(mode="L", color=128),
            "pets/cat/c.png": _png((12, 8), mode="RGBA", color=(0, 255, 0, 0)),
            "pets/cat/.DS_Store": b"\0junk",
            "__MACOSX/pets/cat/._a.png": b"junk",
        },
    )
    ds, classes = load_image_folder(path)
    assert classes == ["cat", "dog"]
    assert ds.inputs.shape == (4, 3, 4, 6) and ds.inputs.dtype == torch.float32  # the most common size: 6×4
    assert ds.targets is not None and ds.targets.tolist() == [0, 0, 0, 1]
    assert float(ds.inputs.min()) >= 0.0 and float(ds.inputs.max()) <= 1.0
    assert torch.allclose(ds.inputs[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))  # red
    assert torch.allclose(ds.inputs[1, :, 0, 0], torch.full((3,), 128 / 255))  # grey to RGB
    assert torch.allclose(ds.inputs[2, :, 1, 1], torch.tensor([0.0, 1.0, 0.0]), atol=1e-3)  # resized, alpha dropped
    assert float(ds.inputs[3, 2].mean()) > 0.9 and float(ds.inputs[3, 0].mean()) < 0.1  # blue JPEG
    sized, _ = load_image_folder(path, size=(5, 7))
    assert sized.inputs.shape == (4, 3, 5, 7)
    assert load_data_file(path).inputs.shape == (4, 3, 4, 6)


def test_image_folder_from_a_tar_and_a_folder(tmp_path: Path) -> None:
    members = [(_member(f"{c}/{i}.png"), _png(color=(i * 40, 0, 0))) for c in ("b", "a") for i in range(3)]
    path = _tar(tmp_path / "imgs.tgz", members, "w:gz")  # type: ignore[arg-type]
    ds = load_data_file(path)
    assert ds.inputs.shape == (6, 3, 4, 6) and ds.targets is not None and ds.targets.tolist() == [0, 0, 0, 1, 1, 1]
    folder = tmp_path / "folder"
    for c in ("x", "y"):
        (folder / c).mkdir(parents=True)
        (folder / c / "1.png").write_bytes(_png())
    x, _, classes = read_image_folder(folder)
    assert classes == ["x", "y"] and x.shape == (2, 3, 4, 6)


@pytest.mark.parametrize(
    ("files", "error", "match"),
    [
        ({"cat/1.png": _png()}, DataError, r"one class folder \('cat'\)"),
        ({"cat/1.png": _png(), "dog/notes.txt": b"hi"}, DataError, "dog/notes.txt is not a PNG or JPEG"),
        ({"cat/1.png": _png(), "dog/2.png": _png(), "3.png": _png()}, DataError, "beside the class folders"),
        ({"cat/1.png": _png(), "dog/old/2.png": _png()}, DataError, "inside the class folder 'dog'"),
        ({"config.json": b"{}", "model.safetensors": b"x"}, DataError, "holds no PNG or JPEG"),
        ({"cat/a.txt": b"{}", "dog/b.png": _png()}, DataError, "cat/a.txt is not a PNG"),
        ({"cat/1.png": _png(), "dog/2.png": b"GIF89a not really"}, InvalidFile, "dog/2.png is not a readable"),
        ({"cat/1.png": _png(), "dog/2.jpg": _jpeg()[:40]}, InvalidFile, "dog/2.jpg"),
    ],
)
def test_bad_image_folders(tmp_path: Path, files: dict[str, bytes], error: type[Exception], match: str) -> None:
    path = _image_zip(tmp_path / "d.zip", files)
    with pytest.raises(error, match=match):
        load_data_file(path)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR (CRC fixed) claims ``width``×``height`` pixels."""
    raw = bytearray(_png((1, 1)))
    start = raw.find(b"IHDR")
    raw[start + 4 : start + 12] = struct.pack(">II", width, height)
    raw[start + 17 : start + 21] = struct.pack(">I", zlib.crc32(bytes(raw[start : start + 17])))
    return bytes(raw)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A tiny real JPEG whose frame header (SOF0) claims ``width``×``height`` pixels."""
    raw = bytearray(_jpeg((8, 8)))
    sof = raw.find(b"\xff\xc0")
    raw[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


@pytest.mark.parametrize(
    "bomb",
    [_png_claiming(50_000, 50_000), _jpeg_claiming(50_000, 50_000), _png_claiming(5_000, 5_000)],
    ids=["png-50000", "jpeg-50000", "png-5000"],
)
def test_decompression_bombs_are_refused_from_the_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bomb: bytes
) -> None:
    assert len(bomb) < 1000
    with monkeypatch.context() as m:
        m.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(io.BytesIO(bomb)) as im:  # the header really claims it
            assert im.size[0] * im.size[1] >= 25_000_000
    path = _image_zip(tmp_path / "bomb.zip", {"cat/1.png": _png(), "dog/bomb.png": bomb})
    before = Image.MAX_IMAGE_PIXELS
    began = time.perf_counter()
    with pytest.raises(FileTooLarge, match=r"dog/bomb\.png .*1,000,000 allowed per image"):
        load_image_folder(path, max_pixels_per_image=1_000_000)
    assert time.perf_counter() - began < 2.0
    assert before == Image.MAX_IMAGE_PIXELS  # the process-wide guard is restored


def test_pixel_caps(tmp_path: Path) -> None:
    big = io.BytesIO()
    Image.new("L", (1500, 1000)).save(big, "PNG")  # a real blank image: 1.5 M pixels in a few KB
    path = _image_zip(tmp_path / "d.zip", {"cat/1.png": big.getvalue(), "dog/2.png": _png()})
    with pytest.raises(FileTooLarge, match=r"cat/1.png .*1,000,000 allowed per image"):
        load_image_folder(path, max_pixels_per_image=1_000_000)
    many = _image_zip(tmp_path / "m.zip", {f"{c}/{i}.png": _png((10, 10)) for c in "ab" for i in range(5)})
    with pytest.raises(FileTooLarge, match="more than 550 pixels in all"):
        load_image_folder(many, max_total_pixels=550)
    with pytest.raises(FileTooLarge, match="images at 3×1000×1000"):
        read_image_folder(many, size=1000, max_output_bytes=10**8)


def test_sixteen_bit_grey_is_scaled(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 6), 32768, dtype=np.uint16)).save(buf, "PNG")
    path = _image_zip(tmp_path / "d.zip", {"a/1.png": buf.getvalue(), "b/2.png": _png()})
    ds, _ = load_image_folder(path)
    assert abs(float(ds.inputs[0].mean()) - 0.5) < 0.01


# --------------------------------------------------------------------------------------------------
# token data and image tensors


def test_token_data_from_npz_and_safetensors(tmp_path: Path) -> None:
    ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]], dtype=np.int32)
    mask = (ids > 0).astype(np.int64)
    labels = np.array([1, 0, 1])
    np.savez(tmp_path / "t.npz", input_ids=ids, attention_mask=mask, labels=labels)
    ds = load_data_file(tmp_path / "t.npz")
    assert ds.is_tokens and ds.inputs.dtype == torch.int64 and ds.inputs.shape == (3, 2, 4)
    assert ds.inputs[:, 0].tolist() == ids.tolist() and ds.inputs[:, 1].tolist() == mask.tolist()
    assert ds.targets is not None and ds.targets.tolist() == [1, 0, 1]
    save_file({"input_ids": torch.from_numpy(ids).long(), "targets": torch.tensor([0, 1, 2])},
              str(tmp_path / "t.safetensors"))  # fmt: skip
    ds = load_data_file(tmp_path / "t.safetensors")
    assert ds.is_tokens and bool((ds.inputs[:, 1] == 1).all())
    assert not Dataset(torch.zeros(3, 2, 4)).is_tokens


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"input_ids": np.array([[1, -2]]), "labels": np.array([0])}, "non-negative"),
        ({"input_ids": np.array([[1.0, 2.0]]), "labels": np.array([0])}, "input_ids must be an integer"),
        ({"input_ids": np.zeros((2, 0), np.int64), "labels": np.zeros(2, np.int64)}, "neither empty"),
        ({"input_ids": np.array([1, 2])}, r"\(examples, sequence length\)"),
        ({"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.full((2, 3), 2)}, "only 0 and 1"),
        ({"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.ones((2, 4), np.int64)}, "must agree"),
        ({"input_ids": np.ones((2, 3), np.int64), "attention_mask": np.array([[1, 1, 0], [0, 0, 0]])},
         "no token in their attention_mask"),
        ({"input_ids": np.ones((2, 3), np.int64), "labels": np.zeros(3, np.int64)}, "2 inputs but 3 targets"),
        ({"input_ids": np.ones((2, 3), np.int64), "labels": np.zeros(2), "targets": np.zeros(2)}, "not both"),
        ({"input_ids": np.ones((2, 3), np.int64), "token_type_ids": np.zeros((2, 3))}, "found also token_type_ids"),
    ],
)  # fmt: skip
def test_bad_token_data(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    np.savez(tmp_path / "t.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=match):
        load_data_file(tmp_path / "t.npz")


class _TokenModel(nn.Module):
    def __init__(self, vocab: int = 20, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.int64 and x.dim() == 3  # ids and mask, never cast to float
        ids, mask = x[:, 0], x[:, 1].unsqueeze(-1).float()
        out: torch.Tensor = self.head((self.embed(ids) * mask).sum(1) / mask.sum(1))
        return out


def test_token_inputs_flow_through_training_unchanged() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 20, (64, 6), generator=g)
    data = Dataset(torch.stack([ids, torch.ones_like(ids)], 1), ids[:, 0] % 3)
    train, valid = validation_split(data, fraction=0.25)
    x, _ = BatchStream(train, 8).batch(3)
    assert x.dtype == torch.int64 and x.shape == (8, 2, 6)
    model = _TokenModel()
    assert check_fits(model, valid) == 3
    fit(model, train, TrainConfig(iterations=5, batch_size=8, device="cpu", eval_every=2, log_every=2), valid=valid)
    with pytest.raises(DataError, match="token ids go up to 19 but the model's vocabulary has 10"):
        check_fits(_TokenModel(vocab=10), data)
    with pytest.raises(DataError, match="the model takes image"):
        check_fits(model, data, ModelInput("image", (3, 8, 8)))


def test_image_tensors_uint8_and_float(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "u.npz", inputs=x, targets=np.arange(5))
    ds = load_data_file(tmp_path / "u.npz")
    assert ds.inputs.dtype == torch.float32 and ds.inputs.shape == (5, 3, 8, 8)
    assert torch.allclose(ds.inputs, torch.from_numpy(x).float() / 255)
    f = np.random.default_rng(1).random((5, 3, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "f.npz", inputs=f, targets=np.arange(5))
    assert torch.equal(load_data_file(tmp_path / "f.npz").inputs, torch.from_numpy(f))


# --------------------------------------------------------------------------------------------------
# the preprocess setting


def test_preprocess_from_json_is_strict() -> None:
    p = Preprocess.from_json({"resize": 36, "crop": 32, "mean": [0.5, 0.4, 0.3], "std": "model", "channels": 3})
    assert p.mean == (0.5, 0.4, 0.3) and p.std == "model"
    assert Preprocess.from_json(p.to_json()) == p
    for bad, match in [
        ({"size": 3}, "unknown key"),
        ({"resize": 0}, "from 1 to 4096"),
        ({"crop": 5000}, "from 1 to 4096"),
        ({"crop": 2.5}, "whole number"),
        ({"resize": True}, "whole number"),
        ({"mean": [0.1] * 5}, "1 to 4 numbers"),
        ({"mean": "imagenet"}, "1 to 4 numbers"),
        ({"std": [0.0]}, "positive"),
        ({"mean": [float("nan")]}, "finite"),
        ({"channels": 2}, "1 or 3"),
        ({"channels": 1, "mean": [0.1, 0.2, 0.3]}, "3 values for 1 channels"),
        ([1, 2], "JSON object"),
    ]:
        with pytest.raises(ConfigError, match=match):
            Preprocess.from_json(bad)


def test_preprocess_resolve_and_apply() -> None:
    x = torch.rand(5, 1, 40, 60)
    ds = Dataset(x, torch.arange(5))
    p = Preprocess.from_json({"channels": 3, "resize": 20, "crop": 16, "mean": "model", "std": [0.5]})
    with pytest.raises(ConfigError, match="resolved"):
        p.apply(ds)
    with pytest.raises(ConfigError, match="give no mean"):
        p.resolve(ModelInput("image", (3, 16, 16)))
    r = p.resolve(ModelInput("image", (3, 16, 16), mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0)))
    assert r.mean == (0.1, 0.2, 0.3) and r.std == (0.5,)
    out = r.apply(ds)
    assert out.inputs.shape == (5, 3, 16, 16) and out.targets is ds.targets
    plain = Preprocess(channels=3, resize=20, crop=16).apply(ds).inputs
    assert torch.allclose(out.inputs[:, 1], (plain[:, 1] - 0.2) / 0.5)
    assert Preprocess(resize=20).output_shape(3, 40, 60) == (3, 20, 30)
    assert Preprocess(resize=20).output_shape(3, 60, 40) == (3, 30, 20)
    assert Preprocess(channels=1).apply(Dataset(torch.rand(2, 3, 4, 4))).inputs.shape == (2, 1, 4, 4)
    with pytest.raises(ConfigError, match="larger than the images"):
        Preprocess(crop=50).apply(ds)
    with pytest.raises(ConfigError, match="already normalised"):
        Preprocess(resize=10).apply(Dataset(x - 0.5))
    with pytest.raises(ConfigError, match="applies to images"):
        Preprocess(resize=10).apply(Dataset(torch.ones(2, 2, 5, dtype=torch.int64)))
    with pytest.raises(ConfigError, match="more than the 100 allowed"):
        Preprocess(resize=10).apply(ds, max_bytes=100)


def test_preprocess_is_a_job_setting() -> None:
    assert "preprocess" in SETTING_KEYS
    spec = CompressSpec.from_json({"settings": {"preprocess": {"resize": 256, "crop": 224, "mean": "model"}}})
    assert spec.preprocess == {"resize": 256, "crop": 224, "mean": "model"}
    assert CompressSpec().preprocess is None
    with pytest.raises(ConfigError, match="unknown key"):
        CompressSpec.from_json({"settings": {"preprocess": {"rotate": 90}}})
    with pytest.raises(ConfigError, match="JSON object"):
        CompressSpec(preprocess="resize")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# the built-in set adapted to any model


def _idx(path: Path, a: np.ndarray) -> None:
    head = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
    path.write_bytes(head + a.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in Fashion-MNIST (5,100 train and 200 test random images) in the package's layout."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5100), ("t10k", 200)):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    monkeypatch.setenv("NETSURGERY_FASHION_MNIST", str(tmp_path))
    return tmp_path


def test_raw_and_normalised_fashion_agree(fake_fashion: Path) -> None:
    raw, norm = load_fashion_mnist_raw("test"), load_fashion_mnist("test")
    assert float(raw.inputs.min()) >= 0 and float(raw.inputs.max()) <= 1
    assert torch.equal((raw.inputs - data_mod.FASHION_MEAN) / data_mod.FASHION_STD, norm.inputs)
    with pytest.raises(DataError, match="unknown Fashion-MNIST split"):
        load_fashion_mnist_raw("valid")


def test_adapt_builtin_keeps_todays_data_for_28x28(fake_fashion: Path) -> None:
    today = load_builtin("fashion-mnist")
    for model_input in (None, ModelInput("image", (1, 28, 28))):
        train, valid, test = adapt_builtin("fashion-mnist", model_input)
        assert test is not None and today[2] is not None
        assert torch.equal(train.inputs, today[0].inputs) and torch.equal(valid.inputs, today[1].inputs)
        assert torch.equal(test.inputs, today[2].inputs)


def test_adapt_builtin_to_other_images(fake_fashion: Path) -> None:
    train, valid, test = adapt_builtin("fashion-mnist", ModelInput("image", (3, 32, 32), mean=(0.5,) * 3,
                                                                   std=(0.25,) * 3))  # fmt: skip
    assert (len(train), len(valid)) == (100, 5000) and test is not None and len(test) == 200
    assert train.inputs.shape == (100, 3, 32, 32) and torch.equal(train.inputs[:, 0], train.inputs[:, 2])
    assert float(train.inputs.min()) >= -2.0 - 1e-5 and float(train.inputs.max()) <= 2.0 + 1e-5
    # no model statistics: the set's own
    train, _, _ = adapt_builtin("fashion-mnist", ModelInput("image", (1, 14, 14)), max_examples=10)
    assert train.inputs.shape == (10, 1, 14, 14)
    uniform_mean = (0.5 - data_mod.FASHION_MEAN) / data_mod.FASHION_STD  # the fake images are uniform noise
    assert float(train.inputs.mean()) == pytest.approx(uniform_mean, abs=0.05)


def test_adapt_builtin_caps_large_inputs(fake_fashion: Path) -> None:
    cap = 50 * 1024**2
    train, valid, test = adapt_builtin("fashion-mnist", ModelInput("image", (3, 224, 224)), max_bytes=cap)
    assert test is not None and train.inputs.shape[1:] == (3, 224, 224)
    assert sum(d.inputs.numel() * 4 for d in (train, valid, test)) <= cap
    assert min(len(train), len(valid), len(test)) >= 1 and len(valid) < 5000
    assert train.targets is not None and len(train.targets) == len(train)
    # the default cap: 60,000 + 10,000 examples at 3×224×224 would be 42 GB; the cut keeps 2 GiB
    per = 3 * 224 * 224 * 4
    assert data_mod.BUILTIN_MAX_BYTES // per < 4000


def test_adapt_builtin_to_tokens_and_features(fake_fashion: Path) -> None:
    train, _, test = adapt_builtin("fashion-mnist", ModelInput("tokens", (16,), vocab_size=1000), max_examples=50)
    assert train.is_tokens and train.inputs.shape == (50, 2, 16) and test is not None and test.is_tokens
    ids = train.inputs[:, 0]
    assert int(ids.min()) >= 1 and int(ids.max()) <= 256 and bool((train.inputs[:, 1] == 1).all())
    small, _, _ = adapt_builtin("fashion-mnist", ModelInput("tokens", (10,), vocab_size=5), max_examples=5)
    assert int(small.inputs[:, 0].max()) <= 4 and small.inputs.shape == (5, 2, 10)
    assert small.inputs[:, 1].tolist()[0] == [1] * 9 + [0]  # 10 tokens: a 3×3 grid and one padding
    feats, _, _ = adapt_builtin("fashion-mnist", ModelInput("features", (784,)), max_examples=5)
    assert feats.inputs.shape == (5, 784) and feats.inputs.dtype == torch.float32
    with pytest.raises(DataError, match="not a square"):
        adapt_builtin("fashion-mnist", ModelInput("features", (99,)))
    with pytest.raises(DataError, match="vocabulary size is unknown"):
        adapt_builtin("fashion-mnist", ModelInput("tokens", (16,)))
    with pytest.raises(DataError, match="unknown built-in"):
        adapt_builtin("cifar", ModelInput("image", (3, 32, 32)))


def test_token_grid_and_tokens_from_images() -> None:
    assert token_grid(16) == (4, 4) and token_grid(128) == (8, 16) and token_grid(512) == (16, 32)
    assert token_grid(17) == (4, 4) and token_grid(1) == (1, 1)
    x = torch.zeros(2, 1, 8, 8)
    x[1] = 1.0
    t = tokens_from_images(Dataset(x), 4, 3)
    assert t.inputs[0, 0].tolist() == [1] * 4 and t.inputs[1, 0].tolist() == [2] * 4
    with pytest.raises(DataError, match="too small"):
        tokens_from_images(Dataset(x), 4, 2)
    with pytest.raises(DataError, match="already normalised"):
        tokens_from_images(Dataset(x - 1), 4, 100)


def test_adapt_images_channels_and_stats() -> None:
    x = torch.rand(3, 3, 10, 10)
    grey = adapt_images(Dataset(x), 1, 5, 5).inputs
    assert grey.shape == (3, 1, 5, 5)
    norm = adapt_images(Dataset(x), 3, 10, 10, mean=(0.5,), std=(0.5, 0.5, 0.5)).inputs
    assert torch.allclose(norm, (x - 0.5) / 0.5)
    with pytest.raises(DataError, match="2 values for 3 channels"):
        adapt_images(Dataset(x), 3, 4, 4, mean=(0.1, 0.2))


def test_model_archives_are_not_data(tmp_path: Path) -> None:
    path = _image_zip(tmp_path / "bert.zip", {"bert/config.json": b"{}", "bert/model.safetensors": b"x"})
    with pytest.raises(DataError, match="holds no PNG or JPEG images"):
        load_data_file(path)
    with pytest.raises(UploadError):
        load_data_file(_image_zip(tmp_path / "evil.zip", {"../x/1.png": _png(), "y/2.png": _png()}))


# --------------------------------------------------------------------------------------------------
# fuzzing: damaged archives and images raise our errors only


def _image_archives(tmp_path: Path) -> list[Path]:
    files = {"pets/cat/1.png": _png(), "pets/dog/2.jpg": _jpeg(), "pets/dog/3.png": _png(mode="L", color=9)}
    members = [(_member(name), payload) for name, payload in files.items()]
    return [
        _image_zip(tmp_path / "d.zip", files),
        _tar(tmp_path / "d.tgz", members, "w:gz"),  # type: ignore[arg-type]
        _tar(tmp_path / "d.tar", members),  # type: ignore[arg-type]
    ]


@given(st.integers(0, 2), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_damaged_image_archives_load_or_raise_our_errors(
    tmp_path: Path, which: int, flips: list[tuple[int, int]]
) -> None:
    path = corrupt(_image_archives(tmp_path)[which], flips)
    try:
        ds = load_data_file(path)
    except (UploadError, DataError):
        return
    assert ds.inputs.dtype == torch.float32 and ds.inputs.dim() == 4
