"""Jobs of /v1/jobs as data (docs/jobs.md): the `Job` record, its errors, and its files under `jobs_dir`.

One JSON record per job plus its result, each written atomically (service.manifest.atomic_write_bytes),
so a crash or a replica reading the same folder never sees half a file. The embedded store's logic
(admission, running, drain, expiry) is service/http/jobs.py; the shared store is service/jobs/redis_store.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.errors import NotFound, ServiceError
from service.manifest import atomic_write_bytes

ACTIVE = ("queued", "running")
ID_BYTES = 18  # 144 random bits → 24 url-safe characters


class JobNotFound(NotFound):
    status, code = 404, "job_not_found"


class JobNotFinished(ServiceError):
    status, code = 409, "job_not_finished"


class JobFailed(ServiceError):
    status, code = 409, "job_failed"


class JobExpired(ServiceError):
    status, code = 410, "job_expired"


class ResultElsewhere(ServiceError):
    """The job's result went to its `output_url`; the server keeps no copy."""

    status, code = 409, "result_at_output_url"


class IdempotencyKeyReused(ServiceError):
    """The same `Idempotency-Key` with another body or options: a client bug, never a second job."""

    status, code = 409, "idempotency_key_reused"


class JobStoreUnavailable(ServiceError):
    """The shared job store (Redis) cannot be reached: retry; /upscale keeps working meanwhile."""

    status, code = 503, "job_store_unavailable"


IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces


class IdempotencyKeys:
    """The embedded store's `Idempotency-Key`s: (owner, key) → the digest it was used with and its job."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._keys: dict[tuple[str, str], tuple[str, str, float]] = {}

    def find(self, owner: str | None, key: str, digest: str | None) -> str | None:
        """The job this key made, if it is still remembered (another digest: IdempotencyKeyReused)."""
        now = time.time()
        for k in [k for k, v in self._keys.items() if v[2] < now]:
            del self._keys[k]
        known = self._keys.get((owner or "", key))
        if known is None:
            return None
        if known[0] != (digest or ""):
            raise IdempotencyKeyReused("this Idempotency-Key was used for another image or other options")
        return known[1]

    def remember(self, owner: str | None, key: str, digest: str | None, job_id: str) -> None:
        self._keys[(owner or "", key)] = (digest or "", job_id, time.time() + self.ttl_s)


def request_digest(data: bytes, params: dict[str, Any]) -> str:
    """What an `Idempotency-Key` is bound to: the upload's bytes and every option, canonically."""
    h = hashlib.sha256(data)
    h.update(json.dumps(params, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def owner_of(authorization: str | None, keys_enabled: bool) -> str | None:
    """Who may see a job: a digest of the bearer key (never the key itself); None when the service is open."""
    if not keys_enabled:
        return None
    token = (authorization or "").strip().partition(" ")[2].strip()
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


@dataclass
class Job:
    id: str
    owner: str | None
    model: str
    tiles_total: int
    out_width: int
    out_height: int
    format: str
    created_at: float  # wall clock (records outlive the process)
    scale: float = 0.0  # output over input (X-Scale of /upscale)
    seq: int = 0  # admission order within this process (queue position)
    phase: str = "active"  # active | succeeded | failed | cancelled | expired
    tiles_done: int = 0
    started_mono: float | None = None  # when the first batch landed
    first_batch: int = 0  # its tiles (not part of the measured rate: their time started earlier)
    finished_at: float | None = None
    result_bytes: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    webhook: dict[str, Any] | None = None  # url, events, deliveries (service/jobs/extras.py)
    to_output_url: bool = False  # the result was PUT to the job's output_url, not kept here
    output_url: str | None = field(default=None, repr=False)  # a credential: memory only, never written
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def state(self) -> str:
        if self.phase != "active":
            return self.phase
        return "running" if self.tiles_done > 0 else "queued"

    def add_tiles(self, n: int) -> bool:
        """Runtime callback (a batcher thread): `n` more tiles of this job are done → True for the first."""
        with self._lock:
            first = self.started_mono is None
            if first:
                self.started_mono, self.first_batch = time.monotonic(), n
            self.tiles_done += n
            return first

    def record(self) -> dict[str, Any]:
        keep = (
            "id",
            "owner",
            "model",
            "tiles_total",
            "out_width",
            "out_height",
            "format",
            "scale",
            "created_at",
        )
        rec = {k: getattr(self, k) for k in keep}
        rec.update(
            phase=self.phase,
            tiles_done=self.tiles_done,
            finished_at=self.finished_at,
            result_bytes=self.result_bytes,
            headers=self.headers,
            error=self.error,
            webhook=self.webhook,
            to_output_url=self.to_output_url,
        )
        return rec


class JobFiles:
    """A job's record (`<id>.json`) and result (`<id>.<format>`) in one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def result(self, job: Job) -> Path:
        return self.root / f"{job.id}.{job.format}"

    def record(self, job_id: str) -> Path:
        return self.root / f"{job_id}.json"

    def save(self, job: Job) -> None:
        atomic_write_bytes(self.record(job.id), json.dumps(job.record()).encode())

    def write(self, job: Job, body: bytes) -> None:
        atomic_write_bytes(self.result(job), body)

    def remove(self, job: Job, *, record: bool) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.result(job).unlink()
        if record:
            with contextlib.suppress(FileNotFoundError):
                self.record(job.id).unlink()

    def records(self) -> list[Path]:
        return sorted(self.root.glob("*.json"))

    @staticmethod
    def read(path: Path) -> Job | None:
        try:
            rec = json.loads(path.read_text())
            return Job(**{k: v for k, v in rec.items() if k in Job.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return None
