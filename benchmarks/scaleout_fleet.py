"""The processes of benchmarks/scaleout.py: a real redis-server and real `gendr-serve` replicas."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

N_REPLICAS = 3
KILL_LOAD = 0.9
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


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
