"""The JSON error body every route answers with, and the OpenAPI entries that declare it (one source for
app.py's routes and the job routes)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    code: str
    message: str
    retry_after_s: float | None = None
    request_id: str | None = None


class ErrorBody(BaseModel):
    """Every error response: a stable `code` (docs/http.md) and a human `message`."""

    error: ErrorDetail


UPLOAD_ERRORS: dict[int, str] = {
    400: "bad options (`bad_request`)",
    401: "missing or wrong API key (`unauthorized`)",
    404: "unknown model (`model_not_found`)",
    413: "body (`payload_too_large`) or pixel limit (`image_too_large`)",
    415: "not an accepted image format or animated (`unsupported_media_type`)",
    422: "corrupt or truncated image (`undecodable_image`)",
    429: "the API key is over its quota (`rate_limited`); see Retry-After and RateLimit-*",
    500: "engine failure (`engine_failure`)",
    503: "saturated (`overloaded`), `draining` or `not_ready`; see Retry-After",
    504: "the deadline passed (`deadline_exceeded`)",
}


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these statuses, each with the ErrorBody schema."""
    return {s: {"model": ErrorBody, "description": d} for s, d in descriptions.items()}
