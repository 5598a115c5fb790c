"""GET /v1/jobs/{id}/events as Server-Sent Events, the same for both stores (docs/jobs.md#events).

The stream polls the job's record at a short interval (the embedded store's memory, or Redis on any
replica) rather than subscribing to anything: it works wherever the job runs, survives a replica dying
mid-job, and costs one small read per poll. What is sent:

- `progress`: the job as GET /v1/jobs/{id} returns it, first at once, then whenever its state, tiles
  done or queue position change;
- `done`: the job in its final state (succeeded, failed, cancelled, expired), then the stream ends;
- `error`: `{"error": {code, message}}` when the job is gone (deleted, expired), then the stream ends;
- a comment line every `heartbeat_s` without an event, so proxies keep the connection open.

The stream ends after `max_s` and when the replica drains; `retry:` tells EventSource to reconnect
(any replica answers with the current state first, so nothing is missed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

from service.jobs.records import ACTIVE, JobNotFound, JobStoreUnavailable

log = logging.getLogger("gendr.jobs")

View = Callable[[], Awaitable[dict[str, Any]]]
# One cheap look at the job → (what changes when an event is due, how to build the full view).
Poll = Callable[[], Awaitable[tuple[Hashable, View]]]


@dataclass(frozen=True)
class StreamLimits:
    poll_s: float = 0.25
    heartbeat_s: float = 15.0
    max_s: float = 3600.0  # a client that wants longer reconnects (and gets the current state first)
    retry_ms: int = 2000


LIMITS = StreamLimits()


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One event: JSON on a single `data:` line (JSON never contains a raw newline)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


async def job_events(
    poll: Poll, *, stop: Callable[[], bool], limits: StreamLimits | None = None
) -> AsyncIterator[bytes]:
    """The event stream of one job (its first `poll` has already passed the visibility check)."""
    lim = limits or LIMITS
    yield f"retry: {lim.retry_ms}\n\n".encode()
    start = last_sent = time.monotonic()
    last: Hashable = object()
    while True:
        try:
            key, view = await poll()
            if key != last:
                body = await view()
                last, last_sent = key, time.monotonic()
                if body.get("state") not in ACTIVE:
                    yield sse("done", body)
                    return
                yield sse("progress", body)
        except JobNotFound as e:
            yield sse("error", {"error": {"code": e.code, "message": e.message}})
            return
        except JobStoreUnavailable:
            pass  # Redis away for a moment: keep the stream (heartbeats) and look again
        now = time.monotonic()
        if stop():
            yield comment("this replica is shutting down: reconnect")
            return
        if now - start >= lim.max_s:
            yield comment("stream time limit reached: reconnect")
            return
        if now - last_sent >= lim.heartbeat_s:
            yield comment("keep-alive")
            last_sent = now
        await asyncio.sleep(lim.poll_s)
