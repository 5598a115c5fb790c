"""What one image goes through, written once for both clients: generators that yield a `Call` (the
driver answers with the httpx.Response, or throws the typed error in) or a `Wait` (the driver sleeps).

Why this shape: the retry rules of a job (same Idempotency-Key on a resubmission, Retry-After, what is
resubmitted and what is never deleted) are subtle enough that the sync and the async client must not
carry two copies of them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from gendr_client._core import Backoff, Options, Result, result_from, server_deadline_ms
from gendr_client._estimate import READ_SLACK_S, ServerInfo, estimate
from gendr_client.errors import (
    GendrError,
    JobExpired,
    JobNotFound,
    NotFound,
    Retryable,
    from_error,
    is_transient,
)

Progress = Callable[[int, int], None]  # (tiles done, tiles total)
ACTIVE = ("queued", "running")
# A finished job failed by the service's life cycle, not by the image: a new submission is a new job.
RESUBMIT_CODES = frozenset({"draining", "job_lost", "interrupted"})
MAX_RESUBMITS = 3  # per image: a job lost more often than this points at the image or the deployment
POLL_CAP_S = 5.0  # polls back off more gently than submissions: a GET is cheap, a restart takes seconds
CONNECT_S, WRITE_S = 10.0, 60.0  # timeouts of a direct request other than its read timeout


@dataclass(frozen=True)
class Call:
    method: str
    url: str
    kw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Wait:
    seconds: float


Step = Call | Wait
Flow = Generator[Step, Any, Result]


@dataclass
class Tracker:
    """The job a flow is waiting for: what the driver deletes when the caller gives up (deadline, Ctrl-C,
    task cancelled), and only then: a 404 or a failed poll never deletes anything."""

    active: str | None = None


def new_key() -> str:
    return str(uuid.uuid4())


def check_key(key: str) -> str:
    """The service takes 1–255 printable ASCII characters; say so here rather than as a 400 later."""
    if not 1 <= len(key) <= 255 or not all(" " <= c <= "~" for c in key):
        raise ValueError("idempotency_key must be 1-255 printable ASCII characters")
    return key


def direct_flow(data: bytes, opts: Options, backoff: Backoff, read_timeout_s: float = 60.0) -> Flow:
    """POST /upscale, retried on 503 and connection failures until the deadline.

    `read_timeout_s` comes from the server's estimate for this image (_estimate.py): waiting less than
    the work takes would make the client give up on, and send again, a request the server is computing.
    """
    while True:
        headers = {"Content-Type": "application/octet-stream", "X-Deadline-Ms": server_deadline_ms(backoff)}
        read = max(
            1.0, min(read_timeout_s, backoff.left() + READ_SLACK_S)
        )  # the server stops at the deadline
        kw = {"params": opts.params(), "content": data, "headers": headers}
        try:
            r = yield Call("POST", "/upscale", {**kw, "timeout": (CONNECT_S, read, WRITE_S, CONNECT_S)})
        except Retryable as e:
            yield Wait(backoff.next_wait(e))
            continue
        return result_from(r.content, r.headers)


def job_flow(
    data: bytes,
    opts: Options,
    backoff: Backoff,
    *,
    poll_s: float,
    on_progress: Progress | None,
    tracker: Tracker,
    key: str | None = None,
    max_resubmits: int = MAX_RESUBMITS,
) -> Flow:
    """Submit (one Idempotency-Key for every try of this submission), poll any replica, fetch, delete.

    A job that 404s is gone (expired, or lost with its store): submitted again with the same key, so a
    service that still knows the key answers with the same job instead of starting a second one. A job
    failed by a drain, a restart or too many replica deaths is finished: submitted again with a new key.
    """
    key = check_key(key) if key is not None else new_key()
    resubmits = 0
    while True:
        job = yield from _submit(data, opts, key, backoff)
        url = f"/v1/jobs/{job['id']}"
        tracker.active = url
        done = yield from _poll(job, backoff, poll_s, on_progress)
        if done is None:
            tracker.active = None
            why: GendrError = JobNotFound(f"job {job['id']} is gone (expired or lost)", status=404)
        elif done["state"] == "succeeded":
            if on_progress:
                on_progress(done["tiles"]["total"], done["tiles"]["total"])
            result = yield from _fetch(done, backoff)
            tracker.active = None
            if result is not None:
                yield from _forget(url)  # frees the stored result now rather than at its expiry
                return result
            why, key = JobExpired(f"the result of job {job['id']} is gone", status=410), new_key()
        else:
            tracker.active = None
            why = from_error(done.get("error") or {"code": "job_failed", "message": done["state"]}, 409)
            if why.code not in RESUBMIT_CODES:
                raise why
            key = new_key()
        resubmits += 1
        if resubmits > max_resubmits:
            why.message = f"{why.message} (after {max_resubmits} resubmission(s))"
            raise why
        yield Wait(backoff.next_wait(why))


def _submit(data: bytes, opts: Options, key: str, backoff: Backoff) -> Generator[Step, Any, dict[str, Any]]:
    """POST /v1/jobs until it is answered: a retry after no answer cannot make a second job (same key)."""
    headers = {"Idempotency-Key": key}
    while True:
        try:
            r = yield Call("POST", "/v1/jobs", {"params": opts.params(), "content": data, "headers": headers})
        except GendrError as e:
            if not is_transient(e):
                raise
            yield Wait(backoff.next_wait(e))
            continue
        backoff.reset()
        job: dict[str, Any] = r.json()
        return job


def _poll(
    job: dict[str, Any], backoff: Backoff, poll_s: float, on_progress: Progress | None
) -> Generator[Step, Any, dict[str, Any] | None]:
    """GET the job (any replica answers) until it is finished; None when it is gone (404)."""
    url, wait = f"/v1/jobs/{job['id']}", poll_s
    while job["state"] in ACTIVE:
        if on_progress:
            on_progress(job["tiles"]["done"], job["tiles"]["total"])
        backoff.check(f"job {job['id']} was {job['state']}")
        yield Wait(min(wait, max(0.0, backoff.left())))
        try:
            job = (yield Call("GET", url)).json()
        except NotFound:
            return None
        except GendrError as e:
            if not is_transient(e):
                raise
            wait = max(poll_s, backoff.next_wait(e, cap_s=POLL_CAP_S))  # a restart, Redis away: ask again
            continue
        wait = poll_s
        backoff.reset()
    return job


def _fetch(job: dict[str, Any], backoff: Backoff) -> Generator[Step, Any, Result | None]:
    """GET the result; None when it is no longer stored (404, 410)."""
    while True:
        try:
            r = yield Call("GET", f"/v1/jobs/{job['id']}/result")  # server-relative: a root path would double
        except (NotFound, JobExpired):
            return None
        except GendrError as e:
            if not is_transient(e):
                raise
            yield Wait(backoff.next_wait(e, cap_s=POLL_CAP_S))
            continue
        return result_from(r.content, r.headers, job_id=job["id"])


def _forget(url: str) -> Generator[Step, Any, None]:
    """DELETE a finished job; best effort (it expires anyway)."""
    try:
        yield Call("DELETE", url)
    except GendrError:
        pass


def upscale_flow(
    data: bytes,
    options: dict[str, Any],
    deadline_s: float,
    use_job: bool | None,
    *,
    poll_s: float,
    on_progress: Progress | None,
    idempotency_key: str | None,
    info: ServerInfo | None = None,
) -> tuple[Flow, Tracker]:
    """One image's flow for either client: one request, or a job when the server's estimate for the
    image (`info`: its GET /v1/models) is too long for one request (or when asked)."""
    opts = Options(**options)
    backoff = Backoff(deadline_s)
    tracker = Tracker()
    est = estimate(data, opts, use_job, info)
    if not est.use_job:
        return direct_flow(data, opts, backoff, est.read_timeout_s), tracker
    flow = job_flow(
        data, opts, backoff, poll_s=poll_s, on_progress=on_progress, tracker=tracker, key=idempotency_key
    )
    return flow, tracker
