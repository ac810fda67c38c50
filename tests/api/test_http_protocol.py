"""A request the HTTP parser refuses gets the API's JSON error body, not uvicorn's plain text."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.server import JsonErrorsH11, JsonErrorsProtocol
from tests.api.conftest import LiveServer

#: A body 13 bytes longer than its Content-Length: the extra bytes read as the start of a broken next request.
TOO_LONG = (
    b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
    b"{}garbage here\r\n\r\n"
)


def exchange(url: str, raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``raw`` on one connection; every response read back until the server closes it."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    responses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        responses.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return responses


def _echo(request: object) -> JSONResponse:
    return JSONResponse({"ok": True})


@pytest.fixture(params=[JsonErrorsProtocol, JsonErrorsH11], ids=lambda c: c.__name__)
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    app = Starlette(routes=[Route("/echo", _echo, methods=["POST"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, http=request.param)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def test_both_protocols_answer_an_unparsable_request_with_json(server: str) -> None:
    responses = exchange(server, TOO_LONG)
    # h11 answers the whole first request before it reads the rest; httptools refuses the packet as a whole
    assert [status for status, _, _ in responses] in ([200, 400], [400])
    status, headers, body = responses[-1]
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    error = json.loads(body)
    assert error["error"] == "bad_request" and "not valid HTTP/1.1" in error["detail"], error
    status, headers, body = exchange(server, b"GARBAGE\r\n\r\n")[0]
    assert status == 400 and json.loads(body)["error"] == "bad_request"


def test_the_api_answers_a_body_longer_than_its_length_with_its_json_error(live: LiveServer) -> None:
    status, headers, body = exchange(live.url, TOO_LONG.replace(b"/echo", b"/v1/jobs"))[-1]
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == "bad_request"
