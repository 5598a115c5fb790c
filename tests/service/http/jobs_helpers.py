"""Helpers for the job API tests: the real Runtime on the fake backend, whose batches a test lets through.

`Gate` makes timing the test's own: every engine call takes one permit, so "2 batches done, the rest
waiting" is a state the test sets, not a race against the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from http_helpers import encode, real_runtime, small
from PIL import Image

from service.backends.fake import FakeBehaviour
from service.http.app import create_app
from service.metrics import Metrics
from service.runtime import Runtime
from service.settings import Settings

TILE, OVERLAP = 32, 8


class Gate:
    """Engine calls block until the test allows them: `allow(n)` lets n more batches through."""

    def __init__(self) -> None:
        self._sem = threading.Semaphore(0)
        self._open = threading.Event()
        self.closed = threading.Event()

    def wait(self, *_: object) -> bool:
        while not self._open.is_set() and not self.closed.is_set():
            if self._sem.acquire(timeout=0.01):
                break
        return False  # never fail the batch

    def allow(self, n: int = 1) -> None:
        for _ in range(n):
            self._sem.release()

    def open(self) -> None:
        self._open.set()


@dataclass
class JobsApp:
    app: Any
    client: httpx.AsyncClient
    gate: Gate
    runtime: Runtime

    @property
    def batcher(self) -> Any:
        return self.runtime.get(None).batcher

    async def wait(
        self,
        job_id: str,
        pred: Callable[[dict[str, Any]], bool],
        timeout: float = 20,
        headers: dict[str, str] | None = None,
    ) -> dict:
        """Poll GET /v1/jobs/{id} until `pred` holds (the timeout only catches a hang, it is never tight)."""
        end = time.monotonic() + timeout
        while True:
            r = await self.client.get(f"/v1/jobs/{job_id}", headers=headers)
            assert r.status_code == 200, r.text
            body = r.json()
            if pred(body):
                return body
            assert time.monotonic() < end, f"job stuck: {body}"
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def jobs_app(
    tmp_path: Path, *, api_keys: list[str] | None = None, per_tile_s: float = 0.0, **settings: Any
) -> AsyncIterator[JobsApp]:
    """create_app over the real Runtime with a one-instance fake backend (batch 1), started and closed."""
    from runtime_helpers import write_fake_repo

    repo = tmp_path / "models"
    if not repo.exists():
        write_fake_repo(repo, name="fake", tile=TILE, overlap=OVERLAP, kind="gendr")
    gate = Gate()
    behaviour = FakeBehaviour(fail_if=gate.wait, per_tile_s=per_tile_s)
    settings.setdefault("max_batch", 1)
    settings.setdefault("jobs_dir", tmp_path / "jobs")
    s = Settings(model_repository=repo, api_keys=api_keys or [], **settings)
    metrics = Metrics()
    runtime = real_runtime(s, metrics, behaviour)  # batch 1 unless the test sets max_batch
    app = create_app(s, runtime=runtime, metrics=metrics)
    await app.state.gendr.start()
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            yield JobsApp(app, c, gate, runtime)
    finally:
        gate.closed.set()
        await app.state.gendr.drain(1.0)
        await app.state.gendr.close()


def photo_png(width: int = 56) -> bytes:
    return encode(small("astronaut.png", width))


def noise_png(size: int, seed: int = 0) -> bytes:
    """Incompressible: its PNG is about 3 × size² bytes, whatever the encoder."""
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
