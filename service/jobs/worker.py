"""The pulling side of the shared store: each replica takes jobs from its models' streams only while its
own tile backlog has room, so work goes to the GPU that is free (docs/jobs.md#several-replicas).

- Pull: `XREADGROUP COUNT 1` when the work this replica holds is under one batch per engine instance;
  nothing is read ahead that could not start soon (it would hide work from idle replicas).
- Lease: while a job runs, its progress (per batch, and at least every lease/3 s) renews the entry's
  idle time; another replica reclaims an entry idle longer than the lease (`XAUTOCLAIM`).
- Fencing: every write carries the fence of our start; 'stale' or 'cancelled' back means the job is
  no longer ours, so its tiles are dropped here and nothing is written.
- Drain: no more pulls; jobs with no tile done go back to the stream at once, running ones finish
  within the drain budget or go back at close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from service.errors import ServiceError
from service.jobs.records import JobStoreUnavailable
from service.jobs.redis_store import Claim, RedisError, RedisJobs

log = logging.getLogger("gendr.jobs")


@dataclass
class JobOutput:
    body: bytes
    headers: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. where output_url put the result


RunJob = Callable[[dict[str, str], bytes, Callable[[int], None]], Awaitable[JobOutput]]
Finished = Callable[[dict[str, str], str], Awaitable[None]]


class HandBack(Exception):
    """Raised by a runner that cannot run the job here now (this replica is draining)."""


@dataclass
class Held:
    claim: Claim
    total: int
    task: asyncio.Task[None] | None = None
    pending: int = 0  # tiles done, not yet written
    done: int = 0
    stop: str | None = None  # why the task was cancelled: 'hand_back', 'stale', 'cancelled', 'gone'
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Worker:
    """One per process: a pull loop per model and one progress/lease loop for everything held."""

    def __init__(
        self,
        jobs: RedisJobs,
        models: list[str],
        *,
        capacity: Callable[[str], tuple[int, int] | None],
        run: RunJob,
        is_draining: Callable[[], bool],
        enter: Callable[[], None],
        leave: Callable[[], None],
        on_finished: Finished | None = None,
    ) -> None:
        self.jobs, self.models = jobs, models
        self._capacity, self._run_job, self._is_draining = capacity, run, is_draining
        self._enter, self._leave, self._on_finished = enter, leave, on_finished
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.held: dict[str, Held] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        lease = jobs.s.jobs_lease_s
        self.heartbeat_s = min(1.0, lease / 3)
        self.reclaim_every_s = max(0.2, lease / 4)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for m in self.models:
            self._tasks.append(asyncio.create_task(self._pull(m), name=f"gendr-pull-{m}"))
        self._tasks.append(asyncio.create_task(self._renew(), name="gendr-leases"))

    async def close(self) -> None:
        """Stop pulling; whatever is still held goes back to the stream for another replica."""
        self._stopping = True
        for h in list(self.held.values()):
            await self._give_back(h)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t

    def holding(self, model: str) -> int:
        return sum(h.total - h.done for h in self.held.values() if h.claim.model == model)

    def _room(self, model: str) -> bool:
        cap = self._capacity(model)
        if cap is None:
            return False  # not ready (starting, unhealthy)
        reserved, one_round = cap
        return max(reserved, self.holding(model)) < one_round

    # ------------------------------------------------------------------ pulling
    async def _pull(self, model: str) -> None:
        backoff, last_reclaim, last_warn, last_sweep = 0.2, 0.0, 0.0, time.monotonic()
        while not self._stopping:
            try:
                if self._is_draining():
                    for h in [h for h in self.held.values() if h.done == 0 and h.stop is None]:
                        await self._give_back(h)
                    await asyncio.sleep(0.1)
                    continue
                if not self._room(model):
                    await asyncio.sleep(0.02)
                    continue
                got = None
                if time.monotonic() - last_reclaim > self.reclaim_every_s:
                    last_reclaim = time.monotonic()
                    got = await self.jobs.reclaim(model, self.consumer)
                    if got:
                        log.info("job %s: reclaimed from a replica whose lease ran out", got[1])
                if time.monotonic() - last_sweep > 60:  # dead pods' consumer names, once their work moved
                    last_sweep = time.monotonic()
                    await self.jobs.forget_dead_consumers(model, max(60.0, 10 * self.jobs.s.jobs_lease_s))
                if got is None:
                    got = await self.jobs.read(model, self.consumer, block_ms=500)
                if got is not None:
                    await self._take(model, *got)
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except (JobStoreUnavailable, RedisError, OSError) as e:
                if time.monotonic() - last_warn > 10:
                    log.warning("job store unreachable (%s); retrying", e)
                    last_warn = time.monotonic()
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
            except Exception:
                log.exception("job pull loop of %s failed; retrying", model)
                await asyncio.sleep(1.0)

    async def _take(self, model: str, entry: str, job_id: str) -> None:
        status, fence = await self.jobs.start(model, entry, job_id, self.consumer)
        if status == "exhausted":
            log.warning(
                "job %s failed: started %d times, lost every time", job_id, self.jobs.s.jobs_max_attempts
            )
            await self._notify(job_id)
        if status != "started":
            return
        claim = Claim(job_id, model, entry, fence)
        rec = await self.jobs.record(job_id)
        data = await self.jobs.input(job_id)
        held = Held(claim, total=int((rec or {}).get("tiles_total", 1)))
        self.held[job_id] = held
        if rec is None or data is None:
            await self._finish(
                held, "failed", error={"code": "job_lost", "message": "the job's input is gone"}
            )
            return
        held.task = asyncio.create_task(self._run(held, rec, data), name=f"gendr-job-{job_id}")

    # ------------------------------------------------------------------ running
    def _progress_cb(self, held: Held) -> Callable[[int], None]:
        loop = self._loop

        def add(n: int) -> None:  # a batcher thread: count, and wake the lease loop to write it
            with held.lock:
                held.pending += n
                held.done += n
            if loop is not None:
                loop.call_soon_threadsafe(self._wake.set)

        return add

    async def _run(self, held: Held, rec: dict[str, str], data: bytes) -> None:
        self._enter()  # the app's drain waits for a running job like for a request in flight
        try:
            try:
                out = await self._run_job(rec, data, self._progress_cb(held))
            except asyncio.CancelledError:
                return  # handed back, cancelled or lost: whoever stopped us owns the outcome
            except HandBack:
                held.stop = "hand_back"
                await self._hand_back_now(held)
                return
            except ServiceError as e:
                await self._finish(held, "failed", error={"code": e.code, "message": e.message})
                return
            except Exception as e:
                log.exception("job %s failed", held.claim.id)
                err = {"code": "internal_error", "message": f"internal error ({type(e).__name__})"}
                await self._finish(held, "failed", error=err)
                return
            await self._finish(held, "succeeded", body=out.body, headers=out.headers, extra=out.extra)
        finally:
            self._leave()

    async def _finish(self, held: Held, phase: str, **kw: Any) -> None:
        """Write the outcome with our fence; Redis down → retry until the lease would have run out."""
        deadline = time.monotonic() + self.jobs.s.jobs_lease_s
        try:
            while True:
                try:
                    await self._flush(held)
                    res = await self.jobs.finish(held.claim, phase, **kw)
                    break
                except (JobStoreUnavailable, RedisError, OSError):
                    if time.monotonic() > deadline:
                        log.warning(
                            "job %s: outcome not stored (Redis away); another replica redoes it",
                            held.claim.id,
                        )
                        return
                    await asyncio.sleep(0.5)
            if res != "ok":
                log.info("job %s: outcome dropped (%s): the job is no longer ours", held.claim.id, res)
            elif self._on_finished is not None:
                await self._notify(held.claim.id)
        finally:
            self.held.pop(held.claim.id, None)

    async def _notify(self, job_id: str) -> None:
        if self._on_finished is None:
            return
        with contextlib.suppress(Exception):
            rec = await self.jobs.record(job_id)
            if rec is not None:
                await self._on_finished(rec, rec.get("phase", ""))

    # ------------------------------------------------------------------ leases and progress
    async def _flush(self, held: Held) -> str:
        with held.lock:
            n, held.pending = held.pending, 0
        try:
            res = await self.jobs.progress(held.claim, n, self.consumer)
        except BaseException:
            with held.lock:
                held.pending += n
            raise
        return res

    async def _renew(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await self._wake.wait()
            self._wake.clear()
            for held in list(self.held.values()):
                if held.stop is not None or held.task is None or held.task.done():
                    continue
                try:
                    res = await self._flush(held)
                except (JobStoreUnavailable, RedisError, OSError):
                    continue  # the lease may run out meanwhile; fencing keeps the outcome right
                if res != "ok":
                    log.info("job %s: %s; its tiles here are dropped", held.claim.id, res)
                    held.stop = res
                    held.task.cancel()
                    self.held.pop(held.claim.id, None)

    async def _give_back(self, held: Held) -> None:
        held.stop = "hand_back"
        if held.task is not None and not held.task.done():
            held.task.cancel()
            with contextlib.suppress(BaseException):
                await held.task
        await self._hand_back_now(held)

    async def _hand_back_now(self, held: Held) -> None:
        try:
            res = await self.jobs.hand_back(held.claim)
            log.info("job %s: handed back to the stream (%s)", held.claim.id, res)
        except (JobStoreUnavailable, RedisError, OSError):
            log.warning(
                "job %s: could not hand back (Redis away); it is reclaimed after the lease", held.claim.id
            )
        finally:
            self.held.pop(held.claim.id, None)
