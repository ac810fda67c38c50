"""A small Python client for the netsurgery service (used by the command line; handy in notebooks).

    from netsurgery.client import Client

    c = Client("http://127.0.0.1:8000", key)
    model = c.upload_model("lenet.safetensors", architecture="lenet-300-100")
    data = c.builtin_data("fashion-mnist")
    job = c.submit(model["id"], data["id"], compression=40, max_drop=0.5)
    job = c.wait(job["id"], callback=lambda j: print(j["iteration"], j["compression"]))
    files = c.download(job["id"], "out/")          # sha256-checked

Only HTTP: importing this module loads neither torch nor the service.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Final

import httpx

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
#: How often :meth:`Client.events` tries to reconnect a dropped stream (with back-off) before it gives up.
EVENT_RETRIES = 4
EVENT_BACKOFF_SECONDS = 0.5
EVENT_TIMEOUT = httpx.Timeout(30, read=60)  # the service sends a ping comment every 15 s


class Unset(enum.Enum):
    """The type of :data:`UNSET`: an argument left out, as opposed to one given as None."""

    UNSET = enum.auto()


UNSET: Final = Unset.UNSET


class ApiError(Exception):
    """The service answered with an error, or could not be reached; ``str()`` is one readable line."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: str | None = None,
        detail: str | None = None,
        fields: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code = status, code
        self.detail = detail  # the service's own words (its ``detail``), without the status; None if unreachable
        #: a 422's fields: ``{"loc": ["body", "settings", "iterations"], "msg": …}`` each
        self.fields = fields or []


class ChecksumMismatch(ApiError):
    """A downloaded file does not match the sha256 the service listed for it."""


class Client:
    def __init__(self, url: str, key: str, *, timeout: float = 60.0, transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout, transport=transport
        )
        #: whether the last upload added a new entry (False: you had uploaded those bytes already)
        self.last_upload_created: bool | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.ConnectError:
            raise ApiError(
                f"cannot reach the netsurgery service at {self.url} (is `netsurgery serve` running?)"
            ) from None
        except httpx.TimeoutException:
            raise ApiError(f"the service at {self.url} did not answer in time") from None
        except httpx.TransportError as e:
            raise ApiError(f"lost the connection to the netsurgery service at {self.url}: {e}") from None
        if r.status_code >= 400:
            raise _error(r)
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._request(method, path, **kw).json()

    # --- uploads ---------------------------------------------------------------------------------

    def upload_model(
        self,
        path: str | os.PathLike[str],
        *,
        architecture: str | None = None,
        config: dict[str, Any] | None = None,
        name: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        new: bool = False,
    ) -> dict[str, Any]:
        """Upload a model: an ONNX graph, safetensors weights of an ``architecture`` (built-in,
        ``torchvision:<name>`` or ``timm:<name>``), an archive of a model folder, or a folder itself (a
        Hugging Face folder, or ``model.onnx`` with its external data), whose files go up side by side.

        ``progress(sent_bytes, total_bytes)`` is called as the files' bytes go out. Bytes you uploaded
        before return the model you have (:attr:`last_upload_created` is then False); ``new`` adds
        another entry all the same.
        """
        form = {"name": name, "architecture": architecture, "config": json.dumps(config) if config else None}
        p = Path(path)
        if p.is_dir():
            files: list[tuple[str, str | os.PathLike[str]]] = [
                ("file", f) for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")
            ]
            if not files:
                raise FileNotFoundError(f"{p}: no files in the folder")
            if name is None:
                form["name"] = p.name
            return self._upload("/v1/models", files, form, progress, new)
        return self._upload("/v1/models", [("file", p)], form, progress, new)

    def upload_data(
        self,
        path: str | os.PathLike[str],
        *,
        targets: str | os.PathLike[str] | None = None,
        name: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        new: bool = False,
    ) -> dict[str, Any]:
        """Upload data: .npz/safetensors with inputs (and targets), or IDX inputs plus IDX ``targets``.

        ``progress(sent_bytes, total_bytes)`` counts the bytes of both files. A file you uploaded before
        returns the data set you have (:attr:`last_upload_created` is then False); ``new`` adds another.
        """
        files: list[tuple[str, str | os.PathLike[str]]] = [("file", path)]
        if targets is not None:
            files.append(("targets", targets))
        return self._upload("/v1/datasets", files, {"name": name}, progress, new)

    def builtin_data(self, name: str, *, dataset_name: str | None = None) -> dict[str, Any]:
        """Register a built-in data set (``fashion-mnist``, ``digits``), named ``dataset_name`` (default ``name``)."""
        body = {"builtin": name} | ({"name": dataset_name} if dataset_name else {})
        return dict(self._json("POST", "/v1/datasets", json=body))

    def _upload(
        self,
        route: str,
        files: list[tuple[str, str | os.PathLike[str]]],
        form: dict[str, str | None],
        progress: Callable[[int, int], None] | None = None,
        new: bool = False,
    ) -> dict[str, Any]:
        handles = [open(path, "rb") for _, path in files]  # noqa: SIM115 - closed below
        try:
            bodies: list[Any] = list(handles)
            if progress is not None:
                counter = _Sent(sum(os.fstat(f.fileno()).st_size for f in handles), progress)
                bodies = [_CountingReader(f, counter) for f in handles]
            parts = [(field, (Path(path).name, body)) for (field, path), body in zip(files, bodies, strict=True)]
            data = {k: v for k, v in form.items() if v is not None}
            params = {"duplicate": "new" if new else "existing"}
            r = self._request("POST", route, files=parts, data=data, params=params)
            self.last_upload_created = r.status_code == 201
            return dict(r.json())
        finally:
            for f in handles:
                f.close()

    # --- jobs ------------------------------------------------------------------------------------

    def submit(
        self,
        model_id: str,
        dataset_id: str,
        *,
        method: str = "dns",
        compression: float | None = None,
        layer_kept: dict[str, float] | None = None,
        max_drop: float | None = None,
        idempotency_key: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        **settings: Any,
    ) -> dict[str, Any]:
        """Create a job; ``settings`` are the expert knobs (iterations, lr, crates, gamma, seed, codec …)."""
        target = {"compression": compression, "layer_kept": layer_kept, "max_accuracy_drop": max_drop}
        body: dict[str, Any] = {
            "model_id": model_id,
            "dataset_id": dataset_id,
            "method": method,
            "target": {k: v for k, v in target.items() if v is not None} or None,
            "settings": {k: v for k, v in settings.items() if v is not None},
        }
        if name is not None:
            body["name"] = name
        if tags:
            body["tags"] = tags
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return dict(self._json("POST", "/v1/jobs", json=body, headers=headers))

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/jobs/{job_id}"))

    def jobs(
        self,
        *,
        state: str | list[str] | None = None,
        method: str | None = None,
        model_id: str | None = None,
        dataset_id: str | None = None,
        name: str | None = None,
        tag: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> dict[str, Any]:
        """A page of jobs, newest first; every filter given must hold (``state``: any of those given)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        filters = {"state": state, "method": method, "model_id": model_id, "dataset_id": dataset_id, "name": name,
                   "tag": tag}  # fmt: skip
        params.update({k: v for k, v in filters.items() if v})
        return dict(self._json("GET", "/v1/jobs", params=params))

    def label(
        self, job_id: str, *, name: str | Unset | None = UNSET, tags: list[str] | Unset = UNSET
    ) -> dict[str, Any]:
        """Rename and/or retag a job: what is given replaces the old value (``name=None`` clears the name)."""
        body: dict[str, Any] = {}
        if not isinstance(name, Unset):
            body["name"] = name
        if not isinstance(tags, Unset):
            body["tags"] = tags
        return dict(self._json("PATCH", f"/v1/jobs/{job_id}", json=body))

    def logs(self, job_id: str, *, after: int = 0, limit: int = 500) -> dict[str, Any]:
        """The job's log lines after the cursor ``after``: ``{"items": [...], "next_after": n}``."""
        return dict(self._json("GET", f"/v1/jobs/{job_id}/logs", params={"after": after, "limit": limit}))

    def models(self, *, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        return dict(self._json("GET", "/v1/models", params={"limit": limit, "offset": offset}))

    def datasets(self, *, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        return dict(self._json("GET", "/v1/datasets", params={"limit": limit, "offset": offset}))

    def delete(self, kind: str, item_id: str) -> None:
        """Delete a finished job (``kind="jobs"``), a model or a data set no job uses (``"models"``, ``"datasets"``)."""
        if kind not in ("jobs", "models", "datasets"):
            raise ValueError(f"cannot delete {kind!r}")
        self._request("DELETE", f"/v1/{kind}/{item_id}")

    def frontier(self, job_id: str) -> dict[str, Any]:
        """A budget-only job's frontier: each rung's compression and accuracy, the chosen point, the candidates."""
        return dict(self._json("GET", f"/v1/jobs/{job_id}/frontier"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._json("POST", f"/v1/jobs/{job_id}/cancel"))

    def wait(
        self,
        job_id: str,
        *,
        callback: Callable[[dict[str, Any]], None] | None = None,
        poll: float = 0.5,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is terminal; ``callback`` gets every snapshot. Returns the last one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if callback is not None:
                callback(job)
            if job["state"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ApiError(f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(poll)

    def events(
        self, job_id: str, last_event_id: str | None = None
    ) -> Generator[tuple[str, str | None, dict[str, Any]], None, None]:
        """Follow the job's Server-Sent Events: ``(event type, event id, data)`` for each ``state``,
        ``progress`` and ``layers`` event, until a terminal ``state`` event (or a 204 on reconnecting).

        A dropped connection is reopened with ``Last-Event-ID`` (the last id received, else
        ``last_event_id``), so nothing is missed or repeated; after :data:`EVENT_RETRIES` failed tries
        in a row, :class:`ApiError` is raised. So is an error answer (404 from an older service, or an
        unknown job), and an answer that is not an event stream.
        """
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=EVENT_TIMEOUT) as r:
                    if r.status_code == 204:
                        return
                    if r.status_code >= 400:
                        r.read()
                        raise _error(r)
                    if not r.headers.get("content-type", "").startswith("text/event-stream"):
                        raise ApiError(
                            f"the service at {self.url} does not stream events ({r.status_code})", r.status_code
                        )
                    for kind, event_id, data in _parse_sse(r.iter_lines()):
                        if event_id is not None:
                            last_event_id = event_id
                        failures = 0
                        if kind in ("state", "progress", "layers"):
                            parsed = json.loads(data)
                            yield kind, event_id, parsed
                            if kind == "state" and parsed.get("state") in TERMINAL:
                                return
                error = f"the event stream of job {job_id} ended early"
            except httpx.TransportError as e:
                error = f"lost the event stream of job {job_id} at {self.url}: {e}"
            failures += 1
            if failures > EVENT_RETRIES:
                raise ApiError(error)
            time.sleep(EVENT_BACKOFF_SECONDS * 2 ** (failures - 1))

    # --- artifacts -------------------------------------------------------------------------------

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return list(self._json("GET", f"/v1/jobs/{job_id}/artifacts")["items"])

    def download(
        self,
        job_id: str,
        into: str | os.PathLike[str],
        *,
        names: Iterable[str] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> dict[str, Path]:
        """Stream the job's artifacts into folder ``into``, checking each sha256; name -> path.

        ``progress(name, done_bytes, total_bytes)`` is called as bytes arrive. A file whose sha256
        does not match is deleted and :class:`ChecksumMismatch` raised.
        """
        folder = Path(into)
        folder.mkdir(parents=True, exist_ok=True)
        wanted = None if names is None else set(names)
        out: dict[str, Path] = {}
        for art in self.artifacts(job_id):
            if wanted is not None and art["name"] not in wanted:
                continue
            dest = folder / Path(art["name"]).name
            partial = dest.with_name(dest.name + ".part")
            h = hashlib.sha256()
            done = 0
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{art['name']}") as r:
                    if r.status_code >= 400:
                        r.read()
                        raise _error(r)
                    with open(partial, "wb") as f:
                        for chunk in r.iter_bytes(1 << 16):
                            f.write(chunk)
                            h.update(chunk)
                            done += len(chunk)
                            if progress is not None:
                                progress(art["name"], done, art["size_bytes"])
            except httpx.ConnectError:
                raise ApiError(f"cannot reach the netsurgery service at {self.url}") from None
            except httpx.TransportError as e:
                partial.unlink(missing_ok=True)
                raise ApiError(f"lost the connection to the netsurgery service at {self.url}: {e}") from None
            if h.hexdigest() != art["sha256"]:
                partial.unlink(missing_ok=True)
                raise ChecksumMismatch(
                    f"{art['name']}: sha256 {h.hexdigest()} does not match the listed {art['sha256']}"
                )
            partial.replace(dest)
            out[art["name"]] = dest
        return out


class _Sent:
    """Bytes of an upload sent so far (over all its files), reported to ``callback(sent, total)``."""

    def __init__(self, total: int, callback: Callable[[int, int], None]) -> None:
        self.total, self.callback = total, callback
        self.by_file: dict[int, int] = {}

    def update(self, key: int, position: int) -> None:
        self.by_file[key] = position
        self.callback(min(sum(self.by_file.values()), self.total), self.total)


class _CountingReader:
    """A binary file as httpx's multipart encoder reads it, reporting its position after each read."""

    def __init__(self, f: BinaryIO, counter: _Sent) -> None:
        self._f, self._counter = f, counter
        self.name = f.name

    def read(self, size: int = -1) -> bytes:
        chunk = self._f.read(size)
        self._counter.update(id(self), self._f.tell())
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self._f.seek(offset, whence)
        self._counter.update(id(self), position)
        return position

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()


def _parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, str | None, str]]:
    """Server-Sent Events from a stream's lines: ``(event type, id, data)``; comments are skipped.

    An event ends with a blank line; one cut off before it is dropped. ``id`` is the last one seen.
    """
    kind, event_id, data = "", None, list[str]()
    for line in lines:
        if not line:
            if data:
                yield kind or "message", event_id, "\n".join(data)
            kind, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)
        elif field == "id" and "\0" not in value:
            event_id = value


def _error(r: httpx.Response) -> ApiError:
    fields: list[dict[str, Any]] = []
    try:
        body = r.json()
        detail, code = body.get("detail") or body, body.get("error")
        fields = [f for f in body.get("fields") or [] if isinstance(f, dict)]
    except (ValueError, AttributeError):
        detail, code = r.text[:200] or r.reason_phrase, None
    if r.status_code == 401:
        return ApiError(
            "the service refused the API key (401): check it with `netsurgery login`", 401, code, str(detail)
        )
    return ApiError(f"{r.status_code} {code or r.reason_phrase}: {detail}", r.status_code, code, str(detail), fields)
