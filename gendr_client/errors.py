"""Typed errors from the service's JSON error codes (docs/http.md): catch what you can act on.

Every error response of gendr-serve is `{"error": {"code", "message", ...}}`; the code picks the class.
`Retryable` ones (503: overloaded, draining, not_ready, job_store_unavailable) and connection failures
are retried by the client until its deadline.
"""

from __future__ import annotations

import json
from typing import Any


class GendrError(Exception):
    """Any failure of a call: `code` is the service's error code (or a client-side one)."""

    code = "error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s
        self.request_id = request_id

    def __str__(self) -> str:
        where = f" [{self.status}]" if self.status else ""
        return f"{self.code}{where}: {self.message}"


class BadRequest(GendrError):
    code = "bad_request"


class Unauthorized(GendrError):
    code = "unauthorized"


class NotFound(GendrError):
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class TooLarge(GendrError):
    """413: the body (`payload_too_large`) or the image (`image_too_large`) is over the server's limits."""

    code = "image_too_large"


class UnsupportedMediaType(GendrError):
    code = "unsupported_media_type"


class UndecodableImage(GendrError):
    code = "undecodable_image"


class JobFailed(GendrError):
    code = "job_failed"


class JobExpired(GendrError):
    code = "job_expired"


class JobLost(JobFailed):
    """The job was lost after too many replica deaths; the client submits the image again (a new job)."""

    code = "job_lost"


class Interrupted(JobFailed):
    """The job was interrupted by a restart; the client submits the image again (a new job)."""

    code = "interrupted"


class IdempotencyKeyReused(GendrError):
    """409: this `Idempotency-Key` was already used for a different body or options."""

    code = "idempotency_key_reused"


class EngineFailure(GendrError):
    code = "engine_failure"


class Retryable(GendrError):
    """The server cannot take the work now (503); retried with Retry-After until the deadline."""


class Overloaded(Retryable):
    code = "overloaded"


class Draining(Retryable):
    code = "draining"


class NotReady(Retryable):
    code = "not_ready"


class JobStoreUnavailable(Retryable):
    """503: the shared job store (Redis) cannot be reached; it comes back by itself."""

    code = "job_store_unavailable"


class DeadlineExceeded(GendrError):
    """The server's deadline passed (504), or the client's total deadline ran out while retrying."""

    code = "deadline_exceeded"


class DeadlinePassed(DeadlineExceeded):
    """The client's own total deadline ran out: the caller gave up, so an unfinished job is deleted."""


class ConnectionFailed(Retryable):
    """No HTTP answer (refused, reset): retried like a 503 until the deadline."""

    code = "connection_failed"


_BY_CODE: dict[str, type[GendrError]] = {
    c.code: c
    for c in (
        BadRequest,
        Unauthorized,
        NotFound,
        ModelNotFound,
        JobNotFound,
        UnsupportedMediaType,
        UndecodableImage,
        JobFailed,
        JobExpired,
        JobLost,
        Interrupted,
        IdempotencyKeyReused,
        EngineFailure,
        Overloaded,
        Draining,
        NotReady,
        JobStoreUnavailable,
        DeadlineExceeded,
    )
}
_BY_CODE["payload_too_large"] = TooLarge
_BY_CODE["image_too_large"] = TooLarge
_BY_STATUS: dict[int, type[GendrError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    413: TooLarge,
    415: UnsupportedMediaType,
    422: UndecodableImage,
    503: Retryable,
    504: DeadlineExceeded,
}


def from_error(err: dict[str, Any], status: int | None = None) -> GendrError:
    """An error object (`{"code", "message"}`, as in a response or a failed job) as its typed exception."""
    code = str(err.get("code") or "error")
    cls = _BY_CODE.get(code) or (_BY_STATUS.get(status, GendrError) if status else GendrError)
    retry = err.get("retry_after_s")
    return cls(
        str(err.get("message") or code),
        status=status,
        code=code,
        retry_after_s=float(retry) if isinstance(retry, int | float) else None,
        request_id=err.get("request_id"),
    )


def from_response(status: int, body: bytes, headers: Any) -> GendrError:
    """The typed exception of an error response (a non-JSON body still gives a useful message)."""
    try:
        err = json.loads(body)["error"]
        assert isinstance(err, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        text = body[:200].decode("utf-8", "replace").strip()
        err = {"code": None, "message": text or f"HTTP {status}"}
    e = from_error(err, status)
    retry = headers.get("retry-after") if headers is not None else None
    if retry is not None:
        try:
            e.retry_after_s = max(float(retry), e.retry_after_s or 0.0)
        except ValueError:
            pass
    return e


def is_transient(e: GendrError) -> bool:
    """Worth sending the same idempotent request again: a 503, no answer at all, or a proxy's 502/504 (a body
    that is not ours: an ingress whose pod just died), as opposed to the service's own 504 deadline."""
    return isinstance(e, Retryable) or (e.status in (502, 504) and e.code == GendrError.code)
