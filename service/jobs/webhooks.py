"""Job webhooks, signed per the Standard Webhooks spec (www.standardwebhooks.com) and delivered at least
once.

Receivers verify `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` with the
shared `whsec_` secret and dedupe on `webhook-id`, which stays the same on every retry of a message;
the timestamp (and so the signature) is fresh on each try, so a receiver's replay window still
accepts a late retry. Every try goes through the SSRF check of `service.jobs.urls` again (a DNS
answer may change between tries). Delivery gives up after a bounded time and returns its state for
the job record.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from service.jobs.urls import UrlFetchFailed, UrlPolicy, UrlRefused, backoff_s, open_response

EVENTS = ("completed", "failed", "progress")
DEFAULT_EVENTS = ("completed", "failed")
SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 16  # the spec recommends 24 to 64 random bytes; below 128 bits is a mistake
DEFAULT_TOLERANCE_S = 300.0

DeliveryState = dict[str, Any]


def parse_secret(secret: str | bytes) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret; a clear ValueError for anything else (raw bytes pass)."""
    if isinstance(secret, bytes):
        key = secret
    else:
        if not secret.startswith(SECRET_PREFIX):
            raise ValueError(f"webhook secret must look like {SECRET_PREFIX}<base64 key>")
        b64 = secret[len(SECRET_PREFIX) :].strip()
        try:
            key = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"webhook secret: the part after {SECRET_PREFIX} is not valid base64") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"webhook secret: the key is {len(key)} bytes, at least {MIN_SECRET_BYTES} needed")
    return key


def new_secret() -> str:
    """A fresh 32-byte secret in the spec's format (for docs and operators)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def new_message_id() -> str:
    """A unique `webhook-id`; keep it with the job so every retry of this message reuses it."""
    return "msg_" + secrets.token_urlsafe(18)


def sign(secret: str | bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))."""
    mac = hmac.new(parse_secret(secret), f"{msg_id}.{int(timestamp)}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("ascii")


def verify(
    secret: str | bytes,
    msg_id: str,
    timestamp: int | str,
    body: bytes,
    signature: str,
    *,
    tolerance_s: float | None = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether one of the space-separated signatures is ours and the timestamp is within tolerance."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if tolerance_s is not None and abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    expected = sign(secret, msg_id, ts, body).encode()
    return any(hmac.compare_digest(expected, s.encode()) for s in signature.split())


def headers_for(secret: str | bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        "Content-Type": "application/json",
    }


def event_body(event: str, payload: Mapping[str, Any], at: float) -> bytes:
    """The message: `{"type": "job.<event>", "timestamp": ISO 8601, "data": payload}`, built once."""
    stamp = datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    msg = {"type": f"job.{event}", "timestamp": stamp, "data": dict(payload)}
    return json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode()


async def _post_once(
    url: str, body: bytes, headers: dict[str, str], policy: UrlPolicy, timeout_s: float
) -> int:
    """One try: the status code, or `UrlFetchFailed` / `UrlRefused`. No redirect is followed: a
    receiver that moved answers with a non-2xx, which is retried, then recorded."""
    try:
        async with asyncio.timeout(timeout_s):
            async with open_response(
                "POST",
                url,
                policy,
                headers=headers,
                content=body,
                follow_redirects=False,
                label="webhook_url",
            ) as resp:
                return resp.status_code
    except TimeoutError:
        raise UrlFetchFailed(f"webhook_url: no answer within {timeout_s:g} s") from None


async def deliver(
    url: str,
    msg_id: str,
    event_type: str,
    payload: Mapping[str, Any],
    secret: str | bytes,
    policy: UrlPolicy,
    max_s: float,
    *,
    on_attempt: Callable[[DeliveryState], Awaitable[None] | None] | None = None,
    backoff_base_s: float = 1.0,
    backoff_cap_s: float = 300.0,
    clock: Callable[[], float] = time.monotonic,
    now: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> DeliveryState:
    """POST one event until a 2xx or until `max_s` have passed (at least one try), with exponential
    back-off and full jitter between tries. Returns the delivery state to keep in the job record;
    `on_attempt(state)` sees it after every try (sync or async) so the job layer can persist it.

    A refused URL (the SSRF check) is final: retrying cannot make a private address public.
    """
    if event_type not in EVENTS:
        raise ValueError(f"webhook event {event_type!r}: expected one of {', '.join(EVENTS)}")
    key = parse_secret(secret)
    body = event_body(event_type, payload, now())
    state: DeliveryState = {
        "id": msg_id,
        "event": event_type,
        "attempts": 0,
        "delivered": False,
        "last_status": None,
        "last_error": None,
        "delivered_at": None,
    }
    start = clock()
    while True:
        state["attempts"] += 1
        remaining = max_s - (clock() - start)
        timeout = min(policy.timeout_s, max(remaining, 1.0))  # the first try gets time even if max_s is tiny
        final = False
        try:
            status = await _post_once(url, body, headers_for(key, msg_id, int(now()), body), policy, timeout)
            state["last_status"] = status
            if 200 <= status < 300:
                state.update(delivered=True, last_error=None, delivered_at=now())
            else:
                state["last_error"] = f"HTTP {status}"
        except UrlRefused as e:
            state.update(last_status=None, last_error=e.message)
            final = True
        except UrlFetchFailed as e:
            state.update(last_status=None, last_error=e.message)
        if on_attempt is not None:
            maybe = on_attempt(dict(state))
            if maybe is not None:
                await maybe
        if state["delivered"] or final:
            return state
        delay = backoff_s(state["attempts"], backoff_base_s, backoff_cap_s, rand)
        if clock() - start + delay >= max_s:
            return state
        await sleep(delay)
