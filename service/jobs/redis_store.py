"""The shared job store on Redis Streams (docs/jobs.md#several-replicas): what every replica reads and writes.

Any replica answers any job: the record, progress, queue order, backlog and result live in Redis. Every
state change is one Lua script (service/jobs/redis_scripts.py), a compare-and-set on the job's fencing
token. A Redis that cannot be reached is `JobStoreUnavailable` (503 + Retry-After), never a 500; redis-py
reconnects by itself on the next command once Redis is back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import Overloaded
from service.jobs import redis_scripts as lua
from service.jobs.listing import Position
from service.jobs.records import ID_BYTES, IdempotencyKeyReused, JobStoreUnavailable
from service.settings import Settings

log = logging.getLogger("gendr.jobs")
GROUP = "gendr-workers"
LIST_ROUNDS = 8  # index reads per page at most: a page over many expired jobs ends early (with a cursor)
TIES_MAX = 1000  # jobs of one owner with the very same created_at that one page steps over
P = ParamSpec("P")
T = TypeVar("T")


def unavailable(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Redis down, loading or timing out → 503 job_store_unavailable (the route's Retry-After)."""

    @wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise JobStoreUnavailable("the job store (Redis) cannot be reached; retry shortly") from e
        except ResponseError as e:
            if str(e).startswith(("LOADING", "MASTERDOWN", "READONLY", "BUSY", "OOM")):
                raise JobStoreUnavailable(f"the job store (Redis) is not available: {str(e)[:40]}") from e
            raise

    return wrapper


def connect(settings: Settings) -> aioredis.Redis:
    """A client from `GENDR_REDIS_URL`; the password from `GENDR_REDIS_PASSWORD_FILE` wins over the URL's."""
    if not settings.redis_url:
        raise ValueError("GENDR_REDIS_URL is not set")
    kw: dict[str, Any] = {"socket_timeout": 10.0, "socket_connect_timeout": 5.0, "health_check_interval": 15}
    if settings.redis_password_file is not None:
        kw["password"] = Path(settings.redis_password_file).read_text().strip()
    return aioredis.from_url(settings.redis_url, **kw)


@dataclass(frozen=True)
class Claim:
    """A job this replica holds: its id, stream entry and fencing token."""

    id: str
    model: str
    entry: str
    fence: int


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisJobs:
    """Keys, scripts and typed calls over one Redis (see the module docstring of redis_scripts)."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.r = client
        self.s = settings
        p = settings.redis_prefix
        self.p = p
        self.job_prefix = f"{p}:job:"
        self._scripts = {
            name: client.register_script(src)
            for name, src in (
                ("submit", lua.SUBMIT),
                ("start", lua.START),
                ("progress", lua.PROGRESS),
                ("finish", lua.FINISH),
                ("cancel", lua.CANCEL),
                ("hand_back", lua.HAND_BACK),
                ("set_field", lua.SET_FIELD),
                ("set_once", lua.SET_ONCE),
            )
        }
        self._groups: set[str] = set()

    # ------------------------------------------------------------------ keys
    def job(self, job_id: str) -> str:
        return f"{self.job_prefix}{job_id}"

    def stream(self, model: str) -> str:
        return f"{self.p}:jobs:{model}"

    def _model_keys(self, model: str) -> tuple[str, str, str]:
        return self.stream(model), f"{self.p}:queued:{model}", f"{self.p}:backlog:{model}"

    def owner_index(self, owner: str) -> str:
        """The owner's jobs by creation time (`owner` is a digest of the API key, never the key)."""
        return f"{self.p}:owner:{owner}"

    def _index_ttl_s(self) -> int:
        """How long an owner's index outlives its last submission: longer than a job runs and is kept."""
        s = self.s
        live = s.jobs_ttl_s + s.jobs_max_attempts * (s.max_deadline_s + s.jobs_lease_s)
        return int(max(live, s.jobs_idempotency_ttl_s)) + 1

    def _stored(self) -> tuple[str, str, str]:
        return f"{self.p}:stored", f"{self.p}:stored:sizes", f"{self.p}:stored:bytes"

    @unavailable
    async def ensure_group(self, model: str) -> None:
        """The model's stream and its consumer group (idempotent: BUSYGROUP means it is there)."""
        if model in self._groups:
            return
        try:
            await self.r.xgroup_create(self.stream(model), GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups.add(model)

    # ------------------------------------------------------------------ submit, read, delete
    @unavailable
    async def submit(
        self,
        *,
        model: str,
        data: bytes,
        tiles: int,
        fields: dict[str, Any],
        owner: str | None,
        idempotency: tuple[str, str] | None,
    ) -> tuple[str, bool]:
        """Store the upload and append the job to its model's stream → (job id, created)."""
        await self.ensure_group(model)
        job_id = secrets.token_urlsafe(ID_BYTES)
        stream, queued, backlog = self._model_keys(model)
        key, digest = idempotency or ("", "")
        idem = f"{self.p}:idem:{owner or '-'}:{hashlib_hex(key)}"
        created = float(fields.get("created_at") or time.time())
        fields = {**fields, "created_at": created}
        flat: list[Any] = []
        for k, v in {**fields, "id": job_id, "owner": owner or "", "phase": "active", "fence": 0}.items():
            flat += [k, v if isinstance(v, (str, int, float, bytes)) else json.dumps(v)]
        res = await self._scripts["submit"](
            keys=[
                self.job(job_id),
                f"{self.job(job_id)}:input",
                stream,
                queued,
                backlog,
                f"{self.p}:seq",
                idem,
                self.owner_index(owner or "-"),
            ],
            args=[
                job_id,
                data,
                tiles,
                self.s.jobs_max_backlog_tiles,
                1 if idempotency else 0,
                digest,
                int(self.s.jobs_idempotency_ttl_s),
                self.job_prefix,
                repr(created),
                self._index_ttl_s() if owner else 0,
                *flat,
            ],
        )
        status, value = _s(res[0]), _s(res[1])
        if status == "same":
            return value, False
        if status == "reused":
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used for another image or other options; use a new key"
            )
        if status == "full":
            raise Overloaded(
                f"the shared queue of model {model!r} holds {value} tiles (the limit is "
                f"{self.s.jobs_max_backlog_tiles})",
                retry_after_s=self.s.retry_after_s,
            )
        return value, True

    @unavailable
    async def record(self, job_id: str) -> dict[str, str] | None:
        raw = await self.r.hgetall(self.job(job_id))
        if not raw:
            return None
        return {_s(k): _s(v) for k, v in raw.items()}

    @unavailable
    async def queue_position(self, model: str, job_id: str) -> int | None:
        rank = await self.r.zrank(f"{self.p}:queued:{model}", job_id)
        return None if rank is None else int(rank)

    @unavailable
    async def backlog(self, model: str) -> tuple[int, int]:
        """(remaining tiles of unfinished jobs, entries in the stream) — the same for every replica."""
        stream, _, backlog = self._model_keys(model)
        tiles, n = await self.r.mget(backlog), await self.r.xlen(stream)
        return max(0, int(tiles[0] or 0)), int(n)

    @unavailable
    async def result(self, job_id: str) -> bytes | None:
        return await self.r.get(f"{self.job(job_id)}:result")

    @unavailable
    async def input(self, job_id: str) -> bytes | None:
        return await self.r.get(f"{self.job(job_id)}:input")

    @unavailable
    async def cancel(self, job_id: str, model: str) -> str:
        """DELETE: an unfinished job is cancelled (its holder sees it at the next batch), then forgotten."""
        stream, queued, backlog = self._model_keys(model)
        stored, sizes, nbytes = self._stored()
        j = self.job(job_id)
        err = json.dumps({"code": "cancelled", "message": "the job was cancelled"})
        return _s(
            await self._scripts["cancel"](
                keys=[j, queued, backlog, f"{j}:input", f"{j}:result", stream, stored, sizes, nbytes],
                args=[time.time(), GROUP, err, self.owner_index("")],
            )
        )

    @unavailable
    async def set_once(self, job_id: str, name: str, value: str) -> bool:
        """Set a field only if it is unset and the job still exists → whether this call set it."""
        return bool(await self._scripts["set_once"](keys=[self.job(job_id)], args=[name, value]))

    @unavailable
    async def list_owner(
        self, owner: str, limit: int, cursor: Position | None
    ) -> tuple[list[tuple[Position, dict[str, str]]], Position | None]:
        """Up to `limit` records of `owner`, newest first, after `cursor` → (records, where to go on).

        Index entries whose job is gone (its TTL ran out) are removed on the way. Bounded: at most
        LIST_ROUNDS index reads, after which a short page comes back with a cursor to continue from.
        """
        idx = self.owner_index(owner)
        found: list[tuple[Position, dict[str, str]]] = []
        pos = cursor
        for _ in range(LIST_ROUNDS):
            want = limit + 1 - len(found)
            got = await self._index_after(idx, pos, want)
            pipe = self.r.pipeline(transaction=False)
            for _, job_id in got:
                pipe.hgetall(self.job(job_id))
            raws = await pipe.execute() if got else []
            gone = [job_id for (_, job_id), raw in zip(got, raws, strict=True) if not raw]
            if gone:
                await self.r.zrem(idx, *gone)
            for p, raw in zip(got, raws, strict=True):
                rec = {_s(k): _s(v) for k, v in raw.items()}
                if rec and rec.get("owner") == owner:
                    found.append((p, rec))
            if len(found) > limit:
                return found[:limit], found[limit - 1][0]
            if len(got) < want:
                return found, None  # the index is exhausted
            pos = got[-1]
        return found, pos  # rounds spent: go on after the last entry looked at

    async def _index_after(self, idx: str, pos: Position | None, n: int) -> list[Position]:
        """The next `n` index entries after `pos` in (created_at, id) descending order."""
        if pos is None:
            rows = await self.r.zrange(
                idx, "+inf", "-inf", desc=True, byscore=True, offset=0, num=n, withscores=True
            )
            return [(float(sc), _s(m)) for m, sc in rows]
        score, last = pos
        ties = await self.r.zrange(
            idx, repr(score), repr(score), desc=True, byscore=True, offset=0, num=TIES_MAX, withscores=True
        )
        out = [(float(sc), _s(m)) for m, sc in ties if _s(m) < last][:n]
        if len(out) < n:
            rows = await self.r.zrange(
                idx,
                f"({score!r}",
                "-inf",
                desc=True,
                byscore=True,
                offset=0,
                num=n - len(out),
                withscores=True,
            )
            out += [(float(sc), _s(m)) for m, sc in rows]
        return out

    @unavailable
    async def set_field(self, job_id: str, name: str, value: Any) -> None:
        await self._scripts["set_field"](keys=[self.job(job_id)], args=[name, json.dumps(value)])

    # ------------------------------------------------------------------ the worker's side
    @unavailable
    async def read(self, model: str, consumer: str, block_ms: int) -> tuple[str, str] | None:
        """One new entry for this consumer (XREADGROUP COUNT 1) → (entry id, job id)."""
        await self.ensure_group(model)
        got = await self.r.xreadgroup(GROUP, consumer, {self.stream(model): ">"}, count=1, block=block_ms)
        for _stream, entries in got or []:
            for entry_id, fields in entries:
                return _s(entry_id), _s(fields.get(b"id", b""))
        return None

    @unavailable
    async def reclaim(self, model: str, consumer: str) -> tuple[str, str] | None:
        """One entry whose holder stopped renewing its lease (XAUTOCLAIM, min idle = the lease)."""
        await self.ensure_group(model)
        lease_ms = int(self.s.jobs_lease_s * 1000)
        res = await self.r.xautoclaim(self.stream(model), GROUP, consumer, lease_ms, "0-0", count=1)
        for entry_id, fields in res[1] if len(res) > 1 else []:
            if fields:
                return _s(entry_id), _s(fields.get(b"id", b""))
            await self.r.xack(self.stream(model), GROUP, entry_id)  # deleted entry: nothing to run
        return None

    @unavailable
    async def start(self, model: str, entry: str, job_id: str, consumer: str) -> tuple[str, int]:
        """Take the job: a new fence, one more attempt → ('started'|'exhausted'|'done'|'gone', fence)."""
        stream, queued, backlog = self._model_keys(model)
        err = json.dumps(
            {
                "code": "job_lost",
                "message": f"the job was started {self.s.jobs_max_attempts} times and every replica "
                "running it stopped; submit it again",
            }
        )
        res = await self._scripts["start"](
            keys=[self.job(job_id), queued, backlog, stream],
            args=[consumer, time.time(), self.s.jobs_max_attempts, err, entry, GROUP],
        )
        status, fence = _s(res[0]), int(res[1])
        if status == "exhausted":
            await self.r.expire(self.job(job_id), int(self.s.jobs_ttl_s))
            await self.r.delete(f"{self.job(job_id)}:input")
        return status, fence

    @unavailable
    async def progress(self, claim: Claim, tiles: int, consumer: str) -> str:
        """Tiles done since the last call, and the lease renewed → 'ok', or why to stop ('stale', …)."""
        _, _, backlog = self._model_keys(claim.model)
        return _s(
            await self._scripts["progress"](
                keys=[self.job(claim.id), backlog, self.stream(claim.model)],
                args=[claim.fence, tiles, GROUP, consumer],
            )
        )

    @unavailable
    async def finish(
        self,
        claim: Claim,
        phase: str,
        *,
        body: bytes = b"",
        error: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Store the outcome, acknowledge and delete the entry — all or nothing, only with our fence."""
        stream, _, backlog = self._model_keys(claim.model)
        stored, sizes, nbytes = self._stored()
        j = self.job(claim.id)
        return _s(
            await self._scripts["finish"](
                keys=[j, f"{j}:result", f"{j}:input", backlog, stored, stream, sizes, nbytes],
                args=[
                    claim.fence,
                    phase,
                    json.dumps(error),
                    json.dumps(headers or {}),
                    body,
                    int(self.s.jobs_ttl_s),
                    time.time(),
                    GROUP,
                    self.s.jobs_max_bytes,
                    self.job_prefix,
                    json.dumps(extra or {}),
                ],
            )
        )

    @unavailable
    async def hand_back(self, claim: Claim) -> str:
        stream, queued, backlog = self._model_keys(claim.model)
        return _s(
            await self._scripts["hand_back"](
                keys=[self.job(claim.id), stream, queued, backlog], args=[claim.fence, GROUP]
            )
        )

    @unavailable
    async def consumers(self, model: str) -> int:
        """Consumers that read within two leases: the replicas pulling this model now."""
        live = 0
        for c in await self.r.xinfo_consumers(self.stream(model), GROUP):
            if int(c.get("inactive", c.get("idle", 0))) < 2 * self.s.jobs_lease_s * 1000:
                live += 1
        return live

    @unavailable
    async def forget_dead_consumers(self, model: str, idle_s: float) -> int:
        """Consumers with nothing pending and idle for long (dead pods' names) are removed."""
        gone = 0
        for c in await self.r.xinfo_consumers(self.stream(model), GROUP):
            name, pending, idle = c.get("name"), int(c.get("pending", 0)), int(c.get("idle", 0))
            if pending == 0 and idle > idle_s * 1000:
                gone += int(await self.r.xgroup_delconsumer(self.stream(model), GROUP, name))
        return gone


def hashlib_hex(key: str) -> str:
    """The idempotency key as a fixed-length name (a client's key never becomes a raw Redis key)."""
    return hashlib.sha256(key.encode()).hexdigest()[:40]


__all__ = ["GROUP", "Claim", "RedisError", "RedisJobs", "connect", "unavailable"]
