"""Faults with real processes: a worker killed with SIGKILL mid-job, a cancel, a duplicate delivery,
a checkpoint writer killed mid-write. Nothing lost, nothing done twice."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from dns_core.artifacts import REPORT_FILES
from dns_core.checkpoint import load_state, remove_stale_temporaries
from dns_core.sparse import load_sparse
from tests.e2e.conftest import Service
from tests.e2e.test_service import _zoo_file, download_all, upload, wait_for_state

pytestmark = pytest.mark.slow
TERMINAL = {"succeeded", "failed", "cancelled"}


def _submit(c: httpx.Client, model: str, data: str, iterations: int, **extra: Any) -> str:
    body = {"model_id": model, "dataset_id": data, "method": "dns",
            "target": {"compression": 6, "max_accuracy_drop": 100},
            "settings": {"iterations": iterations, "seed": 0} | extra}  # fmt: skip
    r = c.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def inputs(service: Service, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("inputs")
    with service.client() as c:
        model = upload(c, "/v1/models", _zoo_file(folder / "m.safetensors"), architecture="lenet-300-100")
        data = c.post("/v1/datasets", json={"builtin": "digits"}).json()
    return model["id"], data["id"]


def test_a_worker_killed_mid_job_costs_at_most_one_checkpoint_interval(
    service: Service, inputs: tuple[str, str], tmp_path: Path
) -> None:
    model, data = inputs
    iterations, interval = 4000, 100  # NETSURGERY_CHECKPOINT_EVERY in the fixture
    with service.client() as c:
        straight = _submit(c, model, data, iterations)
        assert wait_for_state(c, straight, TERMINAL)["state"] == "succeeded"

        job_id = _submit(c, model, data, iterations)
        _wait(lambda: c.get(f"/v1/jobs/{job_id}").json()["iteration"] >= 700, 120, "progress past 700")
        service.procs["w1"].send_signal(signal.SIGKILL)  # no goodbye: the lease must run out
        service.procs.pop("w1").wait()
        at_kill = c.get(f"/v1/jobs/{job_id}").json()
        assert at_kill["state"] == "running" and at_kill["attempt"] == 1
        # what the next attempt will resume from: the last checkpoint the killed worker completed
        checkpoint = load_state(service.folder / "store" / "jobs" / job_id / "checkpoint.safetensors")["iteration"]
        assert checkpoint % interval == 0 and at_kill["iteration"] - checkpoint <= interval  # redone ≤ one interval
        print(f"FIGURE kill -9: recorded iteration {at_kill['iteration']}, resumed from checkpoint {checkpoint}, "
              f"redone {at_kill['iteration'] - checkpoint} (interval {interval})")  # fmt: skip
        service.start_worker("w2")
        job = wait_for_state(c, job_id, TERMINAL, timeout=240)
        assert job["state"] == "succeeded" and job["attempt"] == 2 and job["iteration"] == iterations
        points = c.get(f"/v1/jobs/{job_id}/progress", params={"limit": 1000}).json()["items"]
        iters = [p["iteration"] for p in points]
        assert iters == sorted(iters) and len(iters) == len(set(iters))  # progress never goes backwards
        assert iters[-1] == iterations and min(p["iteration"] for p in points if p["attempt"] == 2) > checkpoint
        (tmp_path / "resumed").mkdir()
        (tmp_path / "straight").mkdir()
        got = download_all(c, job_id, tmp_path / "resumed")
        want = download_all(c, straight, tmp_path / "straight")
    a, b = load_sparse(want["model.sparse.safetensors"]), load_sparse(got["model.sparse.safetensors"])
    assert a.keys() == b.keys()
    for k in a:  # the same masks and the same weights as the run nobody interrupted
        assert torch.equal(a[k] != 0, b[k] != 0), k
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_cancel_a_running_job_within_five_seconds_and_the_worker_takes_the_next(
    service: Service, inputs: tuple[str, str]
) -> None:
    model, data = inputs
    if not service.procs:
        service.start_worker("w3")
    with service.client() as c:
        long = _submit(c, model, data, 1_000_000)
        _wait(lambda: c.get(f"/v1/jobs/{long}").json()["iteration"] > 0, 120, "the long job to run")
        asked = time.monotonic()
        assert c.post(f"/v1/jobs/{long}/cancel").status_code == 202
        _wait(lambda: c.get(f"/v1/jobs/{long}").json()["state"] == "cancelled", 5, "cancelled within 5 s")
        assert time.monotonic() - asked < 5
        print(f"FIGURE cancel: cancelled {time.monotonic() - asked:.2f} s after the request")
        nxt = _submit(c, model, data, 100)
        assert wait_for_state(c, nxt, TERMINAL, timeout=60)["state"] == "succeeded"


def test_the_same_task_delivered_twice_runs_once(service: Service, inputs: tuple[str, str]) -> None:
    """Two workers, the job's message sent a second time while it runs: one attempt does the work."""
    from service.queue import enqueue_job, make_celery
    from service.settings import Settings

    model, data = inputs
    service.start_worker("w4")
    app = make_celery(Settings(broker_url=service.env["NETSURGERY_BROKER_URL"]))
    with service.client() as c:
        job_id = _submit(c, model, data, 600)
        import uuid

        enqueue_job(app, uuid.UUID(job_id))  # the duplicate
        job = wait_for_state(c, job_id, TERMINAL, timeout=120)
        assert job["state"] == "succeeded" and job["attempt"] == 1
        points = c.get(f"/v1/jobs/{job_id}/progress", params={"limit": 1000}).json()["items"]
        assert {p["attempt"] for p in points} == {1}
        candidates = c.get(f"/v1/jobs/{job_id}/frontier").json()["candidates"][1:]  # the budget's lower rungs
        assert len(c.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]) == 2 + len(REPORT_FILES) + len(candidates)
    service.stop("w4")


def test_a_checkpoint_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """SIGKILL a process that keeps rewriting a large checkpoint, at arbitrary moments: the file on disk
    always loads, whole, and never as a mix of two versions."""
    path = tmp_path / "ckpt.safetensors"
    code = f"""
import torch
from dns_core.checkpoint import save_state
print("ready", flush=True)
i = 0
while True:
    save_state({str(path)!r}, {{"iteration": i, "w": torch.full((2_000_000,), float(i))}})
    i += 1
"""
    # delays count from the moment the writer has imported torch and starts writing (the import alone
    # takes 1-2 s on a slow machine, which fixed delays from process start used to spend)
    for delay in (0.05, 0.3, 0.55, 0.8, 1.1):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not path.exists():
            continue
        state = load_state(path)
        assert torch.equal(state["w"], torch.full((2_000_000,), float(state["iteration"])))
    assert path.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != path.name]
    # only orphaned temporary folders (safetensors' own temporary file inside), never a torn file,
    # and all of them are what a resumed job's clean-up removes
    assert all(name.startswith(f".{path.name}.") and name.endswith(".tmp") for name in leftovers), leftovers
    assert sorted(p.name for p in remove_stale_temporaries(path)) == sorted(leftovers)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    load_state(path)


class _Payload:
    """Unpickling this creates the directory ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.mkdir, (str(self.target),))


def test_the_worker_refuses_non_json_task_messages(service: Service, inputs: tuple[str, str], tmp_path: Path) -> None:
    from celery import Celery

    from service.queue import QUEUE, RUN_JOB

    sentinel = tmp_path / "SENTINEL_unpickled"
    if not any(name.startswith("w") for name in service.procs):
        service.start_worker("w5")
    hostile = Celery("hostile", broker=service.env["NETSURGERY_BROKER_URL"], set_as_current=False)
    hostile.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    hostile.send_task(RUN_JOB, args=[_Payload(sentinel)], queue=QUEUE, serializer="pickle")
    model, data = inputs
    with service.client() as c:  # the worker goes on with real work: the message was dropped, not run
        job = wait_for_state(c, _submit(c, model, data, 100), TERMINAL, timeout=60)
    assert job["state"] == "succeeded"
    assert not sentinel.exists()
    logs = "".join(p.read_text(errors="replace") for p in service.folder.glob("w*.log"))
    assert "Refusing to deserialize untrusted content of type pickle" in logs
