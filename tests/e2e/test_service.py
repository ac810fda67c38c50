"""End to end through real HTTP, Postgres, Redis and a Celery worker process: upload, compress, download.

Also the embedded ``netsurgery serve`` (SQLite, filesystem broker, local files, its own worker).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from dns_core import models, numerics
from dns_core.artifacts import REPORT_FILES
from dns_core.data import load_digits
from dns_core.io import load_model, save_model
from dns_core.onnx_convert import load_onnx
from dns_core.onnx_export import check_with_onnxruntime
from dns_core.sparse import load_sparse
from tests.e2e.conftest import Service, free_port, wait_until_up
from tests.fashion import stand_in_fashion_mnist

pytestmark = pytest.mark.slow


def _digits_npz(path: Path) -> Path:
    train, _ = load_digits()
    assert train.targets is not None
    np.savez(path, inputs=train.inputs.numpy(), targets=train.targets.numpy())
    return path


def _zoo_file(path: Path) -> Path:
    torch.manual_seed(0)
    save_model(path, models.build("lenet-300-100"), "lenet-300-100")
    return path


def upload(c: httpx.Client, route: str, path: Path, **form: str) -> dict[str, Any]:
    """Upload ``path`` as a new entry (duplicate=new: tests send the same zoo weights again and again)."""
    with open(path, "rb") as f:
        r = c.post(route, files={"file": (path.name, f)}, data=form, params={"duplicate": "new"})
    assert r.status_code == 201, r.text
    return dict(r.json())


def wait_for_state(c: httpx.Client, job_id: str, states: set[str], timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return dict(job)
        assert time.monotonic() < deadline, f"job still {job['state']} after {timeout}s: {job}"
        time.sleep(0.2)


def download_all(c: httpx.Client, job_id: str, into: Path) -> dict[str, Path]:
    listing = c.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
    out = {}
    for art in listing:
        r = c.get(f"/v1/jobs/{job_id}/artifacts/{art['name']}")
        assert r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() == art["sha256"] == r.headers["etag"].strip('"')
        assert len(r.content) == art["size_bytes"]
        (into / art["name"]).write_bytes(r.content)
        out[art["name"]] = into / art["name"]
    return out


def test_zoo_model_compressed_by_a_worker_and_downloaded(service: Service, tmp_path: Path) -> None:
    with service.client() as c:
        model = upload(c, "/v1/models", _zoo_file(tmp_path / "lenet.safetensors"), architecture="lenet-300-100")
        assert model["parameter_count"] == 266_610 and model["format"] == "safetensors"
        data = upload(c, "/v1/datasets", _digits_npz(tmp_path / "digits.npz"))
        body = {"model_id": model["id"], "dataset_id": data["id"], "method": "dns",
                "target": {"compression": 8, "max_accuracy_drop": 100},
                "settings": {"iterations": 400, "seed": 0, "codec": "shared"}}  # fmt: skip
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        job = wait_for_state(c, r.json()["id"], {"succeeded", "failed", "cancelled"})
        assert job["state"] == "succeeded", job
        assert 7.6 <= job["compression"] <= 8.4
        # with a budget the job climbs 2x, 4x, then the asked 8x; once 8x holds, the rest of the run polishes it
        frontier = c.get(f"/v1/jobs/{job['id']}/frontier").json()
        assert [round(p["compression"]) for p in frontier["points"]] == [2, 4, 8, 8]
        assert job["iteration"] == frontier["points"][-1]["iteration"] == 400
        assert {layer["layer"] for layer in job["layers"]["layers"]} == {"fc1", "fc2", "fc3"}
        progress = c.get(f"/v1/jobs/{job['id']}/progress").json()["items"]
        iters = [p["iteration"] for p in progress]
        assert iters == sorted(iters) and iters[-1] == job["iteration"]
        files = download_all(c, job["id"], tmp_path)
    # the verdict in the job itself: what was delivered, against the reference and the budget
    result = job["result"]
    assert result["compression"] == job["compression"] and result["val_acc"] == job["val_accuracy"]
    assert result["val_drop"] == pytest.approx(result["reference_val_acc"] - result["val_acc"])
    assert result["max_accuracy_drop"] == 100 and result["budget_met"] is True
    assert result["verdict"].startswith("8.0x as asked, within the 100-point budget")
    assert result["sparse_file_bytes"] == files["model.sparse.safetensors"].stat().st_size
    assert result["dense_file_bytes"] == files["model.safetensors"].stat().st_size
    assert result["compression_bytes"] > 1 and result["test_acc"] is None  # an uploaded set without a test split
    candidates = {"candidate-2.sparse.safetensors", "candidate-3.sparse.safetensors"}  # the 4x and 2x rungs
    assert set(files) == {"model.safetensors", "model.sparse.safetensors", "model.sparse.shared.safetensors",
                          *candidates, *REPORT_FILES}  # fmt: skip
    report = json.loads(files["report.json"].read_text())
    assert report["inputs"]["model"]["sha256"] == model["sha256"]
    pruned, _ = load_model(files["model.safetensors"])
    sparse = load_sparse(files["model.sparse.safetensors"])
    assert all(torch.equal(sparse[k], v) for k, v in pruned.state_dict().items())
    nonzero = sum(int((p != 0).sum()) for p in pruned.parameters())
    assert nonzero == report["nonzero_parameters"]
    x = torch.randn(8, 1, 28, 28)
    fresh = models.build("lenet-300-100")
    fresh.load_state_dict(sparse)
    assert torch.equal(fresh(x), pruned(x))  # the sparse download rebuilds the same model


def test_a_budget_only_job_returns_its_frontier_and_candidates(service: Service, tmp_path: Path) -> None:
    """Only max_accuracy_drop: the worker searches, the frontier grows while the job runs, and the job hands
    over the highest compression within budget with the next-best candidates as downloads."""
    from dns_core.reference import train_reference

    train, _ = load_digits()
    reference = train_reference("lenet-300-100", train, epochs=15, device="cpu")
    save_model(tmp_path / "ref.safetensors", reference, "lenet-300-100")
    with service.client() as c:
        model = upload(c, "/v1/models", tmp_path / "ref.safetensors", architecture="lenet-300-100")
        data = upload(c, "/v1/datasets", _digits_npz(tmp_path / "digits.npz"))
        body = {"model_id": model["id"], "dataset_id": data["id"], "method": "dns",
                "target": {"max_accuracy_drop": 2.0}, "settings": {"iterations": 3000, "seed": 0}}  # fmt: skip
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        live: list[int] = []  # frontier sizes seen while the job ran
        deadline = time.monotonic() + 180
        while (job := c.get(f"/v1/jobs/{job_id}").json())["state"] not in ("succeeded", "failed", "cancelled"):
            f = c.get(f"/v1/jobs/{job_id}/frontier")
            assert f.status_code == 200, f.text
            if f.json()["state"] == "running":
                live.append(len(f.json()["points"]))
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["state"] == "succeeded", job
        assert any(n > 0 for n in live), live  # points arrive while the job runs
        f = c.get(f"/v1/jobs/{job_id}/frontier").json()
        held = [p for p in f["points"] if p["within_budget"]]
        assert f["chosen"]["compression"] == max(p["compression"] for p in held)
        assert job["compression"] == pytest.approx(f["chosen"]["compression"], rel=1e-6)
        assert job["compression"] > 8 and "highest compression found within the 2-point budget" in f["verdict"]
        assert f["reference_val_acc"] - job["val_accuracy"] <= 2.0
        candidates = f["candidates"]
        assert candidates[0]["chosen"] and candidates[0]["file"] == "model.sparse.safetensors"
        assert len(candidates) >= 2 and all(not c["chosen"] for c in candidates[1:])
        files = download_all(c, job_id, tmp_path)
        for candidate in candidates[1:]:
            state = load_sparse(files[candidate["file"]])
            nonzero = sum(int(torch.count_nonzero(v)) for v in state.values())
            assert sum(v.numel() for v in state.values()) / nonzero == pytest.approx(candidate["compression"])
            assert candidate["compression"] < job["compression"]
        # a job asked for a compression without a budget has no frontier; with one, it climbs one
        r = c.post("/v1/jobs", json=body | {"target": {"compression": 4}})
        missing = c.get(f"/v1/jobs/{r.json()['id']}/frontier")
        assert missing.status_code == 404 and "with an accuracy budget" in missing.text
        r = c.post("/v1/jobs", json=body | {"target": {"compression": 4, "max_accuracy_drop": 2.0}})
        capped = c.get(f"/v1/jobs/{r.json()['id']}/frontier")
        assert capped.status_code == 200 and capped.json()["max_accuracy_drop"] == 2.0
        for queued in (missing, capped):  # the two jobs were only for their frontier answers
            c.post(f"/v1/jobs/{queued.url.path.split('/')[3]}/cancel")
        # one-shot cannot search
        r = c.post("/v1/jobs", json=body | {"method": "one-shot"})
        assert r.status_code == 422 and "only dns, agp and han search" in r.text


def test_onnx_model_compressed_and_returned_as_onnx(service: Service, tmp_path: Path) -> None:
    from tests.dns_core.test_onnx import cnn_model

    onnx.save(cnn_model(c=8, classes=10, size=12), str(tmp_path / "cnn.onnx"))
    g = np.random.default_rng(0)
    x = g.normal(size=(300, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", inputs=x, targets=(x[:, 0].mean((1, 2)) > 0).astype(np.int64) * 3)
    with service.client() as c:
        model = upload(c, "/v1/models", tmp_path / "cnn.onnx")
        assert model["format"] == "onnx"
        data = upload(c, "/v1/datasets", tmp_path / "d.npz")
        r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": data["id"], "method": "dns",
                                     "target": {"compression": 3, "max_accuracy_drop": 100},
                                     "settings": {"iterations": 200}})  # fmt: skip
        assert r.status_code == 202, r.text
        job = wait_for_state(c, r.json()["id"], {"succeeded", "failed", "cancelled"})
        assert job["state"] == "succeeded", job
        files = download_all(c, job["id"], tmp_path)
        candidates = {f["file"] for f in c.get(f"/v1/jobs/{job['id']}/frontier").json()["candidates"][1:]}
    assert set(files) == {"model.onnx", "model.sparse.safetensors", *REPORT_FILES, *candidates}
    exported = files["model.onnx"].read_bytes()
    module = load_onnx(exported)
    assert check_with_onnxruntime(module, exported, n=4, atol=1e-4) <= 1e-4
    back = onnx.load_from_string(exported)
    assert [i.name for i in back.graph.input] == ["x"] and [o.name for o in back.graph.output] == ["logits"]
    zeros = sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in back.graph.initializer)
    assert zeros > 0


def test_bad_data_fails_the_job_with_a_sentence_not_a_traceback(service: Service, tmp_path: Path) -> None:
    # a data set whose inputs do not fit the model: accepted as data, refused by the worker before training
    np.savez(tmp_path / "wrong.npz", inputs=np.zeros((50, 3, 32, 32), np.float32), targets=np.zeros(50, np.int64))
    with service.client() as c:
        model = upload(c, "/v1/models", _zoo_file(tmp_path / "m.safetensors"), architecture="lenet-300-100")
        data = upload(c, "/v1/datasets", tmp_path / "wrong.npz")
        r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": data["id"], "method": "dns",
                                     "target": {"compression": 5}, "settings": {"iterations": 50}})  # fmt: skip
        job = wait_for_state(c, r.json()["id"], {"succeeded", "failed", "cancelled"})
    assert job["state"] == "failed"
    assert "do not fit the model" in job["error"] and "Traceback" not in job["error"]


def test_embedded_serve_runs_a_job_with_nothing_else_installed(tmp_path: Path) -> None:
    """`netsurgery serve`: SQLite, a filesystem broker, local files and its own worker."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETSURGERY_")}
    env |= {"NETSURGERY_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"
    serve = [sys.executable, "-m", "netsurgery", "serve", "--data-dir", "data"]
    with open(log, "wb") as out:
        proc = subprocess.Popen([*serve, "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=tmp_path)  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", proc, log)
        # the key is printed once the server answers: the health check may win that race by a few ms
        deadline = time.monotonic() + 10
        while (key := re.search(r"API key: (\S+)", log.read_text())) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert key is not None, log.read_text()
        headers = {"Authorization": f"Bearer {key.group(1)}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as c:
            model = upload(c, "/v1/models", _zoo_file(tmp_path / "m.safetensors"), architecture="lenet-300-100")
            data = c.post("/v1/datasets", json={"builtin": "digits"})
            assert data.status_code == 201, data.text
            r = c.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": data.json()["id"], "method": "dns",
                                         "target": {"compression": 5}, "settings": {"iterations": 200}})  # fmt: skip
            assert r.status_code == 202, r.text
            job = wait_for_state(c, r.json()["id"], {"succeeded", "failed", "cancelled"})
            assert job["state"] == "succeeded", (job, (tmp_path / "data" / "worker.log").read_text()[-2000:])
            files = download_all(c, job["id"], tmp_path)
        state = load_file(str(files["model.safetensors"]))
        assert state.keys() == load_sparse(files["model.sparse.safetensors"]).keys()
        # a second serve on the same folder is refused, naming the first; admin writes to the served database
        second = subprocess.run([*serve, "--port", str(free_port())], env=env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert second.returncode == 2 and f"{tmp_path / 'data'} is already being served (by pid {proc.pid})" in (
            second.stderr
        ), second
        admin = subprocess.run([sys.executable, "-m", "netsurgery", "admin", "create-tenant", "team-b", "--data-dir",
                                "data"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert admin.returncode == 0, admin
        assert f"database: sqlite:///{tmp_path / 'data' / 'netsurgery.db'}" in admin.stdout
        team_b = admin.stdout.strip().splitlines()[-1]
        listed = httpx.get(f"http://127.0.0.1:{port}/v1/jobs", headers={"Authorization": f"Bearer {team_b}"})
        assert listed.status_code == 200 and listed.json()["total"] == 0  # the running server knows the new key
        assert io.BytesIO(files["report.json"].read_bytes()).read(1) == b"{"
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["data"]  # nothing else in the cwd
        children = _children(proc.pid)
        assert len(children) == 1, children  # its worker
        proc.terminate()  # SIGTERM, as a process manager stops a service
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
        assert "stopping" in log.read_text()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in children), "the worker outlived serve"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_demo_runs_the_quickstart_job_through_the_embedded_service_with_portable_numerics(tmp_path: Path) -> None:
    """`netsurgery demo`, the job of scripts/quickstart.sh: reference, upload, job, download, on a stand-in data set.

    Its default numerics are portable where the CPU has AVX2: the worker that trains the job inherits them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETSURGERY_") and k not in numerics.PORTABLE_ENV}
    env |= {"NETSURGERY_DEVICE": "cpu", "PYTHONUNBUFFERED": "1", "NETSURGERY_DATA_DIR": str(tmp_path / "data"),
            "NETSURGERY_CACHE": str(tmp_path / "cache"),
            "NETSURGERY_FASHION_MNIST": str(stand_in_fashion_mnist(tmp_path / "fashion"))}  # fmt: skip
    demo = [sys.executable, "-m", "netsurgery", "demo", "--target", "4", "--max-drop", "100", "--iterations", "300"]
    run = subprocess.run(demo, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["compression"] == pytest.approx(4, rel=0.01) and report["budget_met"] is True
    for name in ("model.safetensors", "model.sparse.safetensors", "report.json", "report.html"):
        size = (out / name).stat().st_size
        assert re.search(rf"out/{re.escape(name)}\s+{size:,} bytes  sha256 verified", run.stdout), (name, run.stdout)
    assert f"succeeded: {report['compression']:.1f}x" in run.stdout
    expected = numerics.default("portable")  # portable where the CPU has AVX2 and no GPU does the training
    assert report["numerics"]["numerics"] == expected
    if expected == "portable":
        assert report["numerics"]["numerics_pins"] == numerics.PORTABLE_ENV
        assert report["numerics"]["cpu_capability"] == "AVX2"
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [
            f"ref-lenet-300-100-fashion-mnist-cli-e20-s0-{numerics.tag('portable')}.safetensors"
        ]


def _serve_with_its_worker(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, int, int]:
    """`netsurgery serve` on a free port, once it answers and has started its one worker: (process, its log,
    the worker's pid, the port)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETSURGERY_")}
    env |= {"NETSURGERY_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "netsurgery", "serve", "--data-dir", "data", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", proc, log)
        deadline = time.monotonic() + 30
        while not (children := _children(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(children) == 1, children  # its worker
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        raise
    return proc, log, children[0], port


def test_the_embedded_worker_dies_with_a_killed_serve(tmp_path: Path) -> None:
    """SIGKILL leaves serve no chance to stop its worker: the kernel does (no orphan trains on)."""
    proc, _, worker, _ = _serve_with_its_worker(tmp_path)
    try:
        deadline = time.monotonic() + 30
        # the worker is past its start-up (it listens for jobs) before serve goes
        worker_log = tmp_path / "data" / "worker.log"
        while b"ready" not in (worker_log.read_bytes() if worker_log.exists() else b"") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b"ready" in worker_log.read_bytes() and _alive(worker), worker_log.read_text()[-2000:]
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker outlived a killed serve"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    task = Path(f"/proc/{pid}/task")
    return [int(c) for t in task.iterdir() for c in (t / "children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has stopped; only its parent has yet to reap it


def test_the_python_client_round_trip_and_its_errors(service: Service, tmp_path: Path) -> None:
    from netsurgery.client import ApiError, Client

    seen: list[int] = []
    with Client(service.url, service.key) as c:
        model = c.upload_model(_zoo_file(tmp_path / "m.safetensors"), architecture="lenet-300-100")
        data = c.builtin_data("digits")
        job = c.submit(model["id"], data["id"], compression=5, iterations=200, idempotency_key="client-test-1")
        again = c.submit(model["id"], data["id"], compression=5, iterations=200, idempotency_key="client-test-1")
        assert again["id"] == job["id"]
        done = c.wait(job["id"], callback=lambda j: seen.append(j["iteration"]), poll=0.1, timeout=120)
        assert done["state"] == "succeeded" and seen == sorted(seen) and seen[-1] == 200
        got = []
        files = c.download(job["id"], tmp_path / "dl", progress=lambda name, n, total: got.append((name, n, total)))
        assert set(files) >= {"model.safetensors", "model.sparse.safetensors", "report.json"}
        assert all(n <= total for _, n, total in got) and any(n == total for _, n, total in got)
        with pytest.raises(ApiError, match="404"):
            c.job("00000000-0000-0000-0000-000000000000")
        with pytest.raises(ApiError, match="415") as refused:
            (tmp_path / "evil.pt").write_bytes(b"\x80\x04\x95\x00")
            c.upload_model(tmp_path / "evil.pt")
        assert "pickle" in str(refused.value)
    with Client(service.url, "ns_wrong") as c, pytest.raises(ApiError, match="refused the API key"):
        c.jobs()
    with Client(f"http://127.0.0.1:{free_port()}", service.key) as c, pytest.raises(ApiError, match="cannot reach"):
        c.jobs()


def test_ctrl_c_stops_the_embedded_serve_and_its_worker(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C in the terminal) stops `netsurgery serve` as SIGTERM does: the API and its worker."""
    proc, log, worker, port = _serve_with_its_worker(tmp_path)
    children = [worker]
    try:
        deadline = time.monotonic() + 30
        while b"Ctrl-C stops both" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)  # serve is up, not still starting (Ctrl-C while it starts is exit 130)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in children), "the worker outlived serve"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
