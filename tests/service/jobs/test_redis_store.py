"""The shared store's state changes on a real Redis: leases and reclaim, fencing of a stale holder,
attempts, hand-back — the rules that keep a job's outcome single when replicas die or stall."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from redis_server import redis_server

pytest.importorskip("redis")

from service.jobs.redis_store import Claim, RedisJobs, connect
from service.settings import Settings


def store(url: str, **kw: object) -> RedisJobs:
    s = Settings(redis_url=url, jobs_lease_s=0.3, jobs_max_attempts=2, **kw)  # type: ignore[arg-type]
    return RedisJobs(connect(s), s)


async def submit(j: RedisJobs, tiles: int = 4) -> str:
    job_id, created = await j.submit(
        model="m", data=b"input", tiles=tiles, owner=None, idempotency=None,
        fields={"model": "m", "tiles_total": tiles, "format": "png", "created_at": time.time()},
    )  # fmt: skip
    assert created
    return job_id


async def take(j: RedisJobs, consumer: str, reclaim: bool = False) -> Claim:
    got = await (j.reclaim("m", consumer) if reclaim else j.read("m", consumer, 100))
    assert got is not None
    entry, job_id = got
    status, fence = await j.start("m", entry, job_id, consumer)
    assert status == "started", status
    return Claim(job_id, "m", entry, fence)


def test_a_stalled_holder_loses_the_job_and_its_late_result_is_dropped(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path) as rs:
            j = store(rs.url)
            job_id = await submit(j)
            slow = await take(j, "pod-a")
            assert await j.progress(slow, 1, "pod-a") == "ok"
            assert await j.backlog("m") == (3, 1)
            assert await j.reclaim("m", "pod-b") is None  # the lease is fresh
            await asyncio.sleep(0.45)  # pod-a stops renewing: the lease runs out
            fresh = await take(j, "pod-b", reclaim=True)
            assert fresh.fence == slow.fence + 1
            assert await j.backlog("m") == (4, 1)  # its done tile is redone by the new holder
            assert await j.progress(slow, 1, "pod-a") == "stale"
            assert await j.finish(slow, "succeeded", body=b"late") == "stale"
            assert await j.result(job_id) is None
            assert await j.finish(fresh, "succeeded", body=b"right") == "ok"
            assert await j.finish(fresh, "succeeded", body=b"again") == "succeeded"  # idempotent, no rewrite
            assert await j.result(job_id) == b"right"
            rec = await j.record(job_id)
            assert rec is not None and rec["phase"] == "succeeded" and rec["attempts"] == "2"
            assert await j.backlog("m") == (0, 0)  # acknowledged and deleted with the outcome
            assert await j.input(job_id) is None
            await j.r.aclose()

    asyncio.run(main())


def test_a_job_whose_holders_keep_dying_fails_with_job_lost(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path) as rs:
            j = store(rs.url)
            job_id = await submit(j)
            await take(j, "pod-a")
            await asyncio.sleep(0.45)
            await take(j, "pod-b", reclaim=True)
            await asyncio.sleep(0.45)
            entry, got_id = await j.reclaim("m", "pod-c")  # type: ignore[misc]
            assert got_id == job_id
            status, _ = await j.start("m", entry, got_id, "pod-c")
            assert status == "exhausted"
            rec = await j.record(job_id)
            assert rec is not None and rec["phase"] == "failed"
            assert json.loads(rec["error"])["code"] == "job_lost"
            assert await j.backlog("m") == (0, 0)
            assert await j.r.ttl(j.job(job_id)) > 0  # kept for the TTL, then gone
            await j.r.aclose()

    asyncio.run(main())


def test_hand_back_returns_the_job_without_spending_an_attempt(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path) as rs:
            j = store(rs.url)
            job_id = await submit(j)
            first = await take(j, "pod-a")
            assert await j.hand_back(first) == "ok"
            assert await j.hand_back(first) == "stale"  # once
            assert await j.queue_position("m", job_id) == 0
            again = await take(j, "pod-b")
            assert again.entry != first.entry and again.fence > first.fence
            rec = await j.record(job_id)
            assert rec is not None and rec["attempts"] == "1"
            assert await j.finish(again, "succeeded", body=b"x") == "ok"
            await j.r.aclose()

    asyncio.run(main())


def test_a_full_shared_queue_is_a_503(tmp_path: Path) -> None:
    async def main() -> None:
        from service.errors import Overloaded

        with redis_server(tmp_path) as rs:
            j = store(rs.url, jobs_max_backlog_tiles=6)
            await submit(j, tiles=4)
            with pytest.raises(Overloaded):
                await submit(j, tiles=4)
            await j.r.aclose()

    asyncio.run(main())
