"""The client commands end to end: ``netsurgery login``, uploads, ``submit --watch``, ``jobs``, ``download``,
against a real API and Celery worker (Postgres, Redis), and the one-line errors a person sees.

The service runs on a Redis database index of its own (``NETSURGERY_TEST_REDIS_CLI``), so this module
can run beside the other end-to-end tests.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from dns_core import models
from dns_core.artifacts import REPORT_FILES
from dns_core.io import save_model
from netsurgery import client_cli
from netsurgery.cli import main
from netsurgery.common import CliError
from service.migrate import upgrade
from tests.api.conftest import _postgres_database
from tests.e2e.conftest import Service, _redis, free_port, running_service

pytestmark = pytest.mark.slow

REDIS_URL = os.environ.get("NETSURGERY_TEST_REDIS_CLI", "redis://127.0.0.1:6379/10")
UNKNOWN_JOB = "00000000-0000-0000-0000-000000000000"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """API (uvicorn) + one worker process on a fresh Postgres database and this module's Redis database."""
    broker = _redis(REDIS_URL)
    broker.flushdb()
    with _postgres_database() as db_url:
        upgrade(db_url)
        try:
            with running_service(tmp_path_factory.mktemp("service"), db_url, REDIS_URL, "cli", "cli") as svc:
                yield svc
        finally:
            broker.flushdb()


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where this test's config file goes (not there yet); no NETSURGERY_URL / _API_KEY from outside."""
    path = tmp_path / "conf" / "netsurgery" / "config.json"
    monkeypatch.setenv("NETSURGERY_CONFIG", str(path))
    monkeypatch.delenv("NETSURGERY_URL", raising=False)
    monkeypatch.delenv("NETSURGERY_API_KEY", raising=False)
    return path


@pytest.fixture
def logged_in(service: Service, config: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert main(["login", "--url", service.url, "--key", service.key]) == 0
    capsys.readouterr()
    return config


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def zoo_file(path: Path) -> Path:
    torch.manual_seed(0)
    save_model(path, models.build("lenet-300-100"), "lenet-300-100")
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -------------------------------------------------------------------------------------------- login


def test_login_stores_the_key_0600_and_a_wrong_key_stores_nothing(
    service: Service, config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rc, out, err = run(capsys, "login", "--url", service.url, "--key", "ns_wrong")
    assert (rc, out) == (2, "")
    assert err == f"netsurgery: the service refused the API key (401): nothing was saved to {config}\n"
    assert not config.exists() and not config.parent.exists()

    rc, out, err = run(capsys, "login", "--url", service.url + "/", "--key", service.key)
    assert (rc, err) == (0, "")
    assert out == f"logged in to {service.url}; the URL and key are saved in {config} (readable only by you)\n"
    assert json.loads(config.read_text()) == {"url": service.url, "key": service.key}
    assert mode(config) == 0o600 and mode(config.parent) == 0o700
    assert [p.name for p in config.parent.iterdir()] == ["config.json"]  # no temporary file left behind

    config.chmod(0o644)  # loosened by someone: logging in again makes it private again
    monkeypatch.setattr(sys, "stdin", io.StringIO(service.key + "\n"))  # the key piped in, not on the command line
    rc, out, err = run(capsys, "login", "--url", service.url)
    assert rc == 0 and mode(config) == 0o600
    assert json.loads(config.read_text())["key"] == service.key

    rc, out, err = run(capsys, "jobs")
    assert (rc, err) == (0, "")

    # the environment overrides the file
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("NETSURGERY_URL", dead)
    rc, out, err = run(capsys, "jobs")
    assert (
        rc == 2
        and err == f"netsurgery: cannot reach the netsurgery service at {dead} (is `netsurgery serve` running?)\n"
    )
    monkeypatch.delenv("NETSURGERY_URL")
    monkeypatch.setenv("NETSURGERY_API_KEY", "ns_revoked")
    rc, out, err = run(capsys, "jobs")
    assert rc == 2 and err == "netsurgery: the service refused the API key (401): check it with `netsurgery login`\n"


def test_login_refuses_a_bad_url_and_an_unreachable_service(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "login", "--url", "localhost:8000", "--key", "k") == (
        2, "", "netsurgery: 'localhost:8000' is not a service URL (like http://127.0.0.1:8000)\n",
    )  # fmt: skip
    dead = f"http://127.0.0.1:{free_port()}"
    rc, out, err = run(capsys, "login", "--url", dead, "--key", "k")
    assert (rc, out) == (2, "")
    assert err == (
        f"netsurgery: cannot reach the netsurgery service at {dead} (is `netsurgery serve` running?); "
        "nothing was saved\n"
    )
    assert not config.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["jobs"],
        ["watch", UNKNOWN_JOB],
        ["download", UNKNOWN_JOB],
        ["submit", UNKNOWN_JOB, UNKNOWN_JOB, "--target", "5"],
        ["upload-data", "--builtin", "digits"],
    ],
)
def test_commands_need_a_login(argv: list[str], config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, *argv) == (2, "", "netsurgery: not logged in: run `netsurgery login`\n")


def test_a_broken_config_file_is_one_line(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config.parent.mkdir(parents=True)
    config.write_text("{not json")
    assert run(capsys, "jobs") == (
        2, "", f"netsurgery: the config file {config} is not a netsurgery config: run `netsurgery login` again\n",
    )  # fmt: skip


def test_the_default_config_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NETSURGERY_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert client_cli.config_path() == tmp_path / "xdg" / "netsurgery" / "config.json"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert client_cli.config_path() == tmp_path / "home" / ".config" / "netsurgery" / "config.json"


# ------------------------------------------------------------------------------------ the happy path


def test_upload_submit_watch_list_download(
    service: Service, logged_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = zoo_file(tmp_path / "lenet.safetensors")
    rc, out, err = run(capsys, "upload-model", str(weights), "--arch", "lenet-300-100", "--name", "my lenet")
    assert (rc, err) == (0, "")
    model_id = re.fullmatch(r"model (\S+)", out.splitlines()[0])[1]  # type: ignore[index]
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert out.splitlines()[1:] == [
        "  name          my lenet",
        "  format        safetensors",
        "  architecture  lenet-300-100",
        "  parameters    266,610",
        f"  size          {weights.stat().st_size:,} bytes",
        f"  sha256        {sha}",
    ]

    rc, out, err = run(capsys, "upload-data", "--builtin", "digits")
    assert (rc, err) == (0, "")
    dataset_id = re.fullmatch(r"dataset (\S+)", out.splitlines()[0])[1]  # type: ignore[index]
    assert "  kind          built-in digits" in out.splitlines()

    rc, out, err = run(capsys, "submit", model_id, dataset_id, "--target", "5", "--max-drop", "100",
                       "--iterations", "300", "--seed", "0", "--codec", "int8", "--watch", "--name", "sweep-a",
                       "--tag", "lenet", "--tag", "int8")  # fmt: skip
    assert (rc, err) == (0, ""), out
    job_id = re.match(r"job (\S+) queued: dns to 5x within 100 pp, 300 iterations\n", out)[1]  # type: ignore[index]
    assert out.count(f"job {job_id} queued") == 1 and f"job {job_id} running\n" in out  # each state once
    # not a terminal (captured): the evaluations come as plain lines while the job runs
    assert re.search(rf"job {job_id} iteration [\d,]+/300, \d+\.\d\dx, validation \d+\.\d\d%\n", out), out
    assert re.search(r"succeeded .* 300/300 .*val \d+\.\d\d%\s+\d+\.\dx", out), out  # the final progress bar
    assert re.search(r"│ fc1 +│ +\d[\d,]* │ 235,500 │ +\d+\.\d\d │\n", out), out  # the per-layer table
    done = re.search(rf"job {job_id} succeeded: (\d+\.\d)x, validation accuracy \d+\.\d\d%, 300 iterations", out)
    assert done and 4.5 <= float(done[1]) <= 5.5, out
    assert re.search(r"\n  validation  \d+\.\d\d% → \d+\.\d\d% \([+-]\d+\.\d\d points\)\n", out), out
    assert "\n  budget      100 points on validation: met\n" in out
    on_disk = r"\n  on disk     1,06\d,\d{3} → [\d,]+ bytes \(\d+\.\dx smaller, model.sparse.safetensors\)\n"
    assert re.search(on_disk, out), out

    rc, out, err = run(capsys, "jobs")
    assert (rc, err) == (0, "")
    row = next(line for line in out.splitlines() if job_id in line)
    cells = (
        r"{} │ sweep-a +│ succeeded │ dns +│ +300/300 │ +{}x │ +\d+\.\d\d% │ +[+-]\d+\.\d\d │ lenet, int8 +│ \d{{4}}-"
    )
    assert re.search(cells.format(job_id, done[1]), row), row
    assert run(capsys, "jobs", "--state", "failed") == (0, "no failed jobs\n", "")
    assert run(capsys, "jobs", "--tag", "nothing-has-it") == (0, "no jobs match\n", "")
    for filters in (["--tag", "int8"], ["--name", "SWEEP"], ["--model", model_id[:8], "--method", "dns"]):
        rc, out, err = run(capsys, "jobs", *filters)
        assert rc == 0 and job_id in out, (filters, out, err)

    # names and tags change later; the log tells what the worker did
    rc, out, err = run(capsys, "label", job_id[:8], "--name", "best", "--tags", "keep,lenet,keep")
    assert (rc, out, err) == (0, f"job {job_id}: name best, tags keep, lenet\n", "")
    assert run(capsys, "label", job_id, "--clear-name", "--tags", "")[1] == f"job {job_id}: name -, tags -\n"
    assert run(capsys, "label", job_id)[0] == 2
    rc, out, err = run(capsys, "logs", job_id[:6])
    assert rc == 0 and err == "", err
    lines = out.splitlines()
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO    job \S+: attempt 1 on ", lines[0]), lines[:3]
    assert any("iteration 300 of 300: validation accuracy" in line for line in lines), out
    assert lines[-1].endswith(f"INFO    job {job_id}: succeeded"), lines[-3:]
    rc, followed, err = run(capsys, "logs", job_id, "--follow", "--utc")  # an ended job: prints it all, then stops
    assert rc == 0 and len(followed.splitlines()) == len(lines) and followed.splitlines()[0][:4] == lines[0][:4]

    out_dir = tmp_path / "dl"
    rc, out, err = run(capsys, "download", job_id, "--out", str(out_dir))
    assert (rc, err) == (0, "")
    with service.client() as c:
        listed = {a["name"]: a for a in c.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
        candidates = {f["file"] for f in c.get(f"/v1/jobs/{job_id}/frontier").json()["candidates"][1:]}
    assert candidates  # a compression with a budget: the lower rungs that held are candidates too
    assert set(listed) == {"model.safetensors", "model.sparse.safetensors", "model.sparse.int8.safetensors",
                           *REPORT_FILES, *candidates}  # fmt: skip
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(listed)
    lines = out.splitlines()
    assert len(lines) == len(listed)
    for name, art in listed.items():
        path = out_dir / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == art["sha256"]
        assert any(re.fullmatch(rf"{re.escape(str(path))} +{art['size_bytes']:,} bytes  sha256 verified", x)
                   for x in lines), out  # fmt: skip


def test_submit_with_only_a_budget_searches_and_frontier_shows_it(
    service: Service, logged_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "upload-model", str(zoo_file(tmp_path / "m.safetensors")), "--arch", "lenet-300-100",
                     "-q")  # fmt: skip
    model_id = out.strip()
    rc, out, _ = run(capsys, "upload-data", "--builtin", "digits", "-q")
    dataset_id = out.strip()
    rc, out, err = run(capsys, "submit", model_id, dataset_id, "--max-drop", "100", "--iterations", "400",
                       "--watch")  # fmt: skip
    assert (rc, err) == (0, ""), out
    job_id = re.match(r"job (\S+) queued: dns, the highest compression within 100 pp, 400 iterations\n", out)[1]  # type: ignore[index]
    assert re.search(r"\d+\.\dx is the highest compression found within the 100-point budget", out), out
    assert f"`netsurgery frontier {job_id}`" in out
    rc, out, err = run(capsys, "frontier", job_id)
    assert (rc, err) == (0, ""), out
    assert re.search(r"│ +\d+ │ +2\.0x │ +\d+\.\d\d │ +│ +yes │", out), out  # the first rung, within budget
    assert "chosen: " in out and "in model.sparse.safetensors" in out and "candidate: " in out
    rc, out, _ = run(capsys, "frontier", job_id, "--json")
    frontier = json.loads(out)
    assert frontier["state"] == "succeeded" and frontier["chosen"]["compression"] > 2
    rc, out, err = run(capsys, "submit", model_id, dataset_id, "--method", "one-shot", "--max-drop", "1")
    assert rc == 2 and "only dns, agp and han search" in err
    # the service's refusals name the flags that set the fields, not the API's field paths
    rc, out, err = run(capsys, "submit", model_id, dataset_id, "--target", "5", "--iterations", "0", "--lr", "0")
    assert rc == 2 and "--iterations: Input should be greater than or equal to 1" in err, err
    assert "--lr: Input should be greater than 0" in err and "body.settings" not in err, err
    rc, out, err = run(capsys, "submit", model_id, dataset_id, "--target", "0.5")
    assert rc == 2 and "--target: Input should be greater than or equal to 1" in err, err


def test_models_datasets_cancel_rm_and_id_prefixes(
    service: Service, logged_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = str(zoo_file(tmp_path / "m.safetensors"))
    rc, out, _ = run(capsys, "upload-model", weights, "--arch", "lenet-300-100", "--name", "lenet for rm", "--new",
                     "-q")  # fmt: skip
    model_id = out.strip()
    # the same bytes again: the service answers with the model there (the first of them), stores nothing
    with service.client() as c:
        before = c.get("/v1/models").json()["total"]
        rc, out, err = run(capsys, "upload-model", weights, "--arch", "lenet-300-100", "--name", "another name")
        assert (rc, err) == (0, "") and "you uploaded these bytes before, as '" in out, out
        assert "'another name'" not in out and c.get("/v1/models").json()["total"] == before
    _, out, _ = run(capsys, "upload-data", "--builtin", "digits", "--name", "digits for rm", "-q")
    dataset_id = out.strip()
    _, out, _ = run(capsys, "upload-data", "--builtin", "digits", "--name", "spare digits", "-q")
    spare_id = out.strip()

    rc, out, err = run(capsys, "models", "--limit", "1000")
    assert (rc, err) == (0, "")
    row = next(line for line in out.splitlines() if model_id in line)
    assert re.search(r"│ lenet for rm +│ safetensors │ lenet-300-100 +│ +266,610 │ +[\d,]+ │ \d{4}-", row), row
    rc, out, err = run(capsys, "datasets", "--limit", "1000")
    assert (rc, err) == (0, "")
    row = next(line for line in out.splitlines() if dataset_id in line)
    assert re.search(r"│ digits for rm +│ built-in digits │", row), row

    # a job that runs long enough to be cancelled, named by the first 8 characters of its id (as the dashboard)
    _, out, _ = run(capsys, "submit", model_id[:8], dataset_id[:8], "--target", "4", "--iterations", "1000000", "-q")
    job_id = out.strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", job_id)
    rc, out, err = run(capsys, "cancel", job_id[:8])
    assert rc == 0 and out.startswith(f"job {job_id} "), (out, err)
    with service.client() as c:
        deadline = time.monotonic() + 60
        while c.get(f"/v1/jobs/{job_id}").json()["state"] != "cancelled":
            assert time.monotonic() < deadline
            time.sleep(0.2)
    rc, out, err = run(capsys, "cancel", job_id)
    assert rc == 2 and "has already ended" in err

    # prefixes: too short, no match, a whole id of another kind
    assert run(capsys, "watch", "ab")[0] == 2
    rc, _, err = run(capsys, "download", "ffffffff")
    assert rc == 2 and "no job of yours has an id starting with 'ffffffff'" in err

    # rm: a model a job uses cannot go; the job, then the model and the data sets can
    rc, _, err = run(capsys, "rm", "--model", model_id[:8])
    assert rc == 2 and f"model {model_id} cannot be deleted" in err
    assert run(capsys, "rm", job_id[:8]) == (0, f"deleted job {job_id}\n", "")
    assert run(capsys, "rm", "--model", model_id) == (0, f"deleted model {model_id}\n", "")
    rc, out, err = run(capsys, "rm", "--dataset", dataset_id[:8], spare_id)
    assert (rc, err) == (0, "") and out == f"deleted dataset {dataset_id}\ndeleted dataset {spare_id}\n"
    with service.client() as c:
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404
        assert c.get(f"/v1/models/{model_id}").status_code == 404


def test_upload_data_file_and_a_job_that_fails(
    service: Service, logged_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = np.random.default_rng(0)
    np.savez(tmp_path / "wrong.npz", inputs=g.normal(size=(64, 3, 5, 5)).astype(np.float32),
             targets=g.integers(0, 10, 64))  # fmt: skip
    rc, out, err = run(capsys, "upload-data", str(tmp_path / "wrong.npz"), "--name", "wrong shape", "-q")
    assert rc == 0 and err == ""
    dataset_id = out.strip()
    rc, out, err = run(capsys, "upload-model", str(zoo_file(tmp_path / "m.safetensors")), "-q")  # arch from header
    model_id = out.strip()
    rc, out, err = run(capsys, "submit", model_id, dataset_id, "--target", "5", "--iterations", "50", "-q")
    job_id = out.strip()
    assert rc == 0 and re.fullmatch(r"[0-9a-f-]{36}", job_id)
    rc, out, err = run(capsys, "watch", job_id)
    assert rc == 1
    assert re.fullmatch(rf"netsurgery: job {job_id} failed: .+\n", err), err
    assert "Traceback" not in err
    rc, out, err = run(capsys, "download", job_id)
    assert rc == 2 and err.startswith(f"netsurgery: cannot download job {job_id}: it failed (")
    assert err.endswith(") and has no files\n")
    rc, out, err = run(capsys, "logs", job_id)
    assert rc == 0 and "ERROR   job " in out and "failed: " in out and "do not fit the model" in out, out


def test_every_flag_says_what_it_does_and_its_default() -> None:
    """Each option of each command has help text; one that takes a value names its default in ``--help`` (the
    text says it, or the formatter adds it), so ``--help`` is enough to use it; every ``--help`` renders."""
    from netsurgery.cli import build_parser
    from netsurgery.common import states_default

    missing = []

    def check(name: str, parser: argparse.ArgumentParser) -> None:
        assert parser.format_help()  # a stray % in a help text breaks --help
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, child in action.choices.items():
                    check(f"{name} {command}".strip(), child)
            if (
                not action.option_strings
                or isinstance(action, argparse._HelpAction)
                or action.help == argparse.SUPPRESS
            ):
                continue
            text = action.help or ""
            said = "default" in text or states_default(action) or action.required or action.nargs == 0
            if not text or not said:
                missing.append(f"{name} {'/'.join(action.option_strings)}: {text!r}")

    check("", build_parser())
    assert missing == []


def test_upload_progress_counts_the_file_bytes(service: Service, tmp_path: Path) -> None:
    from netsurgery.client import Client

    weights = zoo_file(tmp_path / "lenet.safetensors")
    size = weights.stat().st_size
    seen: list[tuple[int, int]] = []
    with Client(service.url, service.key) as c:
        m = c.upload_model(weights, progress=lambda done, total: seen.append((done, total)))
    assert m["size_bytes"] == size and seen[-1] == (size, size) and len(seen) > 2
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and {t for _, t in seen} == {size}


def test_upload_model_sends_a_folder_as_its_files(
    service: Service, logged_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`upload-model <folder>` sends every file of a Hugging Face folder side by side; the service keeps
    the ones it reads, and the progress covers all of them."""
    from dns_core import suite
    from netsurgery.client import Client

    folder = suite.write_suite_folder("vit", tmp_path / "vit-tiny")
    (folder / ".DS_Store").write_bytes(b"not sent")
    rc, out, err = run(capsys, "upload-model", str(folder))
    assert rc == 0, err
    assert re.search(r"format\s+hf", out) and re.search(r"architecture\s+ViTForImageClassification", out), out
    assert re.search(r"name\s+vit-tiny", out), out
    sizes = sum(p.stat().st_size for p in folder.iterdir() if not p.name.startswith("."))
    seen: list[tuple[int, int]] = []
    with Client(service.url, service.key) as c:
        m = c.upload_model(folder, progress=lambda done, total: seen.append((done, total)))
    assert m["format"] == "hf" and seen[-1] == (sizes, sizes)


# ------------------------------------------------------------------------------------------- errors


def test_errors_are_one_clear_line(
    service: Service, logged_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pickle = tmp_path / "evil.pt"
    pickle.write_bytes(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00.")
    rc, out, err = run(capsys, "upload-model", str(pickle))
    assert (rc, out) == (2, "")
    assert re.fullmatch(r"netsurgery: the service refused evil\.pt \(415\): .*is a pickle.*\n", err), err

    wrong = zoo_file(tmp_path / "lenet.safetensors")
    rc, out, err = run(capsys, "upload-model", str(wrong), "--arch", "lenet-5")
    assert rc == 2 and re.fullmatch(r"netsurgery: the service refused lenet\.safetensors \(422\): .+\n", err), err

    assert run(capsys, "upload-model", str(tmp_path / "nope.onnx")) == (
        2, "", f"netsurgery: {tmp_path / 'nope.onnx'}: no such file\n",
    )  # fmt: skip
    assert run(capsys, "upload-data", str(tmp_path)) == (2, "", f"netsurgery: {tmp_path}: not a file\n")
    assert run(capsys, "upload-model", str(wrong), "--config", "{x") == (
        2, "", "netsurgery: --config is not JSON: Expecting property name enclosed in double quotes: line 1 column 2 "
               "(char 1)\n",
    )  # fmt: skip
    assert run(capsys, "watch", UNKNOWN_JOB) == (2, "", f"netsurgery: job {UNKNOWN_JOB} not found\n")
    assert run(capsys, "download", UNKNOWN_JOB) == (2, "", f"netsurgery: job {UNKNOWN_JOB} not found\n")
    assert run(capsys, "watch", "42") == (
        2, "", "netsurgery: '42' is not a job id nor the start of one (4+ hex characters; see `netsurgery jobs`)\n",
    )  # fmt: skip
    assert run(capsys, "submit", UNKNOWN_JOB, UNKNOWN_JOB) == (
        2, "", "netsurgery: --method dns needs --target X (overall compression), --layer-kept name=fraction,… or "
        "--max-drop alone (the highest compression within that budget)\n",
    )  # fmt: skip
    rc, out, err = run(capsys, "submit", UNKNOWN_JOB, UNKNOWN_JOB, "--target", "5")
    assert (rc, out) == (2, "") and re.fullmatch(rf"netsurgery: model {UNKNOWN_JOB} not found\n", err), err
    # a layer the model does not have: refused at submit, naming the flag and the model's layers
    model_id = run(capsys, "upload-model", str(wrong), "-q")[1].strip()
    dataset_id = run(capsys, "upload-data", "--builtin", "digits", "-q")[1].strip()
    rc, out, err = run(capsys, "submit", model_id, dataset_id, "--layer-kept", "fc9=0.1,fc1=0.2", "--exclude", "conv*")
    assert (rc, out) == (2, "")
    assert err == (
        "netsurgery: the service refused the job (422): --layer-kept: 'fc9' matches no prunable layer of the model; "
        "its layers: fc1, fc2, fc3; --exclude: 'conv*' matches no prunable layer of the model; its layers: fc1, fc2, "
        "fc3\n"
    ), err


def test_download_before_the_job_succeeded_and_ctrl_c_does_not_cancel(
    service: Service,
    logged_in: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rc, out, _ = run(capsys, "upload-model", str(zoo_file(tmp_path / "m.safetensors")), "-q")
    model_id = out.strip()
    rc, out, _ = run(capsys, "upload-data", "--builtin", "digits", "-q")
    rc, out, _ = run(capsys, "submit", model_id, out.strip(), "--target", "5", "--iterations", "1000000", "-q")
    job_id = out.strip()

    rc, out, err = run(capsys, "download", job_id, "--out", str(tmp_path / "dl"))
    assert (rc, out) == (2, "")
    assert re.fullmatch(
        rf"netsurgery: cannot download job {job_id}: it is (queued|running) \(iteration [\d,]+ of 1,000,000\): its "
        rf"files come when it has succeeded \(`netsurgery watch {job_id}`\)\n",
        err,
    ), err
    assert not (tmp_path / "dl").exists()

    shown = client_cli._JobView.update

    def interrupt(view: client_cli._JobView, job: dict[str, object]) -> None:
        if view.job is not None:  # the first change after the first snapshot: Ctrl-C then
            raise KeyboardInterrupt
        shown(view, job)

    with monkeypatch.context() as m:
        m.setattr(client_cli._JobView, "update", interrupt)
        rc, out, err = run(capsys, "watch", job_id)
    assert rc == 130
    assert re.fullmatch(
        rf"stopped watching; job {job_id} is still (queued|running) \(it was not cancelled\): "
        rf"`netsurgery watch {job_id}` to follow it again\n",
        err,
    ), err
    with service.client() as c:
        assert c.get(f"/v1/jobs/{job_id}").json()["state"] in ("queued", "running")
        assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    rc, out, err = run(capsys, "watch", job_id)
    assert (rc, err) == (1, f"netsurgery: job {job_id} was cancelled\n")


# --------------------------------------------------------------------- watch through a flaky service


def _flaky(answers: list[int]) -> httpx.MockTransport:
    """GET /v1/jobs/{id}: the statuses in ``answers`` in turn (200: the job, one iteration further each time)."""
    calls = {"n": 0}

    def handle(request: httpx.Request) -> httpx.Response:
        n = calls["n"] = calls["n"] + 1
        status = answers[min(n, len(answers)) - 1]
        if status != 200:
            return httpx.Response(status, json={"error": "unavailable", "detail": "the database cannot be reached"})
        done = n >= len(answers)
        return httpx.Response(200, json={
            "id": UNKNOWN_JOB, "state": "succeeded" if done else "running", "iteration": 100 if done else n,
            "total_iterations": 100, "loss": 0.5, "val_accuracy": 90.0, "compression": 3.0, "error": None,
            "layers": {"iteration": n, "layers": [{"layer": "fc1", "kept": 10, "total": 40}]},
            "started_at": None, "finished_at": None,
        })  # fmt: skip

    return httpx.MockTransport(handle)


def test_watch_rides_out_a_service_that_stops_answering_for_a_while(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from netsurgery.client import Client

    monkeypatch.setattr(client_cli, "POLL_SECONDS", 0.0)
    with Client("http://svc", "k", transport=_flaky([200, 503, 429, 200, 200])) as c:
        assert client_cli._watch(c, UNKNOWN_JOB) == 0
    out = capsys.readouterr().out
    assert f"job {UNKNOWN_JOB} succeeded: 3.0x, validation accuracy 90.00%, 100 iterations\n" in out
    assert re.search(r"│ fc1 +│ +10 │ +40 │ +25\.00 │", out), out

    monkeypatch.setattr(client_cli, "RECONNECT_SECONDS", 0.0)
    with Client("http://svc", "k", transport=_flaky([200, 503])) as c, pytest.raises(CliError) as e:
        client_cli._watch(c, UNKNOWN_JOB)
    assert str(e.value) == "503 unavailable: the database cannot be reached (gave up watching after 0 s)"


# ------------------------------------------------------------------------------------ the event stream


def test_events_of_a_finished_job_in_order_and_resumed_after_any_one(service: Service, tmp_path: Path) -> None:
    from netsurgery.client import Client

    with Client(service.url, service.key) as c:
        model = c.upload_model(zoo_file(tmp_path / "m.safetensors"))
        data = c.builtin_data("digits")
        job = c.wait(c.submit(model["id"], data["id"], compression=5, iterations=200, seed=0)["id"], poll=0.2)
        assert job["state"] == "succeeded"
        events = list(c.events(job["id"]))
        progress = c._json("GET", f"/v1/jobs/{job['id']}/progress")["items"]
        layers = c._json("GET", f"/v1/jobs/{job['id']}/layers")["items"]

        # every point, progress before layers at one iteration, then the terminal state (and the stream ends)
        expected = sorted([(p["iteration"], 0) for p in progress] + [(s["iteration"], 1) for s in layers])
        got = [(d["iteration"], 0 if k == "progress" else 1) for k, _, d in events[:-1]]
        assert got == expected and len(got) >= 4
        assert [d for k, _, d in events if k == "progress"] == progress
        assert [d for k, _, d in events if k == "layers"] == layers
        kind, last_id, final = events[-1]
        assert (kind, final["state"], final["iteration"]) == ("state", "succeeded", job["iteration"])
        assert last_id == f"{progress[-1]['iteration']}:{layers[-1]['iteration']}:succeeded"
        assert len({i for _, i, _ in events}) == len(events)

        # reconnecting after the third event: the rest, no gap, no repeat; after the last one: nothing (204)
        assert list(c.events(job["id"], last_event_id=events[2][1])) == events[3:]
        assert list(c.events(job["id"], last_event_id=last_id)) == []


def _streaming(chunks: list[list[bytes]], seen: list[httpx.Request], events: int = 200) -> httpx.MockTransport:
    """GET /v1/jobs/{id}: the job, running; GET …/events: the ``chunks`` of one answer after another (an
    answer that ends without a terminal event breaks off, as a dropped connection); ``events``: its status."""
    job = {"id": UNKNOWN_JOB, "state": "running", "iteration": 10, "total_iterations": 100, "loss": 0.9,
           "val_accuracy": None, "compression": 1.0, "error": None, "layers": None,
           "started_at": "2024-01-01T00:00:00+00:00", "finished_at": None}  # fmt: skip

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if not request.url.path.endswith("/events"):
            return httpx.Response(200, json=job)
        if events != 200:
            return httpx.Response(events, json={"error": "not_found", "detail": "Not Found"})
        answer = chunks.pop(0)

        def body() -> Iterator[bytes]:
            yield from answer
            if b"succeeded" not in b"".join(answer):
                raise httpx.RemoteProtocolError("peer closed connection")

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    return httpx.MockTransport(handle)


def test_watch_follows_the_event_stream_and_resumes_it_when_it_breaks_off(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from netsurgery import client

    monkeypatch.setattr(client, "EVENT_BACKOFF_SECONDS", 0.0)
    monkeypatch.setattr(client_cli, "POLL_SECONDS", 3600.0)  # it must not poll
    done = {"id": UNKNOWN_JOB, "state": "succeeded", "iteration": 100, "total_iterations": 100, "loss": 0.2,
            "val_accuracy": 91.5, "compression": 4.0, "error": None,
            "layers": {"iteration": 100, "layers": [{"layer": "fc1", "kept": 10, "total": 40}]},
            "started_at": "2024-01-01T00:00:00+00:00", "finished_at": "2024-01-01T00:01:00+00:00"}  # fmt: skip
    first = [
        b": ping\n\n",
        b'event: state\nid: 10:-1:running\ndata: {"id": "x", "state": "running", "iteration": 10, '
        b'"total_iterations": 100, "loss": 0.9, "val_accuracy": null, "compression": 1.0, "layers": null}\n\n',
        b'event: progress\nid: 50:-1:running\ndata: {"iteration": 50, "loss": 0.5, "val_accuracy": 80.0,\n',
        b'data: "compression": 2.0}\n\n',
        b'event: layers\nid: 50:50:running\ndata: {"iteration": 50, ',  # cut off: dropped, sent again
    ]
    rest = [
        b'event: layers\nid: 50:50:running\ndata: {"iteration": 50, "layers": [{"layer": "fc1", '
        b'"kept": 20, "total": 40}]}\n\n',
        f"event: state\nid: 50:50:succeeded\ndata: {json.dumps(done)}\n\n".encode(),
    ]
    seen: list[httpx.Request] = []
    with client.Client("http://svc", "k", transport=_streaming([first, rest], seen)) as c:
        assert client_cli._watch(c, UNKNOWN_JOB) == 0
    out = capsys.readouterr().out
    assert f"job {UNKNOWN_JOB} running\n" in out and out.count("running\n") == 1
    assert f"job {UNKNOWN_JOB} succeeded: 4.0x, validation accuracy 91.50%, 100 iterations, in 60 s\n" in out
    assert re.search(r"│ fc1 +│ +10 │ +40 │ +25\.00 │", out), out
    assert [(r.url.path, r.headers.get("Last-Event-ID")) for r in seen] == [
        (f"/v1/jobs/{UNKNOWN_JOB}", None),
        (f"/v1/jobs/{UNKNOWN_JOB}/events", "10:-1:"),  # after what the snapshot shows
        (f"/v1/jobs/{UNKNOWN_JOB}/events", "50:-1:running"),  # after the last whole event
    ]
    assert seen[1].headers["Accept"] == "text/event-stream"


def test_watch_polls_a_service_without_the_event_stream(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from netsurgery.client import Client

    monkeypatch.setattr(client_cli, "POLL_SECONDS", 0.0)
    seen: list[httpx.Request] = []
    polls = {"n": 0}
    transport = _streaming([], seen, events=404)

    def handle(request: httpx.Request) -> httpx.Response:
        r = transport.handle_request(request)
        if not request.url.path.endswith("/events"):
            polls["n"] += 1
            if polls["n"] == 3:
                body = r.read()
                return httpx.Response(200, json=json.loads(body) | {"state": "cancelled"})
        return r

    with Client("http://svc", "k", transport=httpx.MockTransport(handle)) as c:
        assert client_cli._watch(c, UNKNOWN_JOB) == 1
    assert capsys.readouterr().err == f"netsurgery: job {UNKNOWN_JOB} was cancelled\n"
    assert [r.url.path.rsplit("/", 1)[-1] for r in seen] == [UNKNOWN_JOB, "events", UNKNOWN_JOB, UNKNOWN_JOB]
