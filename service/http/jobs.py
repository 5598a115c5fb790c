"""The job store behind /v1/jobs (docs/jobs.md): long work as a job you poll instead of one long request.

- A job is admitted exactly like POST /upscale (same checks, same tile reservation, same 503 +
  Retry-After); the store only adds a bounded number of held jobs (`jobs_max`).
- Progress comes from the runtime's per-batch callback (`UpscaleJob.progress`): tiles done of total.
- Results and one small JSON record per job live under `jobs_dir`; records survive a restart, results
  expire after `jobs_ttl_s` and the oldest expire early when the results exceed `jobs_max_bytes`.
- Ids come from `secrets` (unguessable); with API keys, a job is visible only to the key that made it.
- Drain: queued jobs (no tile done yet) fail with code `draining`; running jobs count as in-flight work,
  so the app's drain waits for them, encode and write included.

The `Job` record, its errors and its files are in service/jobs/records.py; its JSON in service/jobs/view.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import tempfile
import time
from collections.abc import Callable, Hashable
from dataclasses import replace
from pathlib import Path
from typing import Any

from starlette.responses import FileResponse, JSONResponse, Response

from service.errors import ImageTooLarge, Overloaded, ServiceError
from service.http import images
from service.http.upscale import DEADLINE_HEADER, Admitted
from service.jobs import listing, view
from service.jobs.events import View
from service.jobs.extras import JobExtras, Notifier, put_output
from service.jobs.records import (
    ACTIVE,
    ID_BYTES,
    IdempotencyKeys,
    Job,
    JobExpired,
    JobFailed,
    JobFiles,
    JobNotFinished,
    JobNotFound,
    ResultElsewhere,
)
from service.metrics import Metrics
from service.runtime_api import RuntimeClient
from service.scheduling.pools import pool_for
from service.settings import Settings

log = logging.getLogger("gendr.jobs")


class JobStore:
    """Jobs of one app. All methods run on the event loop except `Job.add_tiles`."""

    def __init__(
        self,
        settings: Settings,
        pool: Any,
        enter: Callable[[], None],
        leave: Callable[[], None],
        is_draining: Callable[[], bool],
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._is_draining = is_draining
        self.root = Path(settings.jobs_dir or Path(tempfile.gettempdir()) / "gendr-jobs")
        self.files = JobFiles(self.root)
        self._pool = pool
        self._enter, self._leave = enter, leave
        self._jobs: dict[str, Job] = {}
        self._seq = 0
        self._watcher: asyncio.Task[None] | None = None
        self.notifier = Notifier(settings)
        self._idem = IdempotencyKeys(settings.jobs_idempotency_ttl_s)
        self._runtime: RuntimeClient | None = None
        self._load()

    shared = False

    # ------------------------------------------------------------------ the routes' calls (as SharedJobs)
    def hooks(
        self, owner: str | None, key: str | None, runtime: RuntimeClient, extras: JobExtras | None = None
    ) -> dict[str, Any]:
        """How POST /v1/jobs hands an admitted request to this store (service.http.upscale.Context)."""
        self._runtime = runtime
        self.make_room()

        async def hand_off(a: Admitted) -> Response:
            known = self._idem.find(owner, key, a.digest) if key is not None else None
            if known is not None and known in self._jobs:
                a.reservation.release()
                return self._accepted(self._jobs[known], 200)
            job = self.start(a, owner, extras)
            if key is not None:
                self._idem.remember(owner, key, a.digest, job.id)
            return self._accepted(job, 202)

        return {"hand_off": hand_off, "idempotency_key": key}

    def _event(self, job: Job, event: str) -> None:
        """A webhook event of `job` (its delivery state is saved in the job's record)."""
        if self._runtime is None or not job.webhook:
            return
        runtime = self._runtime

        def save(deliveries: list[dict[str, Any]]) -> None:
            assert job.webhook is not None
            job.webhook["deliveries"] = deliveries
            with contextlib.suppress(OSError):
                if job.id in self._jobs and job.phase != "active":
                    self.files.save(job)

        if event == "progress":
            self.notifier.progress(job.id, job.webhook, lambda: self.describe(job, runtime), save)
        else:
            self.notifier.send(job.id, job.webhook, event, lambda: self.describe(job, runtime), save)

    def _accepted(self, job: Job, status: int) -> Response:
        assert self._runtime is not None
        body = self.describe(job, self._runtime)
        return JSONResponse(body, status_code=status, headers={"Location": f"/v1/jobs/{job.id}"})

    async def get_view(self, job_id: str, owner: str | None, runtime: RuntimeClient) -> dict[str, Any]:
        return self.describe(self.get(job_id, owner), runtime)

    async def list_view(
        self, owner: str, limit: int, cursor: listing.Position | None, runtime: RuntimeClient
    ) -> tuple[list[dict[str, Any]], str | None]:
        """GET /v1/jobs: the owner's jobs held here, newest first, one page."""
        self.sweep()
        mine = [((j.created_at, j.id), j) for j in self._jobs.values() if j.owner == owner]
        jobs, nxt = listing.page(mine, cursor, limit)
        return [self.describe(j, runtime) for j in jobs], nxt

    async def poll(self, job_id: str, owner: str | None, runtime: RuntimeClient) -> tuple[Hashable, View]:
        """One look for the event stream: what an event follows (state, tiles, queue position)."""
        job = self.get(job_id, owner)
        if job.phase == "cancelled":  # being deleted: gone, as the shared store says at once
            raise JobNotFound(f"job {job_id} was deleted")
        ahead = len(self.unfinished_ahead(job)) if job.state == "queued" else 0

        async def full() -> dict[str, Any]:
            return self.describe(job, runtime)

        return (job.state, job.tiles_done, ahead), full

    async def result(self, job_id: str, owner: str | None) -> Response:
        job = self.get(job_id, owner)
        path = self.result_path(job)
        if not path.is_file():
            raise JobExpired(f"the result of job {job.id} is no longer stored")
        headers = {**job.headers, "Cache-Control": "no-store"}
        return FileResponse(path, media_type=images.CONTENT_TYPES[job.format], headers=headers)

    async def delete(self, job_id: str, owner: str | None, runtime: RuntimeClient) -> dict[str, Any]:
        job = self.get(job_id, owner)
        await self.cancel(job)
        return {**self.describe(job, runtime), "deleted": True}

    def _load(self) -> None:
        """Records of an earlier process: finished jobs stay readable; unfinished ones were interrupted."""
        for p in self.files.records():
            job = self.files.read(p)
            if job is None:
                log.warning("ignoring unreadable job record %s", p.name)
                continue
            if job.phase == "active":
                job.phase, job.finished_at = "failed", time.time()
                job.error = {"code": "interrupted", "message": "the server stopped before this job finished"}
                self.files.save(job)
            if job.phase == "succeeded" and not self.files.result(job).is_file():
                job.phase = "expired"
            self._jobs[job.id] = job
        self.sweep()

    # ------------------------------------------------------------------ bookkeeping

    def sweep(self) -> None:
        """Forget jobs finished more than `jobs_ttl_s` ago and enforce the byte cap."""
        now = time.time()
        for job in list(self._jobs.values()):
            if job.finished_at is not None and now - job.finished_at > self.settings.jobs_ttl_s:
                del self._jobs[job.id]
                self.files.remove(job, record=True)
        self._enforce_bytes()

    def stored_bytes(self) -> int:
        return sum(j.result_bytes for j in self._jobs.values() if j.phase == "succeeded")

    def _enforce_bytes(self, keep: str | None = None) -> None:
        over = self.stored_bytes() - self.settings.jobs_max_bytes
        for job in sorted(self._jobs.values(), key=lambda j: j.finished_at or 0.0):
            if over <= 0:
                return
            if job.phase == "succeeded" and job.id != keep:
                over -= job.result_bytes
                job.phase = "expired"
                self.files.remove(job, record=False)
                self.files.save(job)
                log.info("job %s: result expired early (jobs_max_bytes)", job.id)

    def make_room(self) -> None:
        """Before admitting a job: at `jobs_max`, drop the oldest finished job, or 503 if none is finished."""
        self.sweep()
        if len(self._jobs) < self.settings.jobs_max:
            return
        done = [j for j in self._jobs.values() if j.phase != "active"]
        if not done:
            raise Overloaded(
                f"{len(self._jobs)} jobs are unfinished (the limit is {self.settings.jobs_max})",
                retry_after_s=self.settings.retry_after_s,
            )
        oldest = min(done, key=lambda j: j.finished_at or 0.0)
        del self._jobs[oldest.id]
        self.files.remove(oldest, record=True)

    def get(self, job_id: str, owner: str | None) -> Job:
        """The job, if it exists and `owner` may see it (others get the same 404 as for no job at all)."""
        self.sweep()
        job = self._jobs.get(job_id) or self._from_disk(job_id)
        if job is None or (job.owner is not None and not secrets.compare_digest(job.owner, owner or "")):
            raise JobNotFound(f"no job {job_id!r} (finished jobs are kept {self.settings.jobs_ttl_s:g} s)")
        return job

    def _from_disk(self, job_id: str) -> Job | None:
        """A finished job of another process sharing `jobs_dir` (a replica, or before a restart)."""
        job = self.files.read(self.files.record(job_id))
        if job is None or job.phase == "active" or job.id != job_id:
            return None  # still running over there: only that process knows its progress
        if job.phase == "succeeded" and not self.files.result(job).is_file():
            job.phase = "expired"
        self._jobs[job.id] = job
        return job

    def result_path(self, job: Job) -> Path:
        if job.state in ACTIVE:
            raise JobNotFinished(f"job {job.id} is {job.state}; poll GET /v1/jobs/{job.id}")
        if job.to_output_url:
            raise ResultElsewhere(f"the result of job {job.id} was written to its output_url")
        if job.phase == "expired":
            raise JobExpired(f"the result of job {job.id} was removed to make room (jobs_max_bytes)")
        if job.phase != "succeeded":
            err = job.error or {}
            raise JobFailed(f"job {job.id} {job.phase}: {err.get('message', 'no result')}")
        return self.files.result(job)

    def unfinished_ahead(self, job: Job) -> list[Job]:
        return [
            j for j in self._jobs.values() if j.phase == "active" and j.model == job.model and j.seq < job.seq
        ]

    # ------------------------------------------------------------------ running

    def start(self, a: Admitted, owner: str | None, extras: JobExtras | None = None) -> Job:
        """Take over an admitted request (its reservation included) and run it in the background."""
        try:
            self._seq += 1
            job = Job(
                id=secrets.token_urlsafe(ID_BYTES),
                owner=owner,
                model=a.model.name,
                tiles_total=a.tiles,
                out_width=a.job.out_width,
                out_height=a.job.out_height,
                format=a.fmt,
                scale=a.scale,
                created_at=time.time(),
                seq=self._seq,
            )
            if extras is not None:
                job.webhook = extras.record().get("webhook")
                job.output_url = extras.output_url
            deadline = a.job.deadline
            if a.params.deadline_ms is None and DEADLINE_HEADER not in a.request.headers:
                deadline = a.reservation.created + self.settings.max_deadline_s  # jobs are for long work
            loop = asyncio.get_running_loop()
            events = self.notifier.wants(job.webhook, "progress")
            queued = self.metrics.job_queue_seconds.labels(model=job.model)

            def progress(n: int) -> None:  # a batcher thread: count it, then maybe a progress event
                if job.add_tiles(n):
                    queued.observe(max(0.0, time.time() - job.created_at))
                if events:
                    loop.call_soon_threadsafe(self._event, job, "progress")

            up = replace(a.job, deadline=deadline, progress=progress)
            self.files.save(job)
        except BaseException:
            a.reservation.release()
            raise
        self._jobs[job.id] = job
        self.metrics.jobs_created.labels(model=job.model).inc()
        self._enter()  # the app's drain waits for this job like for a request in flight
        job.task = asyncio.get_running_loop().create_task(self._run(job, a, up), name=f"gendr-job-{job.id}")
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_drain(), name="gendr-jobs")
        return job

    async def _run(self, job: Job, a: Admitted, up: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            outcome = await a.model.upscale(up, a.reservation)
            s = self.settings
            pool = pool_for(self._pool, outcome.image.shape[0] * outcome.image.shape[1])
            body = await loop.run_in_executor(
                pool,
                images.encode,
                outcome.image,
                a.decoded,
                a.fmt,
                a.quality,
                s.png_compress_level,
                a.params.metadata or "strip",
            )
            del outcome
            if job.output_url:
                await put_output(job.output_url, body, images.CONTENT_TYPES[a.fmt], s)
                job.to_output_url = True
            else:
                if len(body) > s.jobs_max_bytes:
                    raise ImageTooLarge(
                        f"the result ({len(body)} bytes) exceeds the job store's jobs_max_bytes"
                    )
                await loop.run_in_executor(self._pool, self.files.write, job, body)
                job.result_bytes = len(body)
            job.headers = {
                "X-Model": a.model.name,
                "X-Backend": a.model.info.name,
                "X-Precision": a.model.info.precision,
                "X-Tiles": str(job.tiles_total),
                "X-Image-Size": f"{job.out_width}x{job.out_height}",
            }
            job.phase = "succeeded"
        except asyncio.CancelledError:
            if job.phase == "active":
                job.phase = "cancelled"
                job.error = {"code": "cancelled", "message": "the job was cancelled"}
        except ServiceError as e:
            job.phase = "failed"
            job.error = {"code": e.code, "message": e.message}
        except Exception as e:
            log.exception("job %s failed", job.id)
            job.phase = "failed"
            job.error = {"code": "internal_error", "message": f"internal error ({type(e).__name__})"}
        finally:
            a.reservation.release()
            if job.finished_at is None:
                job.finished_at = time.time()
            if job.phase == "failed":
                log.info("job %s failed: %s", job.id, (job.error or {}).get("message"))
            if job.phase in ("succeeded", "failed"):
                self._event(job, "completed" if job.phase == "succeeded" else "failed")
            self.metrics.jobs_finished.labels(model=job.model, state=job.phase).inc()
            if job.started_mono is not None:
                run_s = time.monotonic() - job.started_mono
                self.metrics.job_run_seconds.labels(model=job.model).observe(run_s)
            with contextlib.suppress(OSError):
                if job.id in self._jobs:
                    self.files.save(job)
                    if job.phase == "succeeded":
                        self._enforce_bytes(keep=job.id)
            self._leave()

    async def _watch_drain(self) -> None:
        """While jobs are unfinished: once the app drains, fail the ones whose tiles have not started."""
        while any(j.phase == "active" for j in self._jobs.values()):
            if self._is_draining():
                for j in list(self._jobs.values()):
                    if j.state == "queued" and j.task is not None:
                        j.phase, j.finished_at = "failed", time.time()
                        j.error = {
                            "code": "draining",
                            "message": "the server shut down before this job started; submit it again",
                        }
                        j.task.cancel()
            await asyncio.sleep(0.05)

    async def cancel(self, job: Job) -> None:
        """DELETE: stop an unfinished job (its unrun tiles are dropped) and forget it, result included."""
        if job.phase == "active" and job.task is not None:
            job.phase, job.finished_at = "cancelled", time.time()
            job.error = {"code": "cancelled", "message": "the job was cancelled"}
            job.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job.task
        self._jobs.pop(job.id, None)
        self.files.remove(job, record=True)

    def describe(self, job: Job, runtime: RuntimeClient) -> dict[str, Any]:
        """The job as GET /v1/jobs/{id} returns it: state, progress, queue position, ETA."""
        return view.describe(job, self.unfinished_ahead(job) if job.state in ACTIVE else [], runtime)
