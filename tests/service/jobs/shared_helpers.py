"""In-process replicas on one real Redis: each an app over the real Runtime + fake backend, with its
lifespan running (the shared store's worker starts there), reached through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from service.http.app import create_app
from service.metrics import Metrics
from service.runtime import Runtime
from service.settings import Settings

TILE, OVERLAP = 64, 16


def png(width: int, height: int | None = None, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (height or width, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_repo(root: Path) -> Path:
    from runtime_helpers import write_fake_repo

    repo = root / "models"
    if not repo.exists():
        write_fake_repo(repo, name="fake", tile=TILE, overlap=OVERLAP, kind="gendr")
    return repo


class Replica:
    def __init__(self, app: Any, client: httpx.AsyncClient) -> None:
        self.app, self.client = app, client

    @property
    def shared(self) -> Any:
        return self.app.state.gendr_jobs

    async def wait(
        self,
        job_id: str,
        pred: Callable[[dict[str, Any]], bool],
        timeout: float = 30,
        headers: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            r = await self.client.get(f"/v1/jobs/{job_id}", headers=headers)
            body = r.json()
            if r.status_code == 200 and pred(body):
                return body
            assert time.monotonic() < end, f"job {job_id} stuck: {r.status_code} {body}"
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def replica(tmp: Path, redis_url: str, **settings: Any) -> AsyncIterator[Replica]:
    kw: dict[str, Any] = {
        "model_repository": write_repo(tmp),
        "backend": "fake",
        "redis_url": redis_url,
        "jobs_dir": tmp / "jobs",
        "max_batch": 2,
        "instances_per_device": 1,
        "drain_timeout_s": 5.0,
        "jobs_lease_s": 2.0,
        **settings,
    }
    s = Settings(**kw)
    metrics = Metrics()
    runtime = Runtime.from_settings(s, metrics)
    app = create_app(s, runtime=runtime, metrics=metrics)
    async with app.router.lifespan_context(app):
        end = time.monotonic() + 30
        while not app.state.gendr.ready:
            assert time.monotonic() < end, "the replica never became ready"
            await asyncio.sleep(0.02)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            yield Replica(app, client)
