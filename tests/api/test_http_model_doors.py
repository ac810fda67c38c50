"""The doors for real models over real HTTP: Hugging Face folders (files or archives), ONNX with its
external data, torchvision/timm names, image-folder and token data; and hostile input at each door,
refused with a clear 4xx and nothing left in storage or the upload folder."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from dns_core import suite
from dns_core.models import LeNet300100
from tests.api.conftest import LiveServer
from tests.api.test_http_uploads import assert_refused, onnx_mlp

Files = list[tuple[str, bytes]]


@pytest.fixture(scope="module")
def bert_files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    folder = suite.write_suite_folder("bert", tmp_path_factory.mktemp("hf") / "bert-tiny")
    return [(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()]


def post(client: httpx.Client, route: str, files: Files, **fields: str) -> httpx.Response:
    """Upload ``files``; always a new entry (duplicate=new): several tests send the same model."""
    parts = [("file", (name, content)) for name, content in files]
    return client.post(route, files=parts, data=fields, params={"duplicate": "new"})


def as_zip(files: Files, root: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, content in files:
            zf.writestr(root + name, content)
    return buf.getvalue()


def as_tar(files: Files, root: str = "", gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, content in files:
            info = tarfile.TarInfo(root + name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def bundle_names(live: LiveServer, model_id: str) -> set[str]:
    stored = list((live.storage_root / "models" / model_id).iterdir())
    assert [p.name for p in stored] == ["model.zip"]
    with zipfile.ZipFile(stored[0]) as zf:
        return set(zf.namelist())


def with_config(files: Files, **changes: object) -> Files:
    out = []
    for name, content in files:
        if name == "config.json":
            config = json.loads(content) | changes
            content = json.dumps({k: v for k, v in config.items() if v is not None}).encode()
        out.append((name, content))
    return out


# -- Hugging Face folders ------------------------------------------------------------------------


def test_hf_folder_as_several_files(live: LiveServer, client: httpx.Client, bert_files: Files) -> None:
    r = post(client, "/v1/models", bert_files)
    assert r.status_code == 201, r.text
    model = r.json()
    assert (model["format"], model["architecture"], model["name"]) == ("hf", "BertForSequenceClassification",
                                                                        "config.json")  # fmt: skip
    assert model["parameter_count"] == sum(p.numel() for p in suite.SUITE["bert"]().parameters())
    assert bundle_names(live, model["id"]) == {name for name, _ in bert_files}
    assert list(live.upload_root.iterdir()) == []


@pytest.mark.parametrize("packing", ["zip", "tar.gz"])
def test_hf_folder_as_an_archive_with_a_top_folder_and_extra_files(
    live: LiveServer, client: httpx.Client, bert_files: Files, packing: str
) -> None:
    extra = [*bert_files, ("README.md", b"# bert"), ("pytorch_model.bin", b"\x80\x04never read")]
    content = as_zip(extra, "bert-tiny/") if packing == "zip" else as_tar(extra, "bert-tiny/")
    r = post(client, "/v1/models", [(f"bert.{packing}", content)], name="bert")
    assert r.status_code == 201, r.text
    assert bundle_names(live, r.json()["id"]) == {name for name, _ in bert_files}  # only what is read


def test_hf_refusals(live: LiveServer, client: httpx.Client, bert_files: Files) -> None:
    before = live.stored_files()
    cases = [
        (with_config(bert_files, auto_map={"AutoModel": "modeling_evil.EvilModel"}), "auto_map"),
        (with_config(bert_files, architectures=["EvilForSequenceClassification"]), "EvilForSequenceClassification"),
        (with_config(bert_files, model_type="evil"), "evil"),
        ([f for f in bert_files if f[0] != "model.safetensors"], "model.safetensors"),
    ]
    for files, word in cases:
        r = post(client, "/v1/models", files)
        assert_refused(live, r, 422, "invalid_file", before, word)


def test_hf_config_too_large_for_the_worker_is_refused_fast(
    live: LiveServer, client: httpx.Client, bert_files: Files
) -> None:
    before = live.stored_files()
    huge = with_config(bert_files, hidden_size=1 << 20, intermediate_size=1 << 22, num_hidden_layers=96,
                       num_attention_heads=1 << 10)  # fmt: skip
    t0 = time.monotonic()
    r = post(client, "/v1/models", huge)
    assert time.monotonic() - t0 < 10
    assert_refused(live, r, 422, "invalid_file", before, "GiB", "allowed")


# -- ONNX with external data ---------------------------------------------------------------------


def onnx_with_data(location: str = "model.onnx.data", offset: int = 0) -> tuple[bytes, bytes]:
    """The 4-8-3 MLP with W1 in a data file beside it (the exporters' default layout)."""
    import onnx
    from onnx import TensorProto

    model = onnx.load_from_string(onnx_mlp())
    w1 = model.graph.initializer[0]
    data = offset * b"\0" + w1.raw_data
    w1.ClearField("raw_data")
    w1.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", "128")):
        entry = w1.external_data.add()
        entry.key, entry.value = key, value
    return model.SerializeToString(), data


@pytest.mark.parametrize("packing", ["files", "zip"])
def test_onnx_with_its_external_data(live: LiveServer, client: httpx.Client, packing: str) -> None:
    graph, data = onnx_with_data(offset=64)
    files = [("model.onnx", graph), ("model.onnx.data", data)]
    r = post(client, "/v1/models", files if packing == "files" else [("mlp.zip", as_zip(files))])
    assert r.status_code == 201, r.text
    assert (r.json()["format"], r.json()["parameter_count"]) == ("onnx", 67)
    assert bundle_names(live, r.json()["id"]) == {"model.onnx", "model.onnx.data"}


def test_onnx_external_data_pointing_elsewhere_is_refused(live: LiveServer, client: httpx.Client) -> None:
    before = live.stored_files()
    for location in ("../../etc/passwd", "/etc/passwd", "sub/../../model.onnx.data"):
        graph, data = onnx_with_data(location)
        r = post(client, "/v1/models", [("model.onnx", graph), ("model.onnx.data", data)])
        assert r.status_code in (415, 422), r.text
        assert_refused(live, r, r.status_code, r.json()["error"], before, location)
    graph, data = onnx_with_data(offset=0)
    r = post(client, "/v1/models", [("model.onnx", graph), ("model.onnx.data", data[:100])])  # offset past the end
    assert_refused(live, r, 422, "invalid_file", before)
    r = post(client, "/v1/models", [("model.onnx", graph)])  # the data file left out
    assert 400 <= r.status_code < 500 and "model.onnx.data" in r.json()["detail"], r.text
    assert live.stored_files() == before


# -- archives ------------------------------------------------------------------------------------


def test_tar_with_links_or_paths_outside_is_refused(live: LiveServer, client: httpx.Client, bert_files: Files) -> None:
    before = live.stored_files()

    def tar_with(info: tarfile.TarInfo) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, content in bert_files:
                entry = tarfile.TarInfo(name)
                entry.size = len(content)
                tf.addfile(entry, io.BytesIO(content))
            tf.addfile(info, io.BytesIO(b"x") if info.isfile() else None)
        return buf.getvalue()

    hostile = []
    link = tarfile.TarInfo("vocab.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hostile.append(link)
    hard = tarfile.TarInfo("tokenizer.json")
    hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/shadow"
    hostile.append(hard)
    for name in ("../escape.txt", "/abs/escape.txt"):
        outside = tarfile.TarInfo(name)
        outside.size = 1
        hostile.append(outside)
    device = tarfile.TarInfo("dev")
    device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
    hostile.append(device)
    for info in hostile:
        r = post(client, "/v1/models", [("m.tar", tar_with(info))])
        assert_refused(live, r, 422, "invalid_file", before, info.name)
    assert not (live.storage_root.parent / "escape.txt").exists()


# -- torchvision and timm by name ----------------------------------------------------------------


def test_named_architectures_are_checked_before_anything_runs(
    live: LiveServer, client: httpx.Client, tmp_path: Path
) -> None:
    before = live.stored_files()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in LeNet300100().state_dict().items()}, str(path))
    weights = [("w.safetensors", path.read_bytes())]
    r = post(client, "/v1/models", weights, architecture="torchvision:evilnet")
    assert_refused(live, r, 422, "invalid_request", before, "evilnet")
    r = post(client, "/v1/models", weights, architecture="timm:not_a_model")
    assert_refused(live, r, 422, "invalid_request", before, "not_a_model")
    for config in ({"weights": "IMAGENET1K_V1"}, {"pretrained": True}, {"norm_layer": "os.system"}):
        r = post(client, "/v1/models", weights, architecture="torchvision:resnet18", config=json.dumps(config))
        assert_refused(live, r, 422, "invalid_request", before, next(iter(config)))
    try:
        import torchvision  # noqa: F401
    except Exception:  # the CPU machines: the door answers what is missing
        r = post(client, "/v1/models", weights, architecture="torchvision:resnet18", config='{"num_classes": 10}')
        assert_refused(live, r, 422, "invalid_request", before, "torchvision is not installed")


# -- data ----------------------------------------------------------------------------------------


def png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(side: int = 60_000) -> bytes:
    """A PNG whose header claims side × side pixels (a few KB on disk)."""
    raw = zlib.compress(b"\0" * (side + 1) * 8, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def jpeg_bomb(side: int = 60_000) -> bytes:
    """A small JPEG whose frame header is patched to claim side × side pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def image_folder(extra: Files = ()) -> bytes:  # type: ignore[assignment]
    files = [(f"{cls}/{i}.png", png(20, 16, colour)) for cls, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200)))
             for i in range(6)]  # fmt: skip
    return as_zip([*files, *extra], "pets/")


def test_image_folder_and_token_data_are_accepted(client: httpx.Client) -> None:
    r = post(client, "/v1/datasets", [("pets.zip", image_folder())])
    assert r.status_code == 201, r.text
    assert (r.json()["kind"], r.json()["n_examples"], r.json()["input_shape"]) == ("images", 12, [3, 16, 20])
    ids = np.random.default_rng(0).integers(1, 100, size=(40, 12))
    buf = io.BytesIO()
    np.savez(buf, input_ids=ids, attention_mask=np.ones_like(ids), labels=ids[:, 0] % 2)
    r = post(client, "/v1/datasets", [("tokens.npz", buf.getvalue())])
    assert r.status_code == 201, r.text
    assert (r.json()["n_examples"], r.json()["input_shape"], r.json()["has_targets"]) == (40, [2, 12], True)


@pytest.mark.parametrize("bomb", ["png", "jpeg"])
def test_image_decompression_bomb_is_refused(live: LiveServer, client: httpx.Client, bomb: str) -> None:
    before = live.stored_files()
    content = png_bomb() if bomb == "png" else jpeg_bomb()
    t0 = time.monotonic()
    r = post(client, "/v1/datasets", [("pets.zip", image_folder([(f"cat/bomb.{bomb}", content)]))])
    assert time.monotonic() - t0 < 10
    assert r.status_code in (413, 422), r.text
    assert_refused(live, r, r.status_code, r.json()["error"], before, "pixels")


# -- layer names, found at upload ----------------------------------------------------------------


def test_the_layer_names_found_at_upload_are_those_a_job_prunes(
    live: LiveServer, client: httpx.Client, bert_files: Files, tmp_path: Path
) -> None:
    """For each door (a Hugging Face folder, ONNX with external data, safetensors weights), the model's
    ``layers`` are the prunable layers of the module a worker loads from the stored file."""
    from dns_core.artifacts import load_model_file
    from dns_core.io import save_model
    from dns_core.surgery import prunable_layers

    weights = tmp_path / "lenet.safetensors"
    save_model(weights, LeNet300100(), "lenet-300-100")
    graph, data = onnx_with_data()
    uploads = [
        post(client, "/v1/models", bert_files),
        post(client, "/v1/models", [("model.onnx", graph), ("model.onnx.data", data)]),
        post(client, "/v1/models", [("lenet.safetensors", weights.read_bytes())]),
    ]
    for r in uploads:
        assert r.status_code == 201, r.text
        model = r.json()
        assert client.get(f"/v1/models/{model['id']}").json()["layers"] == model["layers"]
        (stored,) = list((live.storage_root / "models" / model["id"]).iterdir())
        loaded = load_model_file(stored, model["architecture"] if model["format"] == "safetensors" else None,
                                 model["config"] or {})  # fmt: skip
        assert model["layers"] == [name for name, _ in prunable_layers(loaded.module)], model["format"]
    bert, _, lenet = (r.json()["layers"] for r in uploads)
    assert lenet == ["fc1", "fc2", "fc3"]
    assert any(name.endswith("attention.self.query") for name in bert) and all(n.startswith("model.") for n in bert)
