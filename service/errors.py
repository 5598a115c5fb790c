"""Every error a client can see: a stable code, an HTTP status and a human message.

The HTTP layer maps `ServiceError` to a JSON response in one place (`service/http/app.py`); anything
else is a 500 with no internals leaked. Runtime code raises these directly so the mapping never has
to guess. Codes are part of the API (docs/http.md lists them): add new ones, never rename.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, object]:
        err: dict[str, object] = {"code": self.code, "message": self.message}
        if self.retry_after_s is not None:
            err["retry_after_s"] = round(self.retry_after_s, 3)
        return {"error": err}

    def headers(self) -> dict[str, str]:
        """Extra response headers this error needs (Retry-After is added by the HTTP layer)."""
        return {}


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="gendr-serve"'}


class NotFound(ServiceError):
    """Unknown route (the framework's own 404, re-shaped)."""

    status, code = 404, "not_found"


class ModelNotFound(ServiceError):
    status, code = 404, "model_not_found"


class MethodNotAllowed(ServiceError):
    status, code = 405, "method_not_allowed"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"

    def headers(self) -> dict[str, str]:
        # Raised before the body is fully read: close the connection instead of draining the rest.
        return {"Connection": "close"}


class ImageTooLarge(ServiceError):
    status, code = 413, "image_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class UndecodableImage(ServiceError):
    status, code = 422, "undecodable_image"


class RequestTimeout(ServiceError):
    """The request head did not arrive within the header timeout (answered by the protocol layer)."""

    status, code = 408, "request_timeout"


class HeaderTooLarge(ServiceError):
    """Request line + headers over the limit (answered by the protocol layer, before the app)."""

    status, code = 431, "header_too_large"


class ClientClosedRequest(ServiceError):
    """The client went away before the answer was ready; only ever seen in metrics and logs."""

    status, code = 499, "client_closed_request"


class EngineFailure(ServiceError):
    status, code = 500, "engine_failure"


class Overloaded(ServiceError):
    status, code = 503, "overloaded"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class Draining(ServiceError):
    status, code = 503, "draining"


class DeadlineExceeded(ServiceError):
    status, code = 504, "deadline_exceeded"
