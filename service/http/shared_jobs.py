"""/v1/jobs on the shared Redis store (`GENDR_REDIS_URL`, docs/jobs.md#several-replicas): the HTTP side.

POST checks and probes the upload exactly as /upscale does, then stores it and appends the job to its
model's stream (no local admission: any replica with room takes it). `run_job` is how this replica runs
a job it pulled: the /upscale steps from the stored bytes. The stream mechanics are service/jobs/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Hashable
from typing import Any

from starlette.responses import JSONResponse, Response

from service.errors import Draining, NotReady, Overloaded
from service.http import images
from service.http.output_size import output_size
from service.http.upscale import Checked, UpscaleParams
from service.jobs import listing
from service.jobs.events import View
from service.jobs.extras import JobExtras, Notifier, put_output
from service.jobs.records import (
    ACTIVE,
    JobExpired,
    JobFailed,
    JobNotFinished,
    JobNotFound,
    JobStoreUnavailable,
    ResultElsewhere,
    iso,
)
from service.jobs.redis_store import RedisJobs, connect
from service.jobs.worker import HandBack, JobOutput, Worker
from service.requests import UpscaleJob
from service.scheduling.pools import pool_for

log = logging.getLogger("gendr.jobs")


def _state_of(rec: dict[str, str]) -> str:
    phase = rec.get("phase", "active")
    if phase != "active":
        return phase
    return "running" if int(rec.get("tiles_done", 0) or 0) > 0 else "queued"


class SharedJobs:
    """The job API over Redis for one app; its worker pulls jobs for every model this replica serves."""

    shared = True

    def __init__(self, st: Any) -> None:
        self.st = st  # service.http.lifecycle.GendrState
        self.s = st.settings
        self.jobs = RedisJobs(connect(self.s), self.s)
        self.worker = Worker(
            self.jobs,
            list(st.runtime.models),
            capacity=self._capacity,
            run=self.run_job,
            is_draining=lambda: st.draining,
            enter=st.enter,
            leave=st.leave,
            on_finished=self._finished,
        )
        self.consumers: dict[str, int] = {}  # replicas pulling each model, as last seen in Redis
        self.notifier = Notifier(self.s)
        self.metrics = st.metrics
        self._marks: set[asyncio.Task[None]] = set()  # first-tile writes in flight (kept referenced)

    async def start(self) -> None:
        self.worker.start()

    async def close(self) -> None:
        await self.worker.close()
        await self.notifier.close()
        await self.jobs.r.aclose()

    def _capacity(self, model: str) -> tuple[int, int] | None:
        """(tiles reserved here, one round of work: a full batch per engine instance) — None if not ready."""
        if not self.st.started or self.st.draining:
            return None
        mr = self.st.runtime.models.get(model)
        if mr is None or not mr.ready:
            return None
        stats = mr.batcher.stats()
        instances = sum(1 for i in stats["instances"] if i["healthy"]) or 1
        return int(stats["reserved_tiles"]), mr.batcher.max_batch * instances

    async def _finished(self, rec: dict[str, str], phase: str) -> None:
        self._count_finished(rec, phase)
        event = {"succeeded": "completed", "failed": "failed"}.get(phase)
        webhook = json.loads(rec.get("webhook") or "null")
        if event is not None and webhook:
            self._send(rec["id"], webhook, event)

    def _count_finished(self, rec: dict[str, str], phase: str) -> None:
        """Job metrics where the job ended: its final state, and first tile → now when it had one."""
        model = rec.get("model", "unknown")
        self.metrics.jobs_finished.labels(model=model, state=phase).inc()
        if rec.get("first_tile_at"):
            run_s = max(0.0, time.time() - float(rec["first_tile_at"]))
            self.metrics.job_run_seconds.labels(model=model).observe(run_s)

    def _first_tile(self, rec: dict[str, str]) -> None:
        """The first tile of this run landed: the job's first ever (set once in Redis) → its queue time."""
        now = time.time()

        async def mark() -> None:
            with contextlib.suppress(Exception):
                if await self.jobs.set_once(rec["id"], "first_tile_at", repr(now)):
                    queued = max(0.0, now - float(rec["created_at"]))
                    self.metrics.job_queue_seconds.labels(model=rec["model"]).observe(queued)

        task = asyncio.get_running_loop().create_task(mark())
        self._marks.add(task)
        task.add_done_callback(self._marks.discard)

    def _send(self, job_id: str, webhook: dict[str, Any], event: str) -> None:
        async def view() -> dict[str, Any]:
            rec = await self.jobs.record(job_id)
            return await self.describe(rec) if rec is not None else {"id": job_id}

        async def save(deliveries: list[dict[str, Any]]) -> None:
            await self.jobs.set_field(job_id, "webhook", {**webhook, "deliveries": deliveries})

        self.notifier.send(job_id, webhook, event, view, save)

    # ------------------------------------------------------------------ the routes' calls
    async def enqueue(self, c: Checked, owner: str | None, extras: JobExtras | None = None) -> Response:
        q = c.params.quality or self.s.output_quality
        fields = {
            "model": c.model.name,
            "tiles_total": c.tiles,
            "tiles_done": 0,
            "out_width": c.out_width,
            "out_height": c.out_height,
            "format": c.fmt,
            "scale": c.scale,
            "quality": q,
            "created_at": time.time(),
            "params": c.params.model_dump(exclude_none=True),
            "attempts": 0,
            "worker": "",
        }
        if extras is not None:
            fields.update(extras.record())
            if extras.output_url:
                fields["output_url"] = extras.output_url  # a credential: kept for the worker, never shown
        idem = (c.request.headers["idempotency-key"], c.digest or "") if c.digest is not None else None
        try:
            job_id, created = await self.jobs.submit(
                model=c.model.name, data=c.data, tiles=c.tiles, fields=fields, owner=owner, idempotency=idem
            )
        except Overloaded as e:  # the shared queue is full: say when the fleet will have room
            tiles, _ = await self.jobs.backlog(c.model.name)
            with contextlib.suppress(Exception):
                self.consumers[c.model.name] = await self.jobs.consumers(c.model.name)
            e.retry_after_s = self.retry_after(c.model.name, tiles - self.s.jobs_max_backlog_tiles + c.tiles)
            raise
        if created:
            self.metrics.jobs_created.labels(model=c.model.name).inc()
        body = await self.describe(await self._record(job_id, owner))
        return JSONResponse(
            body, status_code=202 if created else 200, headers={"Location": f"/v1/jobs/{job_id}"}
        )

    async def _record(self, job_id: str, owner: str | None) -> dict[str, str]:
        rec = await self.jobs.record(job_id)
        if rec is None or (rec.get("owner") and not secrets.compare_digest(rec["owner"], owner or "")):
            raise JobNotFound(f"no job {job_id!r} (finished jobs are kept {self.s.jobs_ttl_s:g} s)")
        return rec

    async def get(self, job_id: str, owner: str | None) -> dict[str, Any]:
        return await self.describe(await self._record(job_id, owner))

    async def list_view(
        self, owner: str, limit: int, cursor: listing.Position | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """GET /v1/jobs: the owner's jobs from its index in Redis (any replica), newest first."""
        recs, nxt = await self.jobs.list_owner(owner, limit, cursor)
        data = [await self.describe(rec) for _, rec in recs]
        return data, None if nxt is None else listing.encode_cursor(nxt)

    async def poll(self, job_id: str, owner: str | None) -> tuple[Hashable, View]:
        """One look for the event stream: the record (and, while queued, its place in the queue)."""
        rec = await self._record(job_id, owner)
        state = _state_of(rec)
        pos = await self.jobs.queue_position(rec["model"], job_id) if state == "queued" else None

        async def full() -> dict[str, Any]:
            return await self.describe(rec)

        return (state, rec.get("tiles_done"), pos), full

    async def result(self, job_id: str, owner: str | None) -> Response:
        rec = await self._record(job_id, owner)
        state = _state_of(rec)
        if state in ACTIVE:
            raise JobNotFinished(f"job {job_id} is {state}; poll GET /v1/jobs/{job_id}")
        if state == "expired":
            raise JobExpired(f"the result of job {job_id} was removed to make room (jobs_max_bytes)")
        if state != "succeeded":
            err = json.loads(rec.get("error") or "null") or {}
            raise JobFailed(f"job {job_id} {state}: {err.get('message', 'no result')}")
        if rec.get("output_url"):
            raise ResultElsewhere(f"the result of job {job_id} was written to its output_url")
        body = await self.jobs.result(job_id)
        if body is None:
            raise JobExpired(f"the result of job {job_id} is no longer stored")
        headers = {**json.loads(rec.get("headers") or "{}"), "Cache-Control": "no-store"}
        return Response(body, media_type=images.CONTENT_TYPES[rec["format"]], headers=headers)

    async def cancel(self, job_id: str, owner: str | None) -> dict[str, Any]:
        rec = await self._record(job_id, owner)
        before = await self.describe(rec)
        phase = await self.jobs.cancel(job_id, rec["model"])
        if phase == "active":
            self._count_finished(rec, "cancelled")
            before.update(state="cancelled", error={"code": "cancelled", "message": "the job was cancelled"})
        return {**before, "deleted": True}

    async def describe(self, rec: dict[str, str]) -> dict[str, Any]:
        state = _state_of(rec)
        done, total = int(rec.get("tiles_done", 0) or 0), int(rec.get("tiles_total", 1) or 1)
        out: dict[str, Any] = {
            "id": rec["id"],
            "state": state,
            "model": rec["model"],
            "tiles": {"done": done, "total": total},
            "progress": round(done / max(1, total), 4),
            "queue_position": None,
            "eta_s": None,
            "attempt": max(1, int(rec.get("attempts", 0) or 0)),
            "created_at": iso(float(rec["created_at"])),
            "finished_at": iso(float(rec["finished_at"])) if rec.get("finished_at") else None,
            "output": {
                "width": int(rec["out_width"]),
                "height": int(rec["out_height"]),
                "format": rec["format"],
            },
            "result_url": f"/v1/jobs/{rec['id']}/result" if state == "succeeded" else None,
            "error": json.loads(rec.get("error") or "null"),
        }
        extra = json.loads(rec.get("extra") or "{}")
        if extra:
            out.update(extra)
        for k in ("webhook", "input_url"):
            if rec.get(k):
                out[k] = json.loads(rec[k])
        if state == "succeeded":
            out["output"]["bytes"] = int(rec.get("result_bytes", 0) or 0)
        if rec.get("output_url"):
            out["output"]["to_output_url"] = True
            out["result_url"] = None
        if state in ACTIVE:
            pos = await self.jobs.queue_position(rec["model"], rec["id"])
            out["queue_position"] = 0 if pos is None else pos
            out["eta_s"] = await self._eta(rec["model"], total - done, state == "queued")
        return out

    async def _eta(self, model: str, left: int, queued: bool) -> float | None:
        """Remaining tiles (a queued job: plus the shared backlog ahead) over this replica's measured rate."""
        mr = self.st.runtime.models.get(model)
        rate = float(mr.batcher.tiles_per_s) if mr is not None else 0.0
        if not rate:
            return None
        if queued:
            backlog, _ = await self.jobs.backlog(model)
            left = max(left, backlog)
        return round(left / rate, 3)

    async def backlog(self, model: str) -> tuple[int, int]:
        return await self.jobs.backlog(model)

    async def report_backlog(self, metrics: Any) -> None:
        """The global backlog as gauges at scrape time (the HPA's and KEDA's one truth); Redis away → skip."""
        for model in self.st.runtime.models:
            try:
                tiles, entries = await self.jobs.backlog(model)
            except JobStoreUnavailable:
                return
            metrics.jobs_backlog_tiles.labels(model=model).set(tiles)
            metrics.jobs_backlog_jobs.labels(model=model).set(entries)

    def retry_after(self, model: str, backlog_tiles: int) -> float:
        """Seconds until the whole fleet has worked off `backlog_tiles`, from this replica's measured rate
        times the replicas pulling (the consumers of the stream); the setting when nothing is measured."""
        mr = self.st.runtime.models.get(model)
        rate = float(mr.batcher.tiles_per_s) if mr is not None else 0.0
        if rate <= 0:
            return self.s.retry_after_s
        return min(300.0, max(1.0, backlog_tiles / (rate * max(1, self.consumers.get(model, 1)))))

    # ------------------------------------------------------------------ running a pulled job here
    async def run_job(self, rec: dict[str, str], data: bytes, progress: Any) -> JobOutput:
        s, pool = self.s, self.st.pool
        loop = asyncio.get_running_loop()
        params = UpscaleParams.model_validate(
            {
                k: v
                for k, v in json.loads(rec.get("params") or "{}").items()
                if k in UpscaleParams.model_fields
            }
        )
        webhook = json.loads(rec.get("webhook") or "null")
        events = self.notifier.wants(webhook, "progress")
        inner, started = progress, threading.Event()

        def progress(n: int) -> None:  # a batcher thread: count it, then maybe a progress event
            inner(n)
            if not started.is_set():
                started.set()
                loop.call_soon_threadsafe(self._first_tile, rec)
            if events:
                loop.call_soon_threadsafe(self._progress_event, rec["id"], webhook)

        mr = self.st.runtime.get(rec["model"])
        probe = await loop.run_in_executor(
            pool_for(pool, 0), images.probe, data, s.image_formats, s.max_input_pixels, s.max_pixels_per_byte
        )
        out_h, out_w, fmt = int(rec["out_height"]), int(rec["out_width"]), rec["format"]
        try:
            size = output_size(probe.height, probe.width, params, s, float(mr.manifest.native_scale))
            in_h, in_w = size.in_size or (probe.height, probe.width)
            plan = mr.plan(in_h, in_w, out_h, out_w)
            while True:  # pulled because there was room; /upscale traffic may have taken it meanwhile
                try:
                    reservation = mr.reserve(plan)
                    break
                except Draining as e:
                    raise HandBack() from e
                except (Overloaded, NotReady):
                    await asyncio.sleep(0.05)
            with reservation:
                decoded = await loop.run_in_executor(pool_for(pool, probe.pixels), images.decode, probe)
                if size.crop is not None:
                    decoded = images.crop(decoded, size.crop)
                job = UpscaleJob(
                    image=decoded.rgb,
                    out_height=out_h,
                    out_width=out_w,
                    color_fix=params.color_fix,
                    deadline=time.monotonic() + s.max_deadline_s,
                    request_id=f"job-{rec['id']}",
                    progress=progress,
                    strength=1.0 if params.strength is None else params.strength,
                )
                outcome = await mr.upscale(job, reservation)
        finally:
            probe.close()
        body = await loop.run_in_executor(
            pool_for(pool, out_h * out_w),
            images.encode,
            outcome.image,
            decoded,
            fmt,
            int(rec.get("quality") or s.output_quality),
            s.png_compress_level,
            params.metadata or "strip",
        )
        headers = {
            "X-Model": outcome.model,
            "X-Backend": outcome.backend,
            "X-Precision": outcome.precision,
            "X-Tiles": str(outcome.tiles),
            "X-Image-Size": f"{out_w}x{out_h}",
        }
        if rec.get("output_url"):
            await put_output(rec["output_url"], body, images.CONTENT_TYPES[fmt], s)
            return JobOutput(body=b"", headers=headers, extra={"output_bytes": len(body)})
        return JobOutput(body=body, headers=headers)

    def _progress_event(self, job_id: str, webhook: dict[str, Any]) -> None:
        async def view() -> dict[str, Any]:
            rec = await self.jobs.record(job_id)
            return await self.describe(rec) if rec is not None else {"id": job_id}

        async def save(deliveries: list[dict[str, Any]]) -> None:
            await self.jobs.set_field(job_id, "webhook", {**webhook, "deliveries": deliveries})

        self.notifier.progress(job_id, webhook, view, save)
