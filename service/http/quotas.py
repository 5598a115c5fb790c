"""Per-key quotas: a token bucket per API key in output megapixels per second, with a burst.

Keys come from `GENDR_API_KEYS` (no quota) and `GENDR_API_KEYS_FILE` (a JSON list of
`{"name", "sha256", "quota_mp_s", "burst_mp"}`; the file holds digests, never tokens). A request is
charged its output megapixels when its size is known (before any pixel work); an empty bucket is
`429 rate_limited` with `Retry-After` and the IETF draft's `RateLimit-Limit`, `RateLimit-Remaining`
and `RateLimit-Reset`. With `GENDR_REDIS_URL` the buckets live in Redis, so every replica draws on
one bucket per key; otherwise each process keeps its own. Metrics name the key, never the token.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from service.errors import ServiceError

# KEYS: bucket   ARGV: rate per s, burst, cost, now  → {allowed 0/1, tokens left (str), wait s (str)}
TAKE = """
local rate, burst, cost, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local h = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(h[1] or burst)
local at = tonumber(h[2] or now)
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local ok = 0
if tokens >= cost then tokens = tokens - cost; ok = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
local wait = 0
if ok == 0 then wait = (cost - tokens) / rate end
return {ok, tostring(tokens), tostring(wait)}
"""


class KeyEntry(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    quota_mp_s: float | None = Field(None, gt=0, description="Output megapixels per second; none: no quota.")
    burst_mp: float | None = Field(None, gt=0, description="Bucket size (default: 60 s of quota).")


@dataclass(frozen=True)
class Caller:
    name: str
    quota_mp_s: float | None = None
    burst_mp: float | None = None

    @property
    def burst(self) -> float:
        assert self.quota_mp_s is not None
        return self.burst_mp if self.burst_mp is not None else 60.0 * self.quota_mp_s


class RateLimited(ServiceError):
    status, code = 429, "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float, limit: dict[str, str]) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self._limit = limit

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s or 1))), **self._limit}


def load_keys_file(path: Path) -> list[KeyEntry]:
    """The keys file, checked at start-up: a bad file stops the server with one line, not a 500 later."""
    try:
        raw = json.loads(path.read_text())
        entries = [KeyEntry.model_validate(e) for e in raw]
    except (OSError, ValueError, TypeError, ValidationError) as e:
        raise ValueError(f"GENDR_API_KEYS_FILE={path}: {str(e).splitlines()[0]}") from e
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"GENDR_API_KEYS_FILE={path}: key names must be unique")
    return entries


def _headers(c: Caller, left: float, wait_s: float) -> dict[str, str]:
    assert c.quota_mp_s is not None
    return {
        "RateLimit-Limit": f"{c.burst:g}",
        "RateLimit-Remaining": f"{max(0.0, left):.3f}".rstrip("0").rstrip("."),
        "RateLimit-Reset": str(max(0, math.ceil(wait_s or (c.burst - left) / c.quota_mp_s))),
    }


class Quotas:
    """Token buckets by key name; `redis` (an asyncio client) shares them across replicas."""

    def __init__(self, redis: Any = None, prefix: str = "gendr", metrics: Any = None) -> None:
        self._redis = redis
        self._prefix = prefix
        self._script = redis.register_script(TAKE) if redis is not None else None
        self._local: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._metrics = metrics

    async def take(self, caller: Caller | None, megapixels: float) -> dict[str, str]:
        """Charge `megapixels` to the caller's bucket → headers for the answer; RateLimited when empty."""
        if caller is None:
            return {}
        if self._metrics is not None:
            self._metrics.key_megapixels.labels(key=caller.name).inc(megapixels)
        if caller.quota_mp_s is None:
            return {}
        cost = min(megapixels, caller.burst)  # one image larger than the burst waits for a full bucket
        ok, left, wait = await self._take(caller, cost)
        headers = _headers(caller, left, wait)
        if not ok:
            if self._metrics is not None:
                self._metrics.key_rate_limited.labels(key=caller.name).inc()
            raise RateLimited(
                f"key {caller.name!r} is over its quota of {caller.quota_mp_s:g} output MP/s "
                f"({megapixels:.2f} MP asked, {left:.2f} left)",
                retry_after_s=wait,
                limit=headers,
            )
        return headers

    async def _take(self, c: Caller, cost: float) -> tuple[bool, float, float]:
        assert c.quota_mp_s is not None
        if self._script is not None:
            from service.jobs.redis_store import unavailable

            @unavailable
            async def run() -> Any:
                return await self._script(
                    keys=[f"{self._prefix}:quota:{c.name}"], args=[c.quota_mp_s, c.burst, cost, time.time()]
                )

            ok, left, wait = await run()
            return bool(int(ok)), float(left), float(wait)
        now = time.monotonic()
        with self._lock:
            tokens, at = self._local.get(c.name, (c.burst, now))
            tokens = min(c.burst, tokens + (now - at) * c.quota_mp_s)
            ok = tokens >= cost
            if ok:
                tokens -= cost
            self._local[c.name] = (tokens, now)
        return ok, tokens, 0.0 if ok else (cost - tokens) / c.quota_mp_s
