"""The HTTP protocol the API runs under: uvicorn's, but a request it cannot parse gets the JSON error body.

uvicorn answers a request its parser refuses (a body longer than its ``Content-Length`` makes the rest
read as a broken next request, a malformed request line, a bad header) itself, before the application
sees anything, with ``400`` and the plain text ``Invalid HTTP request received.``. Every other error of
the API is ``{"error": code, "detail": message}`` (:func:`api.app.render_error`); these protocol
classes give that one the same shape. They are uvicorn's own, changed in that one answer:
:class:`JsonErrorsProtocol` is the httptools one when httptools is installed (what uvicorn's ``auto``
picks), else the h11 one. Run the API with ``--http api.server:JsonErrorsProtocol`` (the Dockerfile and
docker-compose.yml do), or pass the class as ``uvicorn.Config(http=...)`` (``netsurgery serve`` does).
"""

from __future__ import annotations

import importlib.util
import json
from typing import Final

from uvicorn.protocols.http.h11_impl import H11Protocol

#: What a request uvicorn cannot parse is told, whatever its parser's reason.
BAD_REQUEST_CODE: Final = "bad_request"


def error_body(reason: str) -> bytes:
    """The API's error shape for a request the HTTP parser refused."""
    detail = f"the request is not valid HTTP/1.1 ({reason.rstrip('.')}); check its Content-Length and headers"
    return json.dumps({"error": BAD_REQUEST_CODE, "detail": detail}).encode()


class JsonErrorsH11(H11Protocol):
    """h11's protocol with a JSON 400 for a request it cannot parse."""

    def send_400_response(self, msg: str) -> None:
        import h11

        body = error_body(msg)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"connection", b"close"),
        ]
        self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


if importlib.util.find_spec("httptools") is not None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class JsonErrorsHttpTools(HttpToolsProtocol):
        """httptools' protocol with a JSON 400 for a request it cannot parse."""

        def send_400_response(self, msg: str) -> None:
            body = error_body(msg)
            content = [b"HTTP/1.1 400 Bad Request\r\n"]
            for name, value in self.server_state.default_headers:
                content += [name, b": ", value, b"\r\n"]
            content += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                        b"connection: close\r\n", b"\r\n", body]  # fmt: skip
            self.transport.write(b"".join(content))
            self.transport.close()

    JsonErrorsProtocol: type[H11Protocol] | type[HttpToolsProtocol] = JsonErrorsHttpTools
else:  # pragma: no cover - httptools comes with the service extra
    JsonErrorsProtocol = JsonErrorsH11
