"""GET /v1/jobs paging, the same for both stores: newest first, an opaque cursor, a bounded page.

A job's place in the list is (created_at, id), compared as a pair, so jobs created in the same
instant still page without a gap or a repeat. The cursor is that pair of the last job of a page,
base64url-encoded: opaque to clients (they only send it back) and checked like any other input.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable
from typing import TypeVar

from service.errors import BadRequest, ServiceError

DEFAULT_LIMIT = 20
MAX_LIMIT = 100  # jobs per page: a page is one bounded amount of work for the store
MAX_CURSOR_CHARS = 128
_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

Position = tuple[float, str]  # (created_at, id): the list is sorted by it, descending
T = TypeVar("T")


class ListingNeedsKeys(ServiceError):
    """GET /v1/jobs on an open server: with no API key there is no caller, and listing everyone's jobs
    would hand out every job id, which is the only capability to a result there."""

    status, code = 403, "forbidden"


def encode_cursor(pos: Position) -> str:
    raw = f"{pos[0]!r} {pos[1]}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> Position | None:
    """The position a cursor names (None: the first page); anything we did not make is a 400."""
    if cursor is None or cursor == "":
        return None
    bad = BadRequest("cursor is not one this server returned (send next_cursor back unchanged)")
    if len(cursor) > MAX_CURSOR_CHARS:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        score_s, _, job_id = raw.partition(" ")
        score = float(score_s)
    except (ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise bad from e
    if not math.isfinite(score) or not _ID.match(job_id):
        raise bad
    return score, job_id


def before(pos: Position, cursor: Position | None) -> bool:
    """Whether `pos` comes after `cursor` in the newest-first list."""
    return cursor is None or pos < cursor


def page(
    items: Iterable[tuple[Position, T]], cursor: Position | None, limit: int
) -> tuple[list[T], str | None]:
    """One page of (position, item) pairs in any order: the `limit` newest after `cursor`, next cursor."""
    ordered = sorted((p for p in items if before(p[0], cursor)), key=lambda p: p[0], reverse=True)
    got = ordered[: limit + 1]
    if len(got) > limit:
        return [item for _, item in got[:limit]], encode_cursor(got[limit - 1][0])
    return [item for _, item in got], None
