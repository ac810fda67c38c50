"""Jobs, auth, tenant isolation, artifacts and probes over real HTTP, with Postgres and a Redis broker.

No worker runs here: the tests check the message that ``POST /v1/jobs`` leaves on the Redis list, and
play the worker's part (claim, progress, artifacts) through the repository.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select

from api.app import create_app
from service.database import session_scope
from service.orm import ApiKey
from service.queue import QUEUE, RUN_JOB
from service.repositories import jobs, jobstate, tenants
from service.repositories.jobs import LayerSample, ProgressSample
from tests.api.conftest import AUTH_CACHE_SECONDS, REDIS_TEST_URL, LiveServer, closed_port, http_settings, serve
from tests.api.test_http_uploads import onnx_mlp


@dataclass(frozen=True)
class Account:
    """A tenant with its key, an ONNX model and a built-in data set, made through the API."""

    tenant_id: uuid.UUID
    key: str
    model_id: str
    dataset_id: str


def new_account(live: LiveServer) -> Account:
    tenant_id, key = live.new_tenant()
    with live.client(key) as c:
        model = c.post("/v1/models", files={"file": ("mlp.onnx", onnx_mlp())})
        dataset = c.post("/v1/datasets", json={"builtin": "digits"})
    assert model.status_code == dataset.status_code == 201, (model.text, dataset.text)
    return Account(tenant_id, key, model.json()["id"], dataset.json()["id"])


@pytest.fixture(scope="module")
def account(live: LiveServer) -> Account:
    return new_account(live)


@pytest.fixture
def client(live: LiveServer, account: Account) -> Iterator[httpx.Client]:
    with live.client(account.key) as c:
        yield c


def job_body(account: Account, **extra: Any) -> dict[str, Any]:
    return {"model_id": account.model_id, "dataset_id": account.dataset_id, "target": {"compression": 10}} | extra


def queued_messages(queue: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    """The Celery messages on the Redis "jobs" list that carry ``job_id``."""
    found = []
    for raw in queue.lrange(QUEUE, 0, -1):
        envelope = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        if args == [job_id]:
            found.append({"task": envelope["headers"]["task"], "args": args, "kwargs": kwargs})
    return found


def claim(live: LiveServer, job_id: str) -> int:
    with session_scope(live.factory) as session:
        attempt = jobstate.claim(session, uuid.UUID(job_id), "test-worker", 60)
    assert attempt is not None
    return attempt


# -- auth ----------------------------------------------------------------------------------------


def test_auth(live: LiveServer, account: Account) -> None:
    for headers in ({}, {"Authorization": "Bearer ns_wrong"}, {"Authorization": f"Basic {account.key}"}):
        with httpx.Client(base_url=live.url, headers=headers) as c:
            for method, path in (("GET", "/v1/models"), ("GET", f"/v1/jobs/{uuid.uuid4()}"), ("POST", "/v1/jobs")):
                r = c.request(method, path)
                assert r.status_code == 401, (headers, path, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["error"] == "unauthorized"
            r = c.post("/v1/models", files={"file": ("m.onnx", onnx_mlp())})
            assert r.status_code == 401

    tenant_id, key = live.new_tenant()
    with live.client(key) as c:
        assert c.get("/v1/models").status_code == 200
        with session_scope(live.factory) as session:
            key_id = session.scalar(select(ApiKey.id).where(ApiKey.tenant_id == tenant_id))
            assert key_id is not None and tenants.revoke_api_key(session, tenant_id, key_id)
        # a verified key is trusted for auth_cache_seconds by each API process; after that it is refused
        time.sleep(AUTH_CACHE_SECONDS + 0.1)
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["detail"] == "unknown or revoked API key"


# -- tenant isolation ----------------------------------------------------------------------------


def test_other_tenants_see_nothing(live: LiveServer, account: Account) -> None:
    with live.client(account.key) as c:
        job = c.post("/v1/jobs", json=job_body(account)).json()
    attempt = claim(live, job["id"])
    key_of_blob = f"jobs/{job['id']}/report.json"
    with live.app.state.storage.writer(key_of_blob) as f:
        f.write(b"{}")
    with session_scope(live.factory) as session:
        assert jobs.put_artifact(
            session, uuid.UUID(job["id"]), attempt, name="report.json", kind="report", uri=key_of_blob,
            size_bytes=2, sha256=hashlib.sha256(b"{}").hexdigest(),
        )  # fmt: skip

    other = new_account(live)
    m, d, j = account.model_id, account.dataset_id, job["id"]
    with live.client(other.key) as c:
        for method, path in [
            ("GET", f"/v1/models/{m}"),
            ("DELETE", f"/v1/models/{m}"),
            ("GET", f"/v1/datasets/{d}"),
            ("DELETE", f"/v1/datasets/{d}"),
            ("GET", f"/v1/jobs/{j}"),
            ("GET", f"/v1/jobs/{j}/progress"),
            ("GET", f"/v1/jobs/{j}/layers"),
            ("GET", f"/v1/jobs/{j}/frontier"),
            ("GET", f"/v1/jobs/{j}/logs"),
            ("PATCH", f"/v1/jobs/{j}"),
            ("POST", f"/v1/jobs/{j}/cancel"),
            ("DELETE", f"/v1/jobs/{j}"),
            ("GET", f"/v1/jobs/{j}/artifacts"),
            ("GET", f"/v1/jobs/{j}/artifacts/report.json"),
        ]:
            r = c.request(method, path, json={"name": "mine now"} if method == "PATCH" else None)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"] == "not_found"
        for body in (job_body(account), job_body(other, model_id=m), job_body(other, dataset_id=d)):
            assert c.post("/v1/jobs", json=body).status_code == 404
        assert all(
            x["id"] not in (m, d, j) for p in ("models", "datasets", "jobs") for x in c.get(f"/v1/{p}").json()["items"]
        )
    with live.client(account.key) as c:
        assert c.get(f"/v1/jobs/{j}").json()["state"] == "running"  # untouched by the other tenant's cancel
        assert c.get(f"/v1/jobs/{j}/artifacts/report.json").content == b"{}"


# -- creating jobs -------------------------------------------------------------------------------


def test_create_job_commits_then_enqueues(
    live: LiveServer, client: httpx.Client, account: Account, redis_queue: redis.Redis
) -> None:
    body = job_body(
        account,
        method="dns",
        target={"compression": 12.5, "max_accuracy_drop": 1.0},
        settings={
            "iterations": 2000,
            "lr": 0.01,
            "batch_size": 64,
            "seed": 3,
            "codec": "int8",
        },
    )
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] == "queued" and job["attempt"] == 0 and job["cancel_requested"] is False
    assert (job["model_id"], job["dataset_id"], job["method"]) == (account.model_id, account.dataset_id, "dns")
    assert job["target"] == {"compression": 12.5, "max_accuracy_drop": 1.0}
    assert job["settings"] == body["settings"] and job["total_iterations"] == 2000
    assert job["iteration"] == 0 and job["layers"] is None and job["finished_at"] is None
    assert queued_messages(redis_queue, job["id"]) == [{"task": RUN_JOB, "args": [job["id"]], "kwargs": {}}]
    assert client.get(f"/v1/jobs/{job['id']}").json() == job


def test_a_budget_only_job_has_a_frontier_from_the_start(live: LiveServer, account: Account) -> None:
    with live.client(account.key) as c:
        r = c.post("/v1/jobs", json=job_body(account, method="agp", target={"max_accuracy_drop": 1.5}))
        assert r.status_code == 202, r.text
        job = r.json()
        f = c.get(f"/v1/jobs/{job['id']}/frontier")
        assert f.status_code == 200, f.text
        assert f.json() | {"job_id": None} == {
            "job_id": None, "state": "queued", "max_accuracy_drop": 1.5, "reference_val_acc": None, "points": [],
            "chosen": None, "candidates": [], "verdict": None,
        }  # fmt: skip
        attempt = claim(live, job["id"])
        point = {"rung": 0, "iteration": 50, "compression": 2.0, "val_acc": 90.5, "test_acc": None,
                 "within_budget": True}  # fmt: skip
        with session_scope(live.factory) as session:
            assert jobstate.update_live(session, uuid.UUID(job["id"]), attempt, frontier={"points": [point]})
        f = c.get(f"/v1/jobs/{job['id']}/frontier").json()
        assert f["state"] == "running" and f["points"] == [{k: v for k, v in point.items() if k != "rung"}]


def test_fixed_crates_job(client: httpx.Client, account: Account) -> None:
    body = job_body(
        account, method="dns-fixed-crates", target={"max_accuracy_drop": 2}, settings={"crates": {"gemm0": 0.5}}
    )  # gemm0: the ONNX MLP's first Gemm, as the upload named its layers
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["target"] == {"max_accuracy_drop": 2} and r.json()["settings"] == {"crates": {"gemm0": 0.5}}
    body.pop("target")
    assert client.post("/v1/jobs", json=body).status_code == 202


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"method": "magic"}, "method"),
        ({"target": {"compression": 0.5}}, "compression"),
        ({"target": {"compression": 5, "layer_kept": {"fc1": 0.1}}}, "not both"),
        ({"target": {"layer_kept": {"fc1": 1.5}}}, "layer_kept"),
        ({"target": {}}, "needs a target"),
        ({"method": "one-shot", "target": {"max_accuracy_drop": 1}}, "only dns, agp and han search"),
        ({"target": None}, "needs a target"),
        ({"method": "dns-fixed-crates"}, "only max_accuracy_drop"),
        ({"settings": {"gamma": -1}}, "gamma"),
        ({"settings": {"gamma": 0.001, "power": 2}}, "settings gamma, power are the dns-fixed-crates method's only"),
        ({"method": "agp", "settings": {"crates": {"fc1": 1}}}, "settings crates are the dns-fixed-crates"),
        ({"settings": {"iterations": 0}}, "iterations"),
        ({"settings": {"iterations": 10_000_001}}, "iterations"),
        ({"settings": {"codec": "zip"}}, "codec"),
        ({"settings": {"lr": 0}}, "lr"),
        ({"settings": {"iterations": 10, "iter_stop": 20}}, "iter_stop"),
        ({"settings": {"warp": 9}}, "warp"),
        ({"extra": 1}, "extra"),
        ({"model_id": "not-a-uuid"}, "model_id"),
    ],
)
def test_job_validation(client: httpx.Client, account: Account, change: dict[str, Any], where: str) -> None:
    r = client.post("/v1/jobs", json=job_body(account) | change)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_request" and body["fields"]
    assert where in json.dumps(body)


def test_nan_and_infinity_are_refused(client: httpx.Client, account: Account) -> None:
    for settings in ('{"crates": {"W1": NaN}}', '{"gamma": Infinity}', '{"lr": NaN}'):
        body = json.dumps(job_body(account, settings="SETTINGS")).replace('"SETTINGS"', settings)
        r = client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["fields"][0]["loc"][:2] == ["body", "settings"], r.text


def test_malformed_and_oversized_json(client: httpx.Client) -> None:
    r = client.post("/v1/jobs", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    r = client.post("/v1/jobs", content=b"[" + b"1," * 600_000 + b"1]", headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


def test_idempotency_key(client: httpx.Client, account: Account, redis_queue: redis.Redis) -> None:
    key = f"create-{uuid.uuid4()}"
    first = client.post("/v1/jobs", json=job_body(account), headers={"Idempotency-Key": key})
    again = client.post("/v1/jobs", json=job_body(account), headers={"Idempotency-Key": key})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert first.json()["idempotency_key"] == key
    assert len(queued_messages(redis_queue, first.json()["id"])) == 1
    listed = client.get("/v1/jobs", params={"limit": 1000}).json()["items"]
    assert [j["id"] for j in listed].count(first.json()["id"]) == 1

    changed = client.post("/v1/jobs", json=job_body(account, method="agp"), headers={"Idempotency-Key": key})
    assert changed.status_code == 409 and changed.json()["error"] == "conflict"
    other = client.post("/v1/jobs", json=job_body(account), headers={"Idempotency-Key": key + "-2"})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert client.post("/v1/jobs", json=job_body(account), headers={"Idempotency-Key": "k" * 256}).status_code == 422


# -- reading jobs --------------------------------------------------------------------------------


def test_list_with_state_filter_and_pages(live: LiveServer) -> None:
    account = new_account(live)
    with live.client(account.key) as c:
        ids = [c.post("/v1/jobs", json=job_body(account)).json()["id"] for _ in range(5)]
        claim(live, ids[1])
        claim(live, ids[3])
        assert c.post(f"/v1/jobs/{ids[4]}/cancel").status_code == 202

        everything = c.get("/v1/jobs").json()
        assert everything["total"] == 5 and [j["id"] for j in everything["items"]] == ids[::-1]
        running = c.get("/v1/jobs", params={"state": "running"}).json()
        assert running["total"] == 2 and [j["id"] for j in running["items"]] == [ids[3], ids[1]]
        queued = c.get("/v1/jobs", params={"state": "queued", "limit": 1, "offset": 1}).json()
        assert (queued["total"], queued["limit"], queued["offset"]) == (2, 1, 1)
        assert [j["id"] for j in queued["items"]] == [ids[0]]
        assert c.get("/v1/jobs", params={"state": "cancelled"}).json()["total"] == 1
        assert c.get("/v1/jobs", params={"state": "paused"}).status_code == 422
        assert c.get("/v1/jobs", params={"limit": 1001}).status_code == 422
        assert c.get("/v1/jobs", params={"offset": -1}).status_code == 422


def test_names_tags_and_the_filters_of_the_list(live: LiveServer) -> None:
    account = new_account(live)
    with live.client(account.key) as c:
        sweep = [
            c.post("/v1/jobs", json=job_body(account, name=f"  sweep {i} ", tags=["sweep", "lenet", "sweep"])).json()
            for i in range(3)
        ]
        assert sweep[0]["name"] == "sweep 0" and sweep[0]["tags"] == ["sweep", "lenet"]  # trimmed, no repeats
        agp = c.post("/v1/jobs", json=job_body(account, method="agp", name="AGP baseline")).json()
        plain = c.post("/v1/jobs", json=job_body(account)).json()
        assert plain["name"] is None and plain["tags"] == []
        claim(live, sweep[1]["id"])

        def ids(**params: Any) -> list[str]:
            page = c.get("/v1/jobs", params=params).json()
            assert page["total"] == len(page["items"]), page
            return [j["id"] for j in page["items"]]

        assert ids(name="SWEEP") == [j["id"] for j in sweep[::-1]]
        assert ids(tag="sweep", state="running") == [sweep[1]["id"]]
        assert ids(state=["running", "queued"], method="agp") == [agp["id"]]
        assert ids(tag="lenet", name="2") == [sweep[2]["id"]]
        assert ids(model_id=account.model_id, method="dns", tag="nope") == []
        assert ids(dataset_id=account.dataset_id) == [j["id"] for j in (plain, agp, *sweep[::-1])]
        for bad in ({"method": "prune"}, {"model_id": "x"}, {"tag": "a b"}, {"name": "n" * 256}, {"name": "a\x00"}):
            assert c.get("/v1/jobs", params=bad).status_code == 422, bad

        r = c.patch(f"/v1/jobs/{plain['id']}", json={"name": "renamed", "tags": ["b", "a", "b"]})
        assert r.status_code == 200 and (r.json()["name"], r.json()["tags"]) == ("renamed", ["b", "a"])
        assert c.get(f"/v1/jobs/{plain['id']}").json()["name"] == "renamed"  # the polled route sees it at once
        r = c.patch(f"/v1/jobs/{plain['id']}", json={"tags": []})
        assert (r.json()["name"], r.json()["tags"]) == ("renamed", [])
        r = c.patch(f"/v1/jobs/{plain['id']}", json={"name": None})
        assert r.json()["name"] is None and c.get(f"/v1/jobs/{plain['id']}").json()["name"] is None
        bad_bodies = ({"tags": None}, {"tags": ["x y"]}, {"name": ""}, {"name": "a\x00b"}, {"state": "succeeded"},
                      {"tags": ["t"] * 33})  # fmt: skip
        for bad_body in bad_bodies:
            r = c.patch(f"/v1/jobs/{plain['id']}", json=bad_body)
            assert r.status_code == 422 and r.json()["error"] == "invalid_request", bad_body
        assert c.patch(f"/v1/jobs/{uuid.uuid4()}", json={"name": "x"}).status_code == 404
        for bad_job in ({"tags": ["ok", ""]}, {"name": "x" * 256}, {"tags": "sweep"}):
            assert c.post("/v1/jobs", json=job_body(account, **bad_job)).status_code == 422, bad_job


def test_a_job_s_log_is_read_in_pages_by_its_owner_only(
    live: LiveServer, client: httpx.Client, account: Account
) -> None:
    job_id = client.post("/v1/jobs", json=job_body(account)).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}/logs").json() == {"items": [], "next_after": 0}
    attempt = claim(live, job_id)
    with session_scope(live.factory) as session:
        lines = [jobs.LogLine("INFO", "netsurgery.worker", f"line {i}") for i in range(5)]
        lines.append(jobs.LogLine("ERROR", "netsurgery.worker", "internal error\nTraceback (most recent call last):"))
        assert jobs.add_logs(session, uuid.UUID(job_id), attempt, lines)
    first = client.get(f"/v1/jobs/{job_id}/logs", params={"limit": 4}).json()
    assert [x["message"] for x in first["items"]] == ["line 0", "line 1", "line 2", "line 3"]
    assert first["items"][0]["attempt"] == attempt and first["items"][0]["level"] == "INFO"
    rest = client.get(f"/v1/jobs/{job_id}/logs", params={"after": first["next_after"]}).json()
    assert [x["level"] for x in rest["items"]] == ["INFO", "ERROR"] and "Traceback" in rest["items"][1]["message"]
    again = client.get(f"/v1/jobs/{job_id}/logs", params={"after": rest["next_after"]}).json()
    assert again == {"items": [], "next_after": rest["next_after"]}
    assert client.get(f"/v1/jobs/{job_id}/logs", params={"after": -1}).status_code == 422
    assert client.get(f"/v1/jobs/{uuid.uuid4()}/logs").status_code == 404


def test_progress_and_layers(live: LiveServer, client: httpx.Client, account: Account) -> None:
    job_id = client.post("/v1/jobs", json=job_body(account, settings={"iterations": 300})).json()["id"]
    attempt = claim(live, job_id)
    with session_scope(live.factory) as session:
        points = [ProgressSample(i, loss=1.0 / (i + 1), compression=1 + i / 100) for i in range(0, 300, 10)]
        points[-1] = ProgressSample(290, loss=0.01, val_accuracy=97.5, compression=3.9)
        assert jobs.add_progress(session, uuid.UUID(job_id), attempt, points)
        layers = [LayerSample(i, name, 100 - i // 10, 100) for i in (100, 200, 300) for name in ("W1", "W2", "W3")]
        assert jobs.add_layer_points(session, uuid.UUID(job_id), attempt, layers)

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["state"], job["attempt"], job["iteration"], job["total_iterations"]) == ("running", 1, 290, 300)
    assert (job["loss"], job["val_accuracy"], job["compression"]) == (0.01, 97.5, 3.9)
    assert job["layers"] == {
        "iteration": 300,
        "layers": [{"layer": n, "kept": 70, "total": 100} for n in ("W1", "W2", "W3")],
    }
    assert job["started_at"] is not None

    page = client.get(f"/v1/jobs/{job_id}/progress", params={"limit": 20}).json()
    assert [p["iteration"] for p in page["items"]] == list(range(0, 200, 10)) and page["next_after"] == 190
    rest = client.get(f"/v1/jobs/{job_id}/progress", params={"after": page["next_after"]}).json()
    assert [p["iteration"] for p in rest["items"]] == list(range(200, 300, 10))
    assert rest["items"][-1]["val_accuracy"] == 97.5 and rest["items"][-1]["attempt"] == 1
    done = client.get(f"/v1/jobs/{job_id}/progress", params={"after": rest["next_after"]}).json()
    assert done == {"items": [], "next_after": 290}

    first = client.get(f"/v1/jobs/{job_id}/layers", params={"limit": 2}).json()
    assert [s["iteration"] for s in first["items"]] == [100, 200] and first["next_after"] == 200
    assert first["items"][0]["layers"] == [{"layer": n, "kept": 90, "total": 100} for n in ("W1", "W2", "W3")]
    last = client.get(f"/v1/jobs/{job_id}/layers", params={"after": 200}).json()
    assert [s["iteration"] for s in last["items"]] == [300]


def test_cancel(live: LiveServer, client: httpx.Client, account: Account) -> None:
    queued = client.post("/v1/jobs", json=job_body(account)).json()
    r = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 202
    assert (r.json()["state"], r.json()["cancel_requested"]) == ("cancelled", True)
    assert r.json()["finished_at"] is not None
    again = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"] == "conflict"

    running = client.post("/v1/jobs", json=job_body(account)).json()
    claim(live, running["id"])
    r = client.post(f"/v1/jobs/{running['id']}/cancel")
    assert r.status_code == 202
    assert (r.json()["state"], r.json()["cancel_requested"]) == ("running", True)
    assert client.delete(f"/v1/jobs/{running['id']}").status_code == 409
    assert client.post(f"/v1/jobs/{uuid.uuid4()}/cancel").status_code == 404


# -- artifacts -----------------------------------------------------------------------------------


def test_artifacts(live: LiveServer, client: httpx.Client, account: Account) -> None:
    job_id = client.post("/v1/jobs", json=job_body(account)).json()["id"]
    attempt = claim(live, job_id)
    content = bytes(range(256)) * 40  # 10,240 bytes
    digest = hashlib.sha256(content).hexdigest()
    stored = Path(live.settings.data_dir) / "artifact.bin"
    stored.write_bytes(content)
    key = f"jobs/{job_id}/weights.sparse.safetensors"
    live.app.state.storage.put_file(key, stored)
    with session_scope(live.factory) as session:
        assert jobs.put_artifact(
            session, uuid.UUID(job_id), attempt, name="weights.sparse.safetensors", kind="sparse", uri=key,
            size_bytes=len(content), sha256=digest,
        )  # fmt: skip

    listing = client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
    assert [(a["name"], a["kind"], a["size_bytes"], a["sha256"]) for a in listing] == [
        ("weights.sparse.safetensors", "sparse", len(content), digest)
    ]
    url = f"/v1/jobs/{job_id}/artifacts/weights.sparse.safetensors"

    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == content
    assert hashlib.sha256(whole.content).hexdigest() == digest
    assert whole.headers["etag"] == f'"{digest}"' and whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-length"] == str(len(content))

    for tags in (f'"{digest}"', f'W/"{digest}"', f'"other", "{digest}"', "*"):
        r = client.get(url, headers={"If-None-Match": tags})
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == f'"{digest}"'
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200

    for spec, first, last in (("10-19", 10, 19), ("-5", 10235, 10239), ("10000-99999", 10000, 10239), ("0-0", 0, 0)):
        r = client.get(url, headers={"Range": f"bytes={spec}"})
        assert r.status_code == 206, spec
        assert r.content == content[first : last + 1]
        assert r.headers["content-range"] == f"bytes {first}-{last}/{len(content)}"
        assert r.headers["content-length"] == str(last - first + 1)
    r = client.get(url, headers={"Range": f"bytes={len(content)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(content)}"
    assert r.json()["error"] == "range_not_satisfiable"
    assert client.get(url, headers={"Range": "bytes=-0"}).status_code == 416
    for ignored in ("bytes=0-1,5-6", "lines=1-2", "bytes=5-1", "bytes=x-"):
        r = client.get(url, headers={"Range": ignored})
        assert r.status_code == 200 and r.content == content, ignored
    r = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == content
    r = client.get(url, headers={"Range": "bytes=0-9", "If-Range": f'"{digest}"'})
    assert r.status_code == 206 and r.content == content[:10]

    assert client.get(f"/v1/jobs/{job_id}/artifacts/nope").status_code == 404
    assert client.get(f"/v1/jobs/{uuid.uuid4()}/artifacts").status_code == 404


# -- probes and failures of dependencies ---------------------------------------------------------


def test_probes(live: LiveServer) -> None:
    with httpx.Client(base_url=live.url) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json() == {"status": "ok", "database": True, "broker": True}
        spec = c.get("/openapi.json").json()
        assert c.get("/docs").status_code == 200
        assert c.get("/v1/nothing").json()["error"] == "not_found"
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            if path.startswith("/v1"):
                assert {"401", "422", "503"} <= set(op["responses"]), (method, path)


def test_broker_down(live: LiveServer, account: Account, tmp_path: Path) -> None:
    """An unreachable broker: not ready, but a job is still accepted, committed and left queued."""
    settings = http_settings(tmp_path, live.settings.database_url, f"redis://127.0.0.1:{closed_port()}/0")
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json() | {"detail": ""} == {"error": "unavailable", "detail": "", "database": True, "broker": False}
        r = c.post("/v1/jobs", json=job_body(account), headers={"Authorization": f"Bearer {account.key}"})
        assert r.status_code == 202 and r.json()["state"] == "queued"
    with live.client(account.key) as main:
        assert main.get(f"/v1/jobs/{r.json()['id']}").json()["state"] == "queued"


def test_database_down(tmp_path: Path) -> None:
    """An unreachable database: 503 from every route that needs it, quickly; /healthz still answers."""
    settings = http_settings(tmp_path, f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/x", REDIS_TEST_URL)
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["database"] is False and r.json()["broker"] is True
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/datasets"), ("GET", f"/v1/jobs/{uuid.uuid4()}")):
            r = c.request(method, path, headers={"Authorization": "Bearer ns_anything"}, json={"builtin": "digits"})
            assert r.status_code == 503, r.text
            assert r.json() == {"error": "unavailable", "detail": "the database cannot be reached; retry later"}


def test_found_by_schemathesis(live: LiveServer, account: Account) -> None:
    """Regressions: an offset past bigint was a 500; a 405 named only the first route's method."""
    with live.client(account.key) as c:
        r = c.get("/v1/models", params={"offset": 10**22})
        assert r.status_code == 422 and r.json()["error"] == "invalid_request"
        r = c.put(f"/v1/jobs/{uuid.uuid4()}")
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PATCH"
        r = c.post("/v1/jobs", content=b"\xff\x00not json", headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 422)


def test_layer_names_and_patterns_are_checked_against_the_model_at_submit(
    live: LiveServer, client: httpx.Client, account: Account, redis_queue: redis.Redis
) -> None:
    layers = client.get(f"/v1/models/{account.model_id}").json()["layers"]
    assert layers and all(isinstance(n, str) for n in layers)
    before = client.get("/v1/jobs").json()["total"]
    bad: list[tuple[dict[str, Any], str, str, str]] = [
        ({"target": {"layer_kept": {layers[0]: 0.1, "fc9": 0.2}}}, "target", "layer_kept", "'fc9'"),
        ({"settings": {"include": ["conv*"]}}, "settings", "include", "'conv*'"),
        ({"settings": {"exclude": [layers[0], "nothing"]}}, "settings", "exclude", "'nothing'"),
        ({"method": "dns-fixed-crates", "target": None, "settings": {"crates": {"fc*x": 1.0}}}, "settings", "crates",
         "'fc*x'"),
    ]  # fmt: skip
    for change, part, key, pattern in bad:
        r = client.post("/v1/jobs", json=job_body(account) | change)
        assert r.status_code == 422, (change, r.text)
        body = r.json()
        assert body["error"] == "invalid_request" and pattern in body["detail"], body
        assert all(name in body["detail"] for name in layers)  # the model's layers are named, to pick from
        assert [f["loc"] for f in body["fields"]] == [["body", part, key]]
    assert client.get("/v1/jobs").json()["total"] == before  # nothing was created or queued
    good: list[dict[str, Any]] = [
        {"target": {"layer_kept": {layers[0]: 0.1}}},
        {"settings": {"include": [layers[0][:1] + "*"], "exclude": [layers[-1]]}},
    ]
    for change in good:
        r = client.post("/v1/jobs", json=job_body(account) | change)
        assert r.status_code == 202, (change, r.text)
