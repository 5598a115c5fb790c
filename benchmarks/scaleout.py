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
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _common import ROOT, machine
from scaleout_fleet import FULL, KILL_LOAD, N_REPLICAS, QUICK, Fleet, Profile, Replica, percentile, png
from scaleout_report import HEADER, goals, report, row

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
RESULTS = ROOT / "benchmarks" / "results" / "scaleout.json"
LOADS = (0.5, 0.9, 1.2)
# Input (width, height) at scale 4 and its weight: skewed, many small jobs and a few large ones.
SIZES: list[tuple[tuple[int, int], float]] = [
    ((16, 16), 0.50),
    ((16, 24), 0.25),
    ((28, 28), 0.12),
    ((40, 40), 0.08),
    ((64, 64), 0.05),
]
TERMINAL = ("succeeded", "failed", "cancelled", "expired")


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
                print(row(res), file=sys.stderr, flush=True)
                out.append(res)
                await asyncio.sleep(min(1.0, prof.duration_s / 5))
            return tiles, out
        finally:
            await fleet.close()


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
