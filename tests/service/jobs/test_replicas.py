"""Several real `gendr-serve` processes on one real Redis behave as one service: jobs submitted and polled
at random replicas, one replica SIGKILLed mid-run and restarted, Redis itself restarted (AOF) — every
job succeeds once, with the right pixels, and no poll ever gets a 404 or a 500."""

from __future__ import annotations

import contextlib
import io
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from live_server import LiveServer, free_port, live_server
from PIL import Image
from redis_server import RedisServer, redis_server

pytest.importorskip("redis")

SIZES = [(24, 4), (32, 2), (40, 2), (48, 1), (64, 2), (80, 1), (96, 2), (56, 4)]  # (px, scale): 1–16 tiles


def noise_png(px: int, seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (px, px, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def pixels(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


class Fleet:
    """Replicas by index; a killed one is restarted on the same port (a pod coming back)."""

    def __init__(self, root: Path, redis_url: str, n: int) -> None:
        self.root, self.redis_url = root, redis_url
        self.stack = contextlib.ExitStack()
        self.ports = [free_port() for _ in range(n)]
        self.servers: list[LiveServer | None] = [None] * n
        self.http = httpx.Client(timeout=30)
        self.statuses: dict[int, int] = {}

    def start(self, i: int) -> LiveServer:
        env = {
            "GENDR_REDIS_URL": self.redis_url,
            "GENDR_FAKE_PER_TILE_S": "0.05",
            "GENDR_MAX_BATCH": "2",
            "GENDR_JOBS_LEASE_S": "1.5",
            "GENDR_RETRY_AFTER_S": "1",
        }
        srv = self.stack.enter_context(live_server(self.root / f"r{i}", port=self.ports[i], **env))
        self.servers[i] = srv
        return srv

    def kill(self, i: int) -> None:
        srv = self.servers[i]
        assert srv is not None
        srv.proc.kill()  # SIGKILL: no drain, no hand-back
        srv.proc.wait()
        self.servers[i] = None

    def live(self) -> list[LiveServer]:
        return [s for s in self.servers if s is not None]

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """At a random live replica; a connection error (a replica dying) goes to another, like a client."""
        for _ in range(50):
            srv = random.choice(self.live())
            try:
                r = self.http.request(method, srv.url + path, **kw)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
            if r.status_code == 503:
                time.sleep(0.2)
                continue
            return r
        raise AssertionError(f"{method} {path}: no replica answered")

    def close(self) -> None:
        self.http.close()
        self.stack.close()


@contextlib.contextmanager
def fleet(root: Path, redis: RedisServer, n: int = 3) -> Iterator[Fleet]:
    f = Fleet(root, redis.url, n)
    try:
        for i in range(n):
            f.start(i)
        yield f
    finally:
        f.close()


def submit_all(f: Fleet, jobs: list[dict[str, Any]]) -> None:
    for j in jobs:
        headers = {"Idempotency-Key": j["key"]}
        r = f.call("POST", f"/v1/jobs?scale={j['scale']}", content=j["body"], headers=headers)
        assert r.status_code in (200, 202), r.text
        assert "id" not in j or j["id"] == r.json()["id"]
        j["id"] = r.json()["id"]


def wait_all(f: Fleet, jobs: list[dict[str, Any]], timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    pending = list(jobs)
    while pending:
        assert time.monotonic() < end, f"{len(pending)} jobs unfinished"
        j = pending.pop(0)
        r = f.call("GET", f"/v1/jobs/{j['id']}")
        assert r.status_code == 200, (r.status_code, r.text)
        state = r.json()["state"]
        if state in ("queued", "running"):
            pending.append(j)
            time.sleep(0.01)
            continue
        assert state == "succeeded", r.json()
        j["final"] = r.json()


def redis_records(url: str) -> dict[str, dict[str, str]]:
    import redis

    r = redis.Redis.from_url(url, decode_responses=True)
    out = {}
    for key in r.scan_iter("gendr:job:*"):
        if key.count(":") == 2:
            out[key.rsplit(":", 1)[1]] = r.hgetall(key)
    r.close()
    return out


def make_jobs(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        px, scale = SIZES[rng.randrange(len(SIZES))] if rng.random() < 0.7 else SIZES[0]  # skewed: many small
        out.append({"key": f"test-{seed}-{i}", "scale": scale, "px": px, "body": noise_png(px, i % 7)})
    return out


def check_results(f: Fleet, jobs: list[dict[str, Any]]) -> None:
    expected: dict[tuple[int, int, int], np.ndarray] = {}
    for j in jobs:
        k = (j["px"], j["scale"], j["body"].__hash__())
        if k not in expected:
            up = f.call("POST", f"/upscale?scale={j['scale']}", content=j["body"])
            assert up.status_code == 200
            expected[k] = pixels(up.content)
        res = f.call("GET", f"/v1/jobs/{j['id']}/result")
        assert res.status_code == 200
        got = pixels(res.content)
        assert got.shape == (j["px"] * j["scale"], j["px"] * j["scale"], 3)
        assert np.array_equal(got, expected[k]), j["id"]


def test_three_replicas_one_sigkilled_lose_nothing(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as rs, fleet(tmp_path, rs) as f:
        jobs = make_jobs(105, seed=1)
        submit_all(f, jobs[:50])
        victim = f.servers[0]
        assert victim is not None
        tag = f"-{victim.proc.pid}-"

        def mid_run(r: dict[str, str]) -> bool:  # on the victim, with several tiles still to go
            return tag in r.get("worker", "") and int(r["tiles_total"]) - int(r["tiles_done"]) >= 3

        end = time.monotonic() + 60
        while not (held := {k for k, r in redis_records(rs.url).items() if mid_run(r)}):
            assert time.monotonic() < end, "replica 0 never ran a job"
        f.kill(0)
        submit_all(f, jobs[50:])
        f.start(0)  # the pod comes back under a new consumer name; it never inherits the dead one's jobs
        submit_all(f, jobs[:10])  # a client retrying with the same keys gets the same jobs back
        wait_all(f, jobs)
        check_results(f, jobs)
        records = redis_records(rs.url)
        assert len(records) == len(jobs)  # one job per submission, whatever was retried
        assert all(records[k]["phase"] == "succeeded" for k in held)
        assert all(int(records[k]["attempts"]) >= 2 for k in held)  # finished elsewhere, after the lease
        assert f.statuses.get(404, 0) == 0 and f.statuses.get(500, 0) == 0, f.statuses


def test_redis_restarted_mid_run_loses_no_admitted_job(tmp_path: Path) -> None:
    with redis_server(tmp_path / "redis") as rs, fleet(tmp_path, rs) as f:
        jobs = make_jobs(60, seed=2)
        submit_all(f, jobs[:40])
        # SIGTERM: Redis writes its AOF and is away 2 s while jobs run and clients submit and poll
        outage = threading.Thread(target=rs.restart, kwargs={"down_s": 2.0})
        outage.start()
        submit_all(f, jobs[40:])
        wait_all(f, jobs)
        outage.join()
        assert f.statuses.get(503, 0) > 0  # the clients did meet the outage
        check_results(f, jobs)
        assert len(redis_records(rs.url)) == len(jobs)
        assert f.statuses.get(500, 0) == 0 and f.statuses.get(404, 0) == 0, f.statuses
