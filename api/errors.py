"""The service's one error hierarchy: each expected failure has a class and an HTTP status.

The repository raises these; the HTTP layer renders every :class:`AppError` with one handler, so an
expected error is never a 500.
"""

from __future__ import annotations

from typing import ClassVar


class AppError(Exception):
    """An expected failure a client can act on; ``status_code`` and ``code`` say which."""

    status_code: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(AppError):
    """The resource does not exist, or belongs to another tenant (the two are not told apart)."""

    status_code = 404
    code = "not_found"


class Conflict(AppError):
    """The request conflicts with the current state (a model still used by a job, a running job …)."""

    status_code = 409
    code = "conflict"


class PayloadTooLarge(AppError):
    """The upload is larger than ``Settings.max_upload_bytes``."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedFormat(AppError):
    """The upload is in a format the service refuses (pickle-based files, ONNX with external data …)."""

    status_code = 415
    code = "unsupported_format"
