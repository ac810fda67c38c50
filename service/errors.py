"""The service's one error hierarchy: each expected failure has a class and an HTTP status.

The repositories and use cases raise these; the HTTP layer renders every :class:`AppError` with
one handler (``api.app.render_error``) as ``{"error": code, "detail": message}``, so an expected
error is never a 500. Errors from elsewhere (request validation, the upload checks in ``dns_core``, a
database that cannot be reached) are translated into these classes first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar


class AppError(Exception):
    """An expected failure a client can act on; ``status_code`` and ``code`` say which.

    ``headers`` are sent with the error response (``WWW-Authenticate`` on a 401, ``Content-Range``
    on a 416 …); ``extra`` adds members to the JSON body (the field errors of a 422).
    """

    status_code: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    description: ClassVar[str] = "The request is malformed."

    def __init__(
        self, detail: str, *, headers: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})
        self.extra: dict[str, Any] = dict(extra or {})


class BadRequest(AppError):
    """The request cannot be parsed (a malformed or truncated multipart body, bad JSON …)."""

    status_code = 400
    code = "bad_request"
    description = "The request body cannot be parsed."


class Unauthorized(AppError):
    """No API key, or one that is unknown or revoked."""

    status_code = 401
    code = "unauthorized"
    description = "Missing, unknown or revoked API key (send `Authorization: Bearer <key>`)."

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class NotFound(AppError):
    """The resource does not exist, or belongs to another tenant (the two are not told apart)."""

    status_code = 404
    code = "not_found"
    description = "No such resource for this tenant."


class Conflict(AppError):
    """The request conflicts with the current state (a model still used by a job, a running job …)."""

    status_code = 409
    code = "conflict"
    description = "The request conflicts with the resource's current state."


class PayloadTooLarge(AppError):
    """The upload is larger than ``Settings.max_upload_bytes``."""

    status_code = 413
    code = "payload_too_large"
    description = "The body is larger than the service accepts."


class UnsupportedFormat(AppError):
    """The upload is in a format the service refuses (pickle-based files, ONNX with external data …)."""

    status_code = 415
    code = "unsupported_format"
    description = "The upload (or the request's content type) is in a format the service refuses."


class RangeNotSatisfiable(AppError):
    """A ``Range`` header none of whose bytes exist in the file."""

    status_code = 416
    code = "range_not_satisfiable"
    description = "The requested byte range lies outside the file."


class InvalidRequest(AppError):
    """The request parses but its values are wrong (field errors of a JSON body or a query)."""

    status_code = 422
    code = "invalid_request"
    description = "The request's values are invalid; `fields` lists each problem."


class InvalidFile(AppError):
    """An upload in an accepted format that is malformed or does not fit its architecture."""

    status_code = 422
    code = "invalid_file"
    description = "The uploaded file is malformed or does not match its architecture."


class ExceedsCpuTimeLimit(AppError):
    """A CPU-only deployment's estimate of the job's training time is over ``Settings.cpu_job_limit_seconds``.

    The message gives the estimate, the figures behind it and the limit (:mod:`service.estimates`).
    """

    status_code = 422
    code = "exceeds_cpu_time_limit"
    description = (
        "This deployment trains on CPUs only and the job's estimated training time is over its limit; "
        "ask for fewer iterations (or a smaller batch), or use a deployment with GPU workers."
    )


class TooManyRequests(AppError):
    """The API key made more requests than ``Settings.rate_limit_per_second`` (and the burst) allow.

    The answer carries ``Retry-After`` (whole seconds, at least 1): asking again after that succeeds,
    as far as this limit is concerned. The body repeats it as ``retry_after``.
    """

    status_code = 429
    code = "rate_limited"
    description = "Too many requests with this API key; wait `Retry-After` seconds."

    def __init__(self, detail: str, *, retry_after: float, headers: Mapping[str, str] | None = None) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(
            detail, headers={**(headers or {}), "Retry-After": str(seconds)}, extra={"retry_after": seconds}
        )
        self.retry_after = seconds


class QuotaExceeded(TooManyRequests):
    """The tenant is at a quota: jobs queued or running, or bytes stored (models, data sets, artifacts).

    ``Retry-After`` says when asking again is worth it; the request passes only once a job ended or
    was cancelled, or stored files were deleted.
    """

    code = "quota_exceeded"
    description = "The tenant is at its quota of active jobs or stored bytes; finish, cancel or delete first."


class ServiceUnavailable(AppError):
    """A dependency (the database, the broker) cannot be reached right now; retrying later may work."""

    status_code = 503
    code = "unavailable"
    description = "The database or the broker cannot be reached; retry later."

    @classmethod
    def database(cls) -> ServiceUnavailable:
        """The answer while the database cannot be reached."""
        return cls("the database cannot be reached; retry later")
