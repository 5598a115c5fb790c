"""The client's retry rules over real HTTP: Idempotency-Key on every try, Retry-After, polls through
dropped connections and 503s, no DELETE because of a 404.

The claims are about what the client sends, so the server is a small scripted HTTP server on loopback
(http.server on a real socket) that records every request and can drop a connection after reading the
request, answer 503 with Retry-After, or forget a job, exactly when the test says. Waits go through
an injected sleep that records them, so Retry-After is checked without waiting it.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from stub_server import PNG, Stub

import gendr_client
from gendr_client import AsyncClient, Client


def upscale(kind: str, stub: Stub, sleeps: list[float], **kw: Any) -> gendr_client.Result:
    """One job through the sync or the async client, every wait recorded instead of slept."""
    kw = {"use_job": True, "scale": 1, **kw}
    deadline = kw.pop("deadline_s", 60.0)
    if kind == "sync":
        with Client(stub.url, deadline_s=deadline, poll_s=0.01, sleep=sleeps.append) as c:
            return c.upscale(PNG, **kw)

    async def record(s: float) -> None:
        sleeps.append(s)

    async def run() -> gendr_client.Result:
        async with AsyncClient(stub.url, deadline_s=deadline, poll_s=0.01, sleep=record) as c:
            return await c.upscale(PNG, **kw)

    return asyncio.run(run())


KINDS = pytest.mark.parametrize("kind", ["sync", "async"])


@KINDS
def test_a_lost_answer_and_a_503_are_retried_with_the_same_key(kind: str, stub: Stub) -> None:
    """The first POST is acted on but its answer lost, the second is refused with Retry-After: 7; the
    third, with the same key, gets the job the first one made: one job, not two."""
    stub.script["submit"] = ["drop", ("503", 7)]
    sleeps: list[float] = []
    res = upscale(kind, stub, sleeps)
    keys = [p.headers.get("Idempotency-Key") for p in stub.posts()]
    assert len(keys) == 3 and len(set(keys)) == 1 and uuid.UUID(str(keys[0])).version == 4
    assert len(stub.keys) == 1 and res.job_id == stub.keys[keys[0]]  # the job of the first POST
    assert (res.width, res.height, res.data) == (8, 6, PNG)
    assert any(7.0 <= s <= 7.0 * 1.5 for s in sleeps), sleeps  # Retry-After honoured, jitter ≤ 50 %
    assert stub.deletes() == [f"/v1/jobs/{res.job_id}"]  # only the finished job, after its result


@KINDS
def test_polls_ride_out_errors_and_a_404_resubmits_without_a_delete(kind: str, stub: Stub) -> None:
    """Polls: a dropped connection and a 503 are asked again (no resubmission); then the job is gone
    (404): submitted again with the same key, and the lost job is never DELETEd."""
    stub.script["poll"] = ["drop", ("503", 3), "404"]
    sleeps: list[float] = []
    res = upscale(kind, stub, sleeps, idempotency_key="photo-42")
    posts = stub.posts()
    assert [p.headers.get("Idempotency-Key") for p in posts] == ["photo-42", "photo-42"]
    polls = [s.path for s in stub.seen if s.method == "GET" and not s.path.endswith("/result")]
    lost = polls[0]
    assert polls[:3] == [lost] * 3 and res.job_id and lost != f"/v1/jobs/{res.job_id}"
    assert lost not in stub.deletes() and stub.deletes() == [f"/v1/jobs/{res.job_id}"]
    assert any(3.0 <= s <= 4.5 for s in sleeps), sleeps


@KINDS
def test_a_job_lost_by_the_service_is_resubmitted_with_a_new_key(kind: str, stub: Stub) -> None:
    """`job_lost` (and `draining`, `interrupted`) finished that job: the image is a new submission."""
    stub.script["poll"] = [("failed", "job_lost"), ("failed", "draining")]
    res = upscale(kind, stub, [])
    keys = [p.headers.get("Idempotency-Key") for p in stub.posts()]
    assert len(keys) == 3 and len(set(keys)) == 3
    assert stub.deletes() == [f"/v1/jobs/{res.job_id}"]


def test_resubmissions_are_bounded_and_other_failures_are_not_retried(stub: Stub) -> None:
    stub.script["poll"] = ["404"] * 10
    with pytest.raises(gendr_client.JobNotFound, match="resubmission"):
        upscale("sync", stub, [])
    assert len(stub.posts()) == 4 and not stub.deletes()  # the first try and 3 more

    stub.seen.clear()
    stub.script["poll"] = [("failed", "engine_failure")]
    with pytest.raises(gendr_client.EngineFailure):
        upscale("sync", stub, [])
    assert len(stub.posts()) == 1 and not stub.deletes()


def test_a_caller_that_gives_up_deletes_its_job(stub: Stub) -> None:
    """The deadline passing is the caller giving up: the unfinished job is cancelled (DELETE)."""
    stub.script["poll"] = ["hang"] * 1000
    with pytest.raises(gendr_client.DeadlineExceeded):
        with Client(stub.url, deadline_s=0.3, poll_s=0.02) as c:
            c.upscale(PNG, use_job=True)
    job = stub.posts() and stub.keys[str(stub.posts()[0].headers.get("Idempotency-Key"))]
    assert stub.deletes() == [f"/v1/jobs/{job}"]


def test_a_bad_idempotency_key_is_refused_before_sending(stub: Stub) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        upscale("sync", stub, [], idempotency_key="é")
    assert not stub.seen
