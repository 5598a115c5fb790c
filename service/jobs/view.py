"""The embedded store's job as JSON (GET /v1/jobs/{id}, the list, events): state, progress, queue, ETA.

Apart from service/http/jobs.py so that the store's file holds its logic (admission, running, drain,
expiry) and stays short; the shared store builds the same shape from its Redis record.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from service.jobs.records import ACTIVE, Job, iso
from service.runtime_api import RuntimeClient


def describe(job: Job, ahead: list[Job], runtime: RuntimeClient) -> dict[str, Any]:
    """`ahead`: the unfinished jobs of the same model admitted before this one."""
    state = job.state
    out: dict[str, Any] = {
        "id": job.id,
        "state": state,
        "model": job.model,
        "tiles": {"done": job.tiles_done, "total": job.tiles_total},
        "progress": round(job.tiles_done / max(1, job.tiles_total), 4),
        "queue_position": None,
        "eta_s": None,
        "created_at": iso(job.created_at),
        "finished_at": iso(job.finished_at),
        "output": {
            "width": job.out_width,
            "height": job.out_height,
            "format": job.format,
            "scale": job.scale,
        },
        "result_url": f"/v1/jobs/{job.id}/result" if state == "succeeded" and not job.to_output_url else None,
        "error": job.error,
    }
    if state == "succeeded":
        out["output"]["bytes"] = job.result_bytes
    if job.to_output_url or job.output_url:
        out["output"]["to_output_url"] = True
    if job.webhook:
        out["webhook"] = job.webhook
    if state in ACTIVE:
        out["queue_position"] = 0 if state == "running" else len(ahead)
        out["eta_s"] = eta(job, ahead, runtime)
    return out


def eta(job: Job, ahead: list[Job], runtime: RuntimeClient) -> float | None:
    """Remaining tiles (own, plus those of jobs ahead) over measured throughput (tiles per second)."""
    rate = None
    measured = job.tiles_done - job.first_batch
    if job.started_mono is not None and measured > 0:
        rate = measured / max(1e-3, time.monotonic() - job.started_mono)
    if rate is None:
        with contextlib.suppress(Exception):
            rate = float(runtime.get(job.model).batcher.tiles_per_s)
    if not rate:
        return None
    left = job.tiles_total - job.tiles_done
    if job.state == "queued":
        left += sum(j.tiles_total - j.tiles_done for j in ahead)
    return round(left / rate, 3)
