"""Per-key quotas in output megapixels per second: 429 with Retry-After and RateLimit-* headers, one
bucket per key across replicas when Redis is configured, metrics by key name (never the token)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from http_helpers import encode, small

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))  # the real-Redis helpers

Client = Callable[..., Any]
ALICE, BOB = "alice-token-0123456789", "bob-token-9876543210"


def keys_file(tmp: Path, quota: float = 0.01, burst: float = 0.02) -> Path:
    entries = [
        {
            "name": "alice",
            "sha256": hashlib.sha256(ALICE.encode()).hexdigest(),
            "quota_mp_s": quota,
            "burst_mp": burst,
        },
        {"name": "bob", "sha256": hashlib.sha256(BOB.encode()).hexdigest()},
    ]
    p = tmp / "keys.json"
    p.write_text(json.dumps(entries))
    return p


def test_a_key_over_its_quota_gets_429_with_ratelimit_headers(make_client: Client, tmp_path: Path) -> None:
    c = make_client(api_keys_file=keys_file(tmp_path))
    img = encode(small("astronaut.png", 100))  # 100×100 at ×1: 0.01 MP a request
    alice, bob = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {BOB}"}
    first = c.post("/upscale?scale=1", content=img, headers=alice)
    assert first.status_code == 200
    assert first.headers["ratelimit-limit"] == "0.02" and float(first.headers["ratelimit-remaining"]) < 0.02
    assert c.post("/upscale?scale=1", content=img, headers=alice).status_code == 200
    over = c.post("/upscale?scale=1", content=img, headers=alice)
    assert over.status_code == 429, over.text
    assert over.json()["error"]["code"] == "rate_limited" and int(over.headers["retry-after"]) >= 1
    assert float(over.headers["ratelimit-remaining"]) < 0.01 and int(over.headers["ratelimit-reset"]) >= 1
    for _ in range(3):  # no quota on bob's key
        assert c.post("/upscale?scale=1", content=img, headers=bob).status_code == 200
    assert (
        c.post("/upscale?scale=1", content=img, headers={"Authorization": "Bearer nope"}).status_code == 401
    )
    job = c.post("/v1/jobs?scale=1", content=img, headers=alice)
    assert job.status_code == 429  # jobs draw on the same bucket
    metrics = c.get("/metrics").text
    assert 'gendr_key_rate_limited_total{key="alice"}' in metrics
    assert 'gendr_key_output_megapixels_total{key="bob"}' in metrics
    assert ALICE not in metrics and hashlib.sha256(ALICE.encode()).hexdigest() not in metrics


def test_a_bad_keys_file_stops_the_start_with_one_line(make_client: Client, tmp_path: Path) -> None:
    bad = tmp_path / "keys.json"
    bad.write_text(json.dumps([{"name": "x", "sha256": "not-hex"}]))
    with pytest.raises(ValueError, match="GENDR_API_KEYS_FILE"):
        make_client(api_keys_file=bad)


def test_replicas_share_one_bucket_per_key_through_redis(tmp_path: Path) -> None:
    from redis_server import redis_server
    from shared_helpers import replica

    async def main() -> None:
        kf = keys_file(tmp_path)
        img = encode(small("astronaut.png", 100))
        h = {"Authorization": f"Bearer {ALICE}"}
        with redis_server(tmp_path / "redis") as rs:
            async with (
                replica(tmp_path / "a", rs.url, api_keys_file=kf) as a,
                replica(tmp_path / "b", rs.url, api_keys_file=kf) as b,
            ):
                assert (await a.client.post("/upscale?scale=1", content=img, headers=h)).status_code == 200
                assert (await b.client.post("/upscale?scale=1", content=img, headers=h)).status_code == 200
                third = await a.client.post("/upscale?scale=1", content=img, headers=h)
                assert third.status_code == 429 and third.json()["error"]["code"] == "rate_limited"

    asyncio.run(main())
