"""Scale-out of the job API: 3 replicas, push (embedded store) against pull (Redis Streams).

Real `python -m service.cli` processes on 127.0.0.1 with the fake backend: an engine call on n 64-px
tiles sleeps n × GENDR_FAKE_PER_TILE_S (GIL-free), so one replica's capacity is known exactly:
instances × max_batch / (per_tile_s × max_batch) tiles/s, and its engine busy time is its tiles ×
per_tile_s. Two modes, the same traffic:

- push: no Redis, each replica its own jobs folder; the client sends each job to the next live replica
  (round-robin) and polls that same replica: what a sticky load balancer does at best.
- pull: one redis-server (Debian's, AOF on, a temp folder) shared by the replicas; jobs sent
  round-robin, polled at a random live replica; replicas pull work only while their backlog has room.

Open-loop Poisson arrivals (fixed seeds) of a skewed size mix (3 jobs in 4 take 1–2 tiles, the rest
9–36; each size's tile count is read from the job's `tiles.total`) at 50 %, 90 % and 120 % of the 3
replicas' capacity, 90 % with one replica SIGKILLed every `kill_every_s` and restarted, and 90 % again
with other traffic draws (--extra-seeds): round-robin's luck in dealing the large jobs matters. Reported
per cell: jobs submitted / succeeded / failed / lost, p50 / p95 latency (arrival → `succeeded` seen by
a poll), each replica's share of the tiles computed (= of the engine busy time, see above), 503s.

    python benchmarks/scaleout.py             # ~14 min on 2 cores; writes benchmarks/results/scaleout.json
    python benchmarks/scaleout.py --quick --out /tmp/s.json   # a smoke run of every cell (tests use it)
    python benchmarks/scaleout.py --src /tmp/snapshot          # serve another source tree (same venv)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _common import ROOT, machine
from PIL import Image

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
RESULTS = ROOT / "benchmarks" / "results" / "scaleout.json"
N_REPLICAS = 3
LOADS = (0.5, 0.9, 1.2)
KILL_LOAD = 0.9
# Input (width, height) at scale 4 and its weight: skewed, many small jobs and a few large ones.
SIZES: list[tuple[tuple[int, int], float]] = [
    ((16, 16), 0.50),
    ((16, 24), 0.25),
    ((28, 28), 0.12),
    ((40, 40), 0.08),
    ((64, 64), 0.05),
]
TERMINAL = ("succeeded", "failed", "cancelled", "expired")


@dataclass(frozen=True)
class Profile:
    per_tile_s: float
    max_batch: int
    instances: int
    duration_s: float  # arrivals per cell
    drain_s: float  # after the arrivals, how long admitted jobs may still take
    kill_every_s: float
    lease_s: float  # GENDR_JOBS_LEASE_S (pull): a dead replica's job is reclaimed after this
    polls: tuple[tuple[int, float], ...]  # (polls so far below, interval s): a client backing off

    @property
    def replica_tiles_per_s(self) -> float:
        """Full batches; an engine call on n tiles costs n × per_tile_s (no per-call constant)."""
        return self.instances * self.max_batch / (self.per_tile_s * self.max_batch)

    def poll_interval(self, n: int) -> float:
        return next((s for below, s in self.polls if n < below), self.polls[-1][1])


FULL = Profile(0.1, 4, 1, 60.0, 90.0, 20.0, 3.0, ((10, 0.2), (40, 0.5), (1 << 30, 1.0)))
QUICK = Profile(0.05, 4, 1, 1.5, 25.0, 1.5, 1.5, ((1 << 30, 0.1),))


def png(w: int, h: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 3) if xs else None


# ---------------------------------------------------------------------------------------- processes
class Redis:
    def __init__(self, folder: Path) -> None:
        self.dir, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        args = [
            REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--maxmemory-policy", "noeviction", "--daemonize", "no",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as c:
                c.sendall(b"PING\r\n")
                if c.recv(64).startswith(b"+PONG"):
                    return
            if time.monotonic() > end or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Replica:
    """One `gendr-serve` process; killed and restarted on the same port and folder (a pod coming back)."""

    def __init__(self, idx: int, env: dict[str, str], workdir: Path, src: Path) -> None:
        self.idx, self.env, self.workdir, self.src = idx, env, workdir, src
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.gen, self.live = 0, False
        self.tiles_before = 0.0  # tiles counted by earlier (killed) processes
        self.tiles_now = 0.0  # gendr_tiles_total of the current process, at the last scrape
        self.busy: list[tuple[float, float]] = []  # (monotonic, mean gendr_instance_busy_ratio)

    def spawn(self) -> None:
        self.gen += 1
        log = self.workdir / f"replica{self.idx}-{self.gen}.log"
        cmd = [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*cmd, "--no-access-log", "--log-level", "warning"],
                cwd=self.src,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.log = log

    async def wait_ready(self, http: httpx.AsyncClient, timeout: float = 90) -> None:
        end = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"replica {self.idx} never became ready:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{self.url}/readyz", timeout=2)).status_code == 200:
                    self.live = True
                    return
            await asyncio.sleep(0.05)

    async def scrape(self, http: httpx.AsyncClient) -> None:
        text = (await http.get(f"{self.url}/metrics", timeout=5)).text
        tiles, busy = 0.0, []
        for line in text.splitlines():
            if line.startswith("gendr_tiles_total"):
                tiles += float(line.rsplit(" ", 1)[1])
            elif line.startswith("gendr_instance_busy_ratio"):
                busy.append(float(line.rsplit(" ", 1)[1]))
        self.tiles_now = tiles
        if busy:
            self.busy.append((time.monotonic(), sum(busy) / len(busy)))

    def tiles(self) -> float:
        return self.tiles_before + self.tiles_now

    def kill(self) -> None:
        """SIGKILL: no drain, no hand-back."""
        self.live = False
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.tiles_before += self.tiles_now
        self.tiles_now = 0.0

    def stop(self) -> None:
        self.live = False
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # the drain: nothing in flight by now
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Fleet:
    def __init__(self, mode: str, prof: Profile, root: Path, src: Path, http: httpx.AsyncClient) -> None:
        self.mode, self.prof, self.http = mode, prof, http
        repo = root / "models"
        subprocess.run(  # the fake model (tests/live_server.py's write_fake_model), by the served tree
            [sys.executable, "-c", _WRITE_MODEL, str(repo)], cwd=src, check=True, env=_base_env(src)
        )
        self.redis = Redis(root / "redis") if mode == "pull" else None
        self.replicas = []
        for i in range(N_REPLICAS):
            env = {
                **_base_env(src),
                "GENDR_MODEL_REPOSITORY": str(repo),
                "GENDR_BACKEND": "fake",
                "GENDR_FAKE_PER_TILE_S": str(prof.per_tile_s),
                "GENDR_MAX_BATCH": str(prof.max_batch),
                "GENDR_INSTANCES_PER_DEVICE": str(prof.instances),
                "GENDR_JOBS_DIR": str(root / f"jobs{i}"),
                "GENDR_JOBS_MAX": "5000",
                "GENDR_JOBS_LEASE_S": str(prof.lease_s),
                "GENDR_RETRY_AFTER_S": "1",
                "GENDR_DRAIN_TIMEOUT_S": "5",
            }
            if self.redis is not None:
                env["GENDR_REDIS_URL"] = self.redis.url
            self.replicas.append(Replica(i, env, root, src))
        self._sampler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for r in self.replicas:
            r.spawn()
        await asyncio.gather(*(r.wait_ready(self.http) for r in self.replicas))
        self._sampler = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for r in self.live():
                with contextlib.suppress(httpx.HTTPError):
                    await r.scrape(self.http)

    async def scrape_all(self) -> dict[int, float]:
        for r in self.live():
            with contextlib.suppress(httpx.HTTPError):
                await r.scrape(self.http)
        return {r.idx: r.tiles() for r in self.replicas}

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.live]

    async def kill_and_restart(self, r: Replica) -> float:
        with contextlib.suppress(httpx.HTTPError):
            await r.scrape(self.http)  # its tiles so far (a killed process's counter is gone)
        r.kill()
        t = time.monotonic()
        r.spawn()
        await r.wait_ready(self.http)
        return time.monotonic() - t

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(BaseException):
                await self._sampler
        for r in self.replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.proc.terminate()
        for r in self.replicas:
            r.stop()
        if self.redis is not None:
            self.redis.stop()


_WRITE_MODEL = """
import sys
from pathlib import Path
from service.manifest import Manifest, PipelineParams, TileGeometry, write_manifest
m = Manifest(name="fake", kind="gendr", native_scale=4, pipeline=PipelineParams(),
             tile=TileGeometry(tile=64, overlap=16, graph_scale=1, size_multiple=8))
write_manifest(Path(sys.argv[1]) / "fake", m)
"""


def _base_env(src: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENDR_")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(src))
    return env


# ---------------------------------------------------------------------------------------- traffic
@dataclass
class Job:
    n: int
    at: float  # arrival, seconds after the cell's start
    size: int  # index into SIZES
    key: str
    id: str | None = None
    replica: int | None = None
    tiles: int = 0
    state: str = "pending"
    error: str | None = None
    latency: float | None = None
    not_found: int = 0


def arrivals(rate: float, duration: float, seed: int) -> list[tuple[float, int]]:
    """Poisson arrival times; sizes dealt from a shuffled deck holding the mix in its exact proportions,
    so a cell's offered tiles follow its job count (drawing each size at random, a few 36-tile jobs
    more or less moved one 60 s cell's offered load from 86 % to 102 % of capacity)."""
    rng = random.Random(seed)
    times, t = [], 0.0
    while (t := t + rng.expovariate(rate)) < duration:
        times.append(t)
    n = len(times)
    counts = [int(w * n) for _, w in SIZES]
    by_rest = sorted(range(len(SIZES)), key=lambda k: SIZES[k][1] * n - counts[k], reverse=True)
    for k in by_rest[: n - sum(counts)]:
        counts[k] += 1
    deck = [k for k, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(deck)
    return list(zip(times, deck, strict=True))


@dataclass
class Cell:
    fleet: Fleet
    name: str
    load: float
    kill: bool
    jobs: list[Job]
    bodies: list[bytes]
    statuses: Counter[str] = field(default_factory=Counter)
    rr: int = 0
    kills: list[dict[str, Any]] = field(default_factory=list)

    @property
    def http(self) -> httpx.AsyncClient:
        return self.fleet.http

    def _next_live(self) -> Replica | None:
        reps = self.fleet.replicas
        for _ in range(len(reps)):
            r = reps[self.rr % len(reps)]
            self.rr += 1
            if r.live:
                return r
        return None

    async def _submit(self, j: Job, hard_end: float) -> bool:
        loop = asyncio.get_running_loop()
        headers = {"Idempotency-Key": j.key, "Content-Type": "image/png"}
        while loop.time() < hard_end:
            rep = self._next_live()
            if rep is None:
                await asyncio.sleep(0.05)
                continue
            try:
                r = await self.http.post(
                    f"{rep.url}/v1/jobs?scale=4", content=self.bodies[j.size], headers=headers
                )
            except httpx.TransportError:
                self.statuses["post_conn_error"] += 1
                await asyncio.sleep(0.05)
                continue
            self.statuses[f"post_{r.status_code}"] += 1
            if r.status_code == 503:
                await asyncio.sleep(min(10.0, float(r.headers.get("Retry-After") or 1)))
                continue
            if r.status_code in (200, 202):
                body = r.json()
                j.id, j.replica, j.tiles = body["id"], rep.idx, int(body["tiles"]["total"])
                return True
            j.state, j.error = "rejected", f"{r.status_code} {r.text[:200]}"
            return False
        j.state = "not_admitted"
        return False

    async def _poll(self, j: Job) -> httpx.Response | None:
        if self.fleet.mode == "push":
            rep: Replica | None = self.fleet.replicas[j.replica or 0]
            if not rep.live:  # sticky: wait for the pod that has the job
                return None
        else:
            live = self.fleet.live()
            rep = random.choice(live) if live else None
        if rep is None:
            return None
        try:
            r = await self.http.get(f"{rep.url}/v1/jobs/{j.id}")
        except httpx.TransportError:
            self.statuses["get_conn_error"] += 1
            return None
        self.statuses[f"get_{r.status_code}"] += 1
        return r

    async def _run_job(self, j: Job, t0: float, hard_end: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, t0 + j.at - loop.time()))
        if not await self._submit(j, hard_end):
            return
        j.state, polls = "admitted", 0
        while True:
            await asyncio.sleep(self.fleet.prof.poll_interval(polls))
            polls += 1
            r = await self._poll(j)
            if r is None or r.status_code != 200:
                if r is not None and r.status_code == 404:
                    j.not_found += 1
                    if j.not_found >= 20:  # the replica that had it does not know it any more
                        j.state = "not_found"
                        return
                continue
            body = r.json()
            if body["state"] == "succeeded":
                j.state, j.latency = "succeeded", loop.time() - (t0 + j.at)
                return
            if body["state"] in TERMINAL:
                j.state, j.error = body["state"], (body.get("error") or {}).get("code")
                return

    async def _killer(self, t0: float, duration: float) -> None:
        loop = asyncio.get_running_loop()
        every = self.fleet.prof.kill_every_s
        k = 0
        while (at := every * (k + 0.5)) < duration:
            await asyncio.sleep(max(0.0, t0 + at - loop.time()))
            victim = self.fleet.replicas[k % N_REPLICAS]
            down = await self.fleet.kill_and_restart(victim)
            self.kills.append({"at_s": round(at, 1), "replica": victim.idx, "down_s": round(down, 2)})
            k += 1

    async def run(self) -> dict[str, Any]:
        prof, loop = self.fleet.prof, asyncio.get_running_loop()
        base = await self.fleet.scrape_all()
        load0 = os.getloadavg()[0]
        t0 = loop.time() + 0.2
        hard_end = t0 + prof.duration_s + prof.drain_s
        tasks = [asyncio.create_task(self._run_job(j, t0, hard_end)) for j in self.jobs]
        killer = asyncio.create_task(self._killer(t0, prof.duration_s)) if self.kill else None
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, hard_end - loop.time()))
        for t in pending:
            t.cancel()
        for t in done:
            t.result()  # a bug in this client is not a finding
        if killer is not None:
            await killer
        wall = loop.time() - t0
        end = await self.fleet.scrape_all()
        for j in self.jobs:  # leave nothing running into the next cell
            if j.state == "admitted" and j.id is not None:
                j.state = "unfinished"
                with contextlib.suppress(httpx.HTTPError):
                    await self.http.delete(f"{self.fleet.replicas[j.replica or 0].url}/v1/jobs/{j.id}")
        return self._summary(base, end, wall, load0, t0)

    def _summary(
        self, base: dict[int, float], end: dict[int, float], wall: float, load0: float, t0: float
    ) -> dict[str, Any]:
        prof = self.fleet.prof
        jobs = self.jobs
        admitted = [j for j in jobs if j.id is not None]
        ok = [j for j in admitted if j.state == "succeeded"]
        lat = [j.latency for j in ok if j.latency is not None]
        small = [j.latency for j in ok if j.latency is not None and j.tiles <= 3]
        large = [j.latency for j in ok if j.latency is not None and j.tiles >= 9]
        tiles = {i: end[i] - base[i] for i in end}
        all_tiles = sum(tiles.values()) or 1.0
        shares = [tiles[i] / all_tiles for i in sorted(tiles)]
        mean = sum(shares) / len(shares)
        lo, hi = t0 + 10, t0 + prof.duration_s  # loop.time() is time.monotonic()
        busy_sampled = []
        for r in self.fleet.replicas:  # the server's own 10 s busy gauge, averaged over the arrivals
            xs = [b for t, b in r.busy if lo <= t <= hi]
            busy_sampled.append(round(sum(xs) / len(xs), 3) if xs else None)
        lost = [j for j in admitted if j.state != "succeeded"]
        return {
            "cell": self.name,
            "mode": self.fleet.mode,
            "load": self.load,
            "kill": self.kill,
            "offered_jobs": len(jobs),
            "submitted": len(admitted),
            "not_admitted": len(jobs) - len(admitted),
            "succeeded": len(ok),
            "failed": sum(j.state in ("failed", "cancelled", "expired") for j in admitted),
            "lost": len(lost),
            "lost_by": dict(Counter(f"{j.state}:{j.error}" if j.error else j.state for j in lost)),
            "offered_tiles_per_s": round(sum(j.tiles for j in admitted) / prof.duration_s, 2),
            "offered_load": round(
                sum(j.tiles for j in admitted) / prof.duration_s / (N_REPLICAS * prof.replica_tiles_per_s), 3
            ),
            "p50_s": percentile(lat, 50),
            "p95_s": percentile(lat, 95),
            "p99_s": percentile(lat, 99),
            "p95_small_s": percentile(small, 95),
            "p95_large_s": percentile(large, 95),
            "latencies_s": [round(x, 3) for x in lat],
            "tiles_per_replica": [round(tiles[i]) for i in sorted(tiles)],
            "busy_share": [round(s, 4) for s in shares],
            "busy_share_spread": round((max(shares) - min(shares)) / mean, 4) if mean else None,
            "busy_ratio": [round(tiles[i] * prof.per_tile_s / wall, 3) for i in sorted(tiles)],
            "busy_ratio_sampled": busy_sampled,
            "retries_503": self.statuses.get("post_503", 0),
            "statuses": dict(sorted(self.statuses.items())),
            "kills": self.kills,
            "wall_s": round(wall, 1),
            "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        }


# ---------------------------------------------------------------------------------------- the run
async def calibrate(fleet: Fleet, bodies: list[bytes]) -> list[int]:
    """Each size's tile count from its job's `tiles.total`; also warms every replica up."""
    tiles = []
    ids = []
    for k, body in enumerate(bodies):
        rep = fleet.replicas[k % N_REPLICAS]
        r = await fleet.http.post(f"{rep.url}/v1/jobs?scale=4", content=body)
        r.raise_for_status()
        tiles.append(int(r.json()["tiles"]["total"]))
        ids.append((rep, r.json()["id"]))
    for rep, job_id in ids:
        while (await fleet.http.get(f"{rep.url}/v1/jobs/{job_id}")).json()["state"] not in TERMINAL:
            await asyncio.sleep(0.05)
    return tiles


async def run_mode(
    mode: str,
    prof: Profile,
    src: Path,
    tmp: Path,
    bodies: list[bytes],
    plan: list[tuple[float, bool, int, str]],
) -> tuple[list[int], list[dict[str, Any]]]:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        fleet = Fleet(mode, prof, tmp / mode, src, http)
        try:
            await fleet.start()
            tiles = await calibrate(fleet, bodies)
            mean_tiles = sum(t * w for t, (_, w) in zip(tiles, SIZES, strict=True))
            capacity = N_REPLICAS * prof.replica_tiles_per_s
            out = []
            for load, kill, seed, suffix in plan:
                name = f"{mode}-{round(load * 100)}{suffix}"
                rate = load * capacity / mean_tiles  # jobs/s
                arr = arrivals(rate, prof.duration_s, seed + round(load * 100))  # same traffic per mode
                jobs = [Job(n, at, size, f"{name}-{seed}-{n}") for n, (at, size) in enumerate(arr)]
                cell = Cell(fleet, name, load, kill, jobs, bodies)
                res = await cell.run()
                res.update(offered_jobs_per_s=round(rate, 3), seed=seed)
                print(_row(res), file=sys.stderr, flush=True)
                out.append(res)
                await asyncio.sleep(min(1.0, prof.duration_s / 5))
            return tiles, out
        finally:
            await fleet.close()


HEADER = (
    "| mode | load | offered | draw | SIGKILL | jobs | ok | failed | lost | p50 s | p95 s | p95 ≤3 tiles "
    "| p95 ≥9 tiles | busy share r0 / r1 / r2 | spread | 503s |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _row(c: dict[str, Any]) -> str:
    shares = " / ".join(f"{100 * s:.1f} %" for s in c["busy_share"])
    spread = "–" if c["busy_share_spread"] is None else f"{100 * c['busy_share_spread']:.0f} %"
    kills = f"{len(c['kills'])}×" if c["kill"] else "–"
    return (
        f"| {c['mode']} | {round(100 * c['load'])} % | {round(100 * c['offered_load'])} % | {c['seed']} "
        f"| {kills} | {c['submitted']} | {c['succeeded']} "
        f"| {c['failed']} | {c['lost']} | {_f(c['p50_s'])} | {_f(c['p95_s'])} | {_f(c['p95_small_s'])} "
        f"| {_f(c['p95_large_s'])} | {shares} | {spread} | {c['retries_503']} |"
    )


def goals(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Pull p95 / push p95 per traffic draw at 90 % (same arrivals in both modes) and pooled over draws."""
    at90 = [c for c in cells if c["load"] == KILL_LOAD and not c["kill"]]
    ratios, pooled = {}, {}
    for c in at90:
        twin = next((d for d in at90 if d["mode"] == "push" and d["seed"] == c["seed"]), None)
        if c["mode"] == "pull" and twin is not None and twin["p95_s"] and c["p95_s"] is not None:
            ratios[f"seed {c['seed']}"] = round(c["p95_s"] / twin["p95_s"], 3)
    for mode in ("push", "pull"):
        pooled[mode] = percentile([x for c in at90 if c["mode"] == mode for x in c["latencies_s"]], 95)
    ratio = round(pooled["pull"] / pooled["push"], 3) if pooled["push"] and pooled["pull"] else None
    pull_cells = [c for c in cells if c["mode"] == "pull"]
    spreads = {c["cell"]: c["busy_share_spread"] for c in cells}
    return {
        "pull_p95_over_push_p95_at_90_by_draw": ratios,
        "pooled_p95_at_90_s": pooled,
        "pull_p95_over_push_p95_at_90": ratio,
        "p95_goal_met": ratio is not None and ratio <= 0.7,
        "busy_share_spread": spreads,
        "pull_busy_shares_within_10pct": all(
            c["busy_share_spread"] is not None and c["busy_share_spread"] <= 0.10 for c in pull_cells
        ),
        "pull_lost": sum(c["lost"] for c in pull_cells),
        "push_lost": sum(c["lost"] for c in cells if c["mode"] == "push"),
    }


def report(data: dict[str, Any]) -> str:
    g = data["goals"]
    lines = [HEADER, *(_row(c) for c in data["cells"]), ""]
    lines.append(
        f"pull p95 / push p95 at 90 %: {g['pull_p95_over_push_p95_at_90']} pooled over draws, "
        f"{g['pull_p95_over_push_p95_at_90_by_draw']} by draw (goal ≤ 0.7); "
        f"pull busy shares within 10 %: {g['pull_busy_shares_within_10pct']}; "
        f"lost: pull {g['pull_lost']}, push {g['push_lost']}"
    )
    return "\n".join(lines)


def _source_info(src: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
        return r.stdout.strip()

    info: dict[str, Any] = {"src": str(src), "repo_head": git("rev-parse", "--short", "HEAD")}
    if src.resolve() == ROOT.resolve():
        info["service_uncommitted_changes"] = bool(git("status", "--porcelain", "service"))
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds per cell: a smoke run")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON results (default: {RESULTS}, not --quick)")
    ap.add_argument("--src", type=Path, default=ROOT, help="source tree to serve (default: this checkout)")
    ap.add_argument("--src-label", default=None, help="what --src holds, for the JSON (e.g. a commit)")
    ap.add_argument("--modes", default="push,pull")
    ap.add_argument("--loads", default=",".join(str(x) for x in LOADS), help="fractions of capacity")
    ap.add_argument("--no-kill", action="store_true", help="skip the SIGKILL cells")
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument(
        "--extra-seeds",
        default=None,
        help=f"more traffic draws at {round(100 * KILL_LOAD)} %% (default: 7,101; none with --quick)",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="keep the replicas' logs here")
    ap.add_argument("--report", type=Path, default=None, help="only print the table of a results file")
    args = ap.parse_args(argv)
    if args.report is not None:
        print(report(json.loads(args.report.read_text())))
        return 0
    prof = QUICK if args.quick else FULL
    modes = [m for m in args.modes.split(",") if m]
    if "pull" in modes and not Path(REDIS).exists():
        print(f"{REDIS} is missing (.ci/install-system-packages.sh installs redis-server)", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    bodies = [png(w, h, seed=k) for k, ((w, h), _) in enumerate(SIZES)]
    started = time.time()
    info = {"machine": machine(), **_source_info(args.src), "src_label": args.src_label}
    plan = [(float(x), False, args.seed, "") for x in args.loads.split(",") if x]
    if not args.no_kill:
        plan.append((KILL_LOAD, True, args.seed, "-sigkill"))
    extra = args.extra_seeds if args.extra_seeds is not None else ("" if args.quick else "7,101")
    plan += [(KILL_LOAD, False, int(x), f"-seed{x}") for x in extra.split(",") if x]
    print(HEADER, file=sys.stderr, flush=True)
    cells: list[dict[str, Any]] = []
    tiles_by_mode = {}
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gendr-scaleout-")))
        for mode in modes:
            tiles, res = asyncio.run(run_mode(mode, prof, args.src.resolve(), tmp, bodies, plan))
            tiles_by_mode[mode] = tiles
            cells += res
    tiles = next(iter(tiles_by_mode.values()))
    data = {
        **info,
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "minutes": round((time.time() - started) / 60, 1),
        "profile": {
            "quick": args.quick,
            **{k: getattr(prof, k) for k in ("per_tile_s", "max_batch", "instances", "duration_s")},
            **{k: getattr(prof, k) for k in ("drain_s", "kill_every_s", "lease_s")},
            "replicas": N_REPLICAS,
            "seed": args.seed,
            "replica_tiles_per_s": prof.replica_tiles_per_s,
            "capacity_tiles_per_s": N_REPLICAS * prof.replica_tiles_per_s,
            "polls": prof.polls,
        },
        "sizes": [
            {"input": list(wh), "scale": 4, "weight": w, "tiles": t}
            for (wh, w), t in zip(SIZES, tiles, strict=True)
        ],
        "tiles_by_mode": tiles_by_mode,
        "mean_tiles_per_job": round(sum(t * w for t, (_, w) in zip(tiles, SIZES, strict=True)), 3),
        "cells": cells,
    }
    data["goals"] = goals(cells)
    print()
    print(report(data))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
