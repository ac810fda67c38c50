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

import numpy as np
import pytest
import torch

from dns_core import models
from dns_core.artifacts import REPORT_FILES
from dns_core.io import save_model
from netsurgery import client_cli
from netsurgery.cli import main
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
    assert set(listed) == {"model.safetensors", "model.sparse.safetensors", "model.sparse.int8.safetensors",
                           *REPORT_FILES}  # fmt: skip
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
    rc, out, err = run(capsys, "submit", model_id, dataset_id, "--method", "han", "--max-drop", "1")
    assert rc == 2 and "only dns and agp search" in err
    # the service's refusals name the flags that set the fields, not the API's field paths
    rc, out, err = run(capsys, "submit", model_id, dataset_id, "--target", "5", "--iterations", "0", "--lr", "0")
    assert rc == 2 and "--iterations: Input should be greater than or equal to 1" in err, err
    assert "--lr: Input should be greater than 0" in err and "body.settings" not in err, err
    rc, out, err = run(capsys, "submit", model_id, dataset_id, "--target", "0.5")
    assert rc == 2 and "--target: Input should be greater than or equal to 1" in err, err


def test_models_datasets_cancel_rm_and_id_prefixes(
    service: Service, logged_in: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "upload-model", str(zoo_file(tmp_path / "m.safetensors")), "--arch", "lenet-300-100",
                     "--name", "lenet for rm", "-q")  # fmt: skip
    model_id = out.strip()
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
