"""Uploads over real HTTP: models and data sets accepted by content, hostile or broken files refused with
the right 4xx and nothing left behind, bodies over the cap cut off (declared, lying and chunked)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import pickle
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file
from torch import nn

from dns_core.io import save_model
from dns_core.models import LeNet300100
from tests.api.conftest import HTTP_MAX_UPLOAD, LiveServer

# -- files ---------------------------------------------------------------------------------------


def onnx_mlp(external: bool = False) -> bytes:
    """A 4-8-3 MLP (Gemm, Relu, Gemm): 67 float parameters. ``external``: W1 points to a weights file."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W1"),
        numpy_helper.from_array(np.zeros(8, np.float32), "B1"),
        numpy_helper.from_array(rng.standard_normal((3, 8)).astype(np.float32), "W2"),
        numpy_helper.from_array(np.zeros(3, np.float32), "B2"),
    ]
    if external:
        w1 = inits[0]
        w1.ClearField("raw_data")
        w1.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", "128")):
            entry = w1.external_data.add()
            entry.key, entry.value = key, value
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2", "B2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


class _MkdirOnLoad:
    """Pickles to "call os.mkdir(path)": loading the pickle would create ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.path,))


def lenet_safetensors(tmp_path: Path) -> bytes:
    path = tmp_path / "lenet.safetensors"
    torch.manual_seed(0)
    save_model(path, LeNet300100(), "lenet-300-100")
    return path.read_bytes()


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, tmp_path: Path) -> bytes:
    path = tmp_path / "weights.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path.read_bytes()


def npz_bytes(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def idx_bytes(array: np.ndarray) -> bytes:
    assert array.dtype == np.uint8
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


# -- helpers -------------------------------------------------------------------------------------


def upload(
    client: httpx.Client,
    path: str,
    content: bytes,
    filename: str = "upload.bin",
    *,
    duplicate: str | None = None,
    **fields: str,
) -> httpx.Response:
    params = {"duplicate": duplicate} if duplicate else None
    return client.post(path, files={"file": (filename, content)}, data=fields, params=params)


def assert_refused(
    live: LiveServer, response: httpx.Response, status: int, code: str, before: set[Path], *words: str
) -> None:
    """The response is the given error, and the upload left nothing in storage or the upload folder."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    for word in words:
        assert word in body["detail"], body["detail"]
    assert live.stored_files() == before
    assert list(live.upload_root.iterdir()) == []


def stored_blob(live: LiveServer, model: dict[str, Any]) -> bytes:
    paths = list((live.storage_root / "models" / str(model["id"])).iterdir())
    assert len(paths) == 1
    return paths[0].read_bytes()


# -- models: accepted ----------------------------------------------------------------------------


def test_upload_zoo_safetensors(live: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    content = lenet_safetensors(tmp_path)
    r = upload(client, "/v1/models", content, "lenet.safetensors")
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["format"] == "safetensors" and model["architecture"] == "lenet-300-100"
    assert model["name"] == "lenet.safetensors" and model["config"] == {}
    assert model["parameter_count"] == 266_610
    assert model["size_bytes"] == len(content)
    assert model["sha256"] == hashlib.sha256(content).hexdigest()
    assert r.headers["location"] == f"/v1/models/{model['id']}"
    assert stored_blob(live, model) == content
    assert list(live.upload_root.iterdir()) == []

    got = client.get(f"/v1/models/{model['id']}")
    assert got.status_code == 200 and got.json() == model


def test_upload_safetensors_with_architecture_and_config_fields(client: httpx.Client, tmp_path: Path) -> None:
    small = LeNet300100(in_features=64, num_classes=10)
    content = safetensors_bytes({k: v.contiguous() for k, v in small.state_dict().items()}, None, tmp_path)
    r = upload(
        client, "/v1/models", content, architecture="lenet-300-100", config=json.dumps({"in_features": 64}), name="m"
    )
    assert r.status_code == 201, r.text
    assert r.json()["parameter_count"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert r.json()["config"] == {"in_features": 64} and r.json()["name"] == "m"


def test_upload_onnx(live: LiveServer, client: httpx.Client) -> None:
    content = onnx_mlp()
    r = upload(client, "/v1/models", content, "mlp.onnx", name="my mlp")
    assert r.status_code == 201, r.text
    model = r.json()
    assert (model["format"], model["architecture"], model["name"]) == ("onnx", None, "my mlp")
    assert model["parameter_count"] == 8 * 4 + 8 + 3 * 8 + 3
    assert (model["size_bytes"], model["sha256"]) == (len(content), hashlib.sha256(content).hexdigest())
    assert stored_blob(live, model) == content
    assert (live.storage_root / "models" / model["id"] / "model.onnx").is_file()


# -- models: refused -----------------------------------------------------------------------------


def test_pickle_is_refused_and_never_unpickled(live: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    before = live.stored_files()
    for protocol in (0, 2, 4):
        payload = pickle.dumps(_MkdirOnLoad(str(sentinel)), protocol=protocol)
        r = upload(client, "/v1/models", payload, "model.pkl")
        assert_refused(live, r, 415, "unsupported_format", before, "pickle")
        r = upload(client, "/v1/datasets", payload, "data.pkl")
        assert_refused(live, r, 415, "unsupported_format", before, "pickle")
    assert not sentinel.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")
def test_torch_formats_are_refused(live: LiveServer, client: httpx.Client) -> None:
    before = live.stored_files()
    saved = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, saved)
    scripted = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), scripted)
    for content, word in ((saved.getvalue(), "torch.save"), (scripted.getvalue(), "TorchScript")):
        r = upload(client, "/v1/models", content, "model.pt")
        assert_refused(live, r, 415, "unsupported_format", before, word)


def test_onnx_without_its_external_data_file_is_refused(live: LiveServer, client: httpx.Client) -> None:
    """External data is read only from files of the same upload (tests/api/test_http_model_doors.py)."""
    before = live.stored_files()
    r = upload(client, "/v1/models", onnx_mlp(external=True), "mlp.onnx")
    assert_refused(live, r, 422, "invalid_file", before, "'weights.bin' is missing", "upload it together")


def test_broken_onnx_is_invalid(live: LiveServer, client: httpx.Client) -> None:
    before = live.stored_files()
    model = onnx.load_from_string(onnx_mlp())
    model.graph.node[1].op_type = "NonZero"
    r = upload(client, "/v1/models", bytes(model.SerializeToString()), "mlp.onnx")
    assert_refused(live, r, 422, "invalid_file", before, "NonZero")


def test_safetensors_with_a_lying_header_is_invalid(live: LiveServer, client: httpx.Client) -> None:
    before = live.stored_files()
    header = json.dumps({"fc1.weight": {"dtype": "F32", "shape": [300, 784], "data_offsets": [0, 300 * 784 * 4]}})
    content = struct.pack("<Q", len(header)) + header.encode() + b"\0" * 64
    r = upload(client, "/v1/models", content, "w.safetensors", architecture="lenet-300-100")
    assert_refused(live, r, 422, "invalid_file", before, "w.safetensors:", "truncated")


def test_mis_shaped_zoo_weights_list_the_keys(live: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    before = live.stored_files()
    state = {k: v.contiguous() for k, v in LeNet300100().state_dict().items()}
    state["fc1.weight"] = torch.zeros(300, 700)
    del state["fc3.bias"]
    state["extra.weight"] = torch.zeros(3)
    content = safetensors_bytes(state, {"netsurgery.arch": "lenet-300-100"}, tmp_path)
    r = upload(client, "/v1/models", content, "w.safetensors")
    assert_refused(live, r, 422, "invalid_file", before, "missing fc3.bias", "unexpected extra.weight")
    assert "fc1.weight: expected [300, 784], got [300, 700]" in r.json()["detail"]


def test_architecture_and_config_are_checked(live: LiveServer, client: httpx.Client, tmp_path: Path) -> None:
    before = live.stored_files()
    content = safetensors_bytes({"w": torch.zeros(2)}, None, tmp_path)
    r = upload(client, "/v1/models", content, "w.safetensors")
    assert_refused(live, r, 422, "invalid_request", before, "architecture")
    r = upload(client, "/v1/models", content, "w.safetensors", architecture="gpt-5")
    assert_refused(live, r, 422, "invalid_request", before, "unknown architecture")
    r = upload(client, "/v1/models", content, "w.safetensors", architecture="lenet-5", config='{"depth": 3}')
    assert_refused(live, r, 422, "invalid_request", before, "unknown key 'depth'")
    r = upload(client, "/v1/models", content, "w.safetensors", architecture="lenet-5", config="{nope")
    assert_refused(live, r, 422, "invalid_request", before, "not JSON")
    r = upload(client, "/v1/models", onnx_mlp(), "m.onnx", architecture="lenet-5")
    assert_refused(live, r, 422, "invalid_request", before, "safetensors")


def test_malformed_requests(live: LiveServer, client: httpx.Client) -> None:
    before = live.stored_files()
    r = client.post("/v1/models", json={"file": "x"})
    assert_refused(live, r, 415, "unsupported_format", before, "multipart")
    r = client.post("/v1/models", files={"weights": ("m.onnx", onnx_mlp())})
    assert_refused(live, r, 422, "invalid_request", before, "unexpected form field 'weights'")
    r = client.post("/v1/models", files={"name": (None, "only a name")})
    assert_refused(live, r, 422, "invalid_request", before, "'file'")
    r = client.post("/v1/models", content=b"--b\r\nbroken", headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert_refused(live, r, 400, "bad_request", before)
    r = upload(client, "/v1/models", npz_bytes(inputs=np.zeros((2, 3), np.float32)), "d.npz")
    assert_refused(live, r, 415, "unsupported_format", before, "not a model")


# -- the byte cap --------------------------------------------------------------------------------


def _raw_exchange(live: LiveServer, key: str, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a hand-written request (headers, then body parts) and return what the server answers."""
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.replace(b"KEY", key.encode()))
        try:
            for part in body_parts:
                s.sendall(part)
        except OSError:  # the server answered and closed while we were still sending
            pass
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + 10:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def _multipart_head(boundary: str, filename: str = "big.bin") -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def test_declared_length_over_the_cap_is_refused_before_reading(live: LiveServer, tenant: str) -> None:
    before = live.stored_files()
    head = (
        "POST /v1/models HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer KEY\r\n"
        f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {10 * HTTP_MAX_UPLOAD}\r\n\r\n"
    ).encode()
    answer = _raw_exchange(live, tenant, head, [])  # no body at all: the answer cannot wait for it
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"payload_too_large" in answer
    # the same figure as a streamed body over the cap gets: the upload cap, not the form's body limit
    assert f"larger than the {HTTP_MAX_UPLOAD:,}-byte limit".encode() in answer, answer
    assert live.stored_files() == before and list(live.upload_root.iterdir()) == []


def test_chunked_body_over_the_cap_is_cut_off(live: LiveServer, tenant: str) -> None:
    before = live.stored_files()
    head = (
        b"POST /v1/models HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer KEY\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    block = b"\x08" + b"\0" * (256 * 1024 - 1)
    data = [_multipart_head("xyz")] + [block] * (HTTP_MAX_UPLOAD // len(block) + 2)
    chunks = [f"{len(d):x}\r\n".encode() + d + b"\r\n" for d in data]
    # the terminating chunk is never sent: a 413 proves the server stopped reading at the cap
    answer = _raw_exchange(live, tenant, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert live.stored_files() == before and list(live.upload_root.iterdir()) == []


def test_oversized_upload_from_a_plain_client(live: LiveServer, client: httpx.Client) -> None:
    before = live.stored_files()
    r = upload(client, "/v1/models", b"\x08" + b"\0" * (HTTP_MAX_UPLOAD + 1), "big.onnx")
    assert_refused(live, r, 413, "payload_too_large", before)
    assert f"larger than the {HTTP_MAX_UPLOAD:,}-byte limit" in r.json()["detail"]

    def streamed() -> Iterator[bytes]:  # no Content-Length: httpx sends it chunked
        yield _multipart_head("abc")
        for _ in range(HTTP_MAX_UPLOAD // 65536 + 2):
            yield b"\0" * 65536
        yield b"\r\n--abc--\r\n"

    r = client.post("/v1/models", content=streamed(), headers={"Content-Type": "multipart/form-data; boundary=abc"})
    assert_refused(live, r, 413, "payload_too_large", before)
    assert f"larger than the {HTTP_MAX_UPLOAD:,}-byte limit" in r.json()["detail"]


def test_lying_content_length(live: LiveServer, tenant: str) -> None:
    """uvicorn frames the body by Content-Length, so over HTTP a short claim truncates the body (400); an
    ASGI server that passed on more bytes than declared meets the running count instead (413)."""
    before = live.stored_files()
    body = _multipart_head("xyz") + b"\x08" + b"\0" * (HTTP_MAX_UPLOAD + 100_000) + b"\r\n--xyz--\r\n"
    head = (
        b"POST /v1/models HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer KEY\r\n"
        b"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 1000\r\n\r\n"
    )
    answer = _raw_exchange(live, tenant, head, [body])
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    # with httptools the 400 is the server's own (the bytes past the declared length do not parse as
    # a next request) and may come while the application is still refusing the truncated form: what
    # must hold is that nothing is left once it has done so
    # the application may also start on the request only after the 400 went out: wait until the upload
    # folder has stayed empty for a while, not merely until it is empty once
    deadline, quiet_since = time.monotonic() + 5, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < 0.5:
        if list(live.upload_root.iterdir()):
            quiet_since = time.monotonic()
        time.sleep(0.01)
    assert live.stored_files() == before and list(live.upload_root.iterdir()) == []

    async def lie() -> httpx.Response:
        transport = httpx.ASGITransport(app=live.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.post(
                "/v1/models",
                content=body,
                headers={
                    "Authorization": f"Bearer {tenant}",
                    "Content-Type": "multipart/form-data; boundary=xyz",
                    "Content-Length": "1000",
                },
            )

    r = asyncio.run(lie())
    assert_refused(live, r, 413, "payload_too_large", before)


# -- data sets -----------------------------------------------------------------------------------


def test_upload_npz_dataset(live: LiveServer, client: httpx.Client) -> None:
    content = npz_bytes(inputs=np.random.default_rng(0).random((20, 1, 8, 8), np.float32), targets=np.arange(20) % 3)
    r = upload(client, "/v1/datasets", content, "digits.npz")
    assert r.status_code == 201, r.text
    data = r.json()
    assert (data["kind"], data["n_examples"], data["input_shape"], data["has_targets"]) == ("npz", 20, [1, 8, 8], True)
    assert (data["name"], data["builtin_name"]) == ("digits.npz", None)
    assert (data["size_bytes"], data["sha256"]) == (len(content), hashlib.sha256(content).hexdigest())
    assert (live.storage_root / "datasets" / data["id"] / "inputs.npz").read_bytes() == content
    assert client.get(f"/v1/datasets/{data['id']}").json() == data


def test_upload_idx_pair(live: LiveServer, client: httpx.Client) -> None:
    images = idx_bytes(np.arange(10 * 8 * 8, dtype=np.uint64).astype(np.uint8).reshape(10, 8, 8))
    labels = idx_bytes((np.arange(10) % 10).astype(np.uint8))
    r = client.post("/v1/datasets", files={"file": ("x.idx", images), "targets": ("y.idx", labels)}, data={"name": "i"})
    assert r.status_code == 201, r.text
    data = r.json()
    assert (data["kind"], data["n_examples"], data["input_shape"], data["has_targets"]) == ("idx", 10, [1, 8, 8], True)
    assert data["size_bytes"] == len(images) + len(labels)
    folder = live.storage_root / "datasets" / data["id"]
    assert (folder / "inputs.idx").read_bytes() == images and (folder / "targets.idx").read_bytes() == labels


def test_builtin_dataset(client: httpx.Client) -> None:
    r = client.post("/v1/datasets", json={"builtin": "fashion-mnist"})
    assert r.status_code == 201, r.text
    data = r.json()
    assert (data["kind"], data["builtin_name"], data["name"], data["n_examples"]) == (
        "builtin",
        "fashion-mnist",
        "fashion-mnist",
        None,
    )
    r = client.post("/v1/datasets", json={"builtin": "imagenet"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert r.json()["fields"][0]["loc"] == ["builtin"]
    r = client.post("/v1/datasets", content=b"builtin=digits", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


def test_npz_object_array_is_refused(live: LiveServer, client: httpx.Client) -> None:
    before = live.stored_files()
    content = npz_bytes(inputs=np.array([{"a": 1}, None], dtype=object))
    r = upload(client, "/v1/datasets", content, "evil.npz")
    assert_refused(live, r, 422, "invalid_file", before, "pickle")


def test_bad_datasets(live: LiveServer, client: httpx.Client) -> None:
    before = live.stored_files()
    r = upload(client, "/v1/datasets", npz_bytes(x=np.zeros((2, 3), np.float32)), "d.npz")
    assert_refused(live, r, 422, "invalid_file", before, "inputs")
    r = upload(client, "/v1/datasets", onnx_mlp(), "m.onnx")
    assert_refused(live, r, 415, "unsupported_format", before, "model")
    r = client.post(
        "/v1/datasets",
        files={"file": ("d.npz", npz_bytes(inputs=np.zeros((2, 3), np.float32))), "targets": ("t", b"\0\0\x08\x01")},
    )
    assert_refused(live, r, 422, "invalid_request", before, "IDX")


# -- listing and deleting ------------------------------------------------------------------------


def test_list_and_delete(live: LiveServer) -> None:
    _, key = live.new_tenant()
    with live.client(key) as client:
        ids = [upload(client, "/v1/models", onnx_mlp(), f"m{i}.onnx", duplicate="new").json()["id"] for i in range(3)]
        page = client.get("/v1/models", params={"limit": 2, "offset": 0}).json()
        assert (page["total"], page["limit"], page["offset"], len(page["items"])) == (3, 2, 0, 2)
        assert [m["id"] for m in page["items"]] == ids[::-1][:2]
        rest = client.get("/v1/models", params={"limit": 2, "offset": 2}).json()
        assert [m["id"] for m in rest["items"]] == ids[:1]
        assert client.get("/v1/models", params={"limit": 0}).status_code == 422

        folder = live.storage_root / "models" / ids[0]
        assert folder.is_dir()
        r = client.delete(f"/v1/models/{ids[0]}")
        assert r.status_code == 204
        assert not folder.exists()
        assert client.get(f"/v1/models/{ids[0]}").status_code == 404
        assert client.delete(f"/v1/models/{ids[0]}").status_code == 404

        dataset = upload(client, "/v1/datasets", npz_bytes(inputs=np.zeros((2, 4), np.float32)), "d.npz").json()
        assert client.get("/v1/datasets").json()["total"] == 1
        job = client.post(
            "/v1/jobs", json={"model_id": ids[1], "dataset_id": dataset["id"], "target": {"compression": 5}}
        )
        assert job.status_code == 202, job.text
        r = client.delete(f"/v1/models/{ids[1]}")
        assert r.status_code == 409 and r.json()["error"] == "conflict"
        assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 409
        assert (live.storage_root / "models" / ids[1]).is_dir()
        assert client.delete(f"/v1/datasets/{dataset['id']}").json()["error"] == "conflict"
        r = client.post(f"/v1/jobs/{job.json()['id']}/cancel")
        assert r.status_code == 202
        assert client.delete(f"/v1/jobs/{job.json()['id']}").status_code == 204
        assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
        assert not (live.storage_root / "datasets" / dataset["id"]).exists()
        assert client.delete(f"/v1/models/{ids[1]}").status_code == 204


def test_the_same_file_again_answers_with_the_one_already_there(live: LiveServer) -> None:
    _, key = live.new_tenant()
    _, other_key = live.new_tenant()
    data = npz_bytes(inputs=np.ones((3, 4), np.float32), targets=np.array([0, 1, 0]))
    with live.client(key) as c:
        first = upload(c, "/v1/models", onnx_mlp(), "mlp.onnx")
        assert first.status_code == 201
        stored = live.stored_files()
        again = upload(c, "/v1/models", onnx_mlp(), "renamed.onnx", name="another name")
        assert again.status_code == 200 and again.json() == first.json()  # the model there, its name unchanged
        assert again.headers["location"] == f"/v1/models/{first.json()['id']}"
        assert live.stored_files() == stored and list(live.upload_root.iterdir()) == []
        assert c.get("/v1/models").json()["total"] == 1
        forced = upload(c, "/v1/models", onnx_mlp(), "mlp.onnx", duplicate="new")
        assert forced.status_code == 201 and forced.json()["id"] != first.json()["id"]
        assert c.get("/v1/models").json()["total"] == 2
        assert upload(c, "/v1/models", onnx_mlp(), duplicate="maybe").status_code == 422

        d1 = upload(c, "/v1/datasets", data, "d.npz")
        d2 = upload(c, "/v1/datasets", data, "d.npz")
        assert (d1.status_code, d2.status_code) == (201, 200) and d1.json()["id"] == d2.json()["id"]
        assert upload(c, "/v1/datasets", data, "d.npz", duplicate="new").status_code == 201
    with live.client(other_key) as c:  # another tenant's upload of the same bytes is its own
        assert upload(c, "/v1/models", onnx_mlp(), "mlp.onnx").status_code == 201
