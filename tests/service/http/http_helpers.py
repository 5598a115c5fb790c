"""Helpers for the HTTP tests: real photos, image builders, a contract-following fake runtime.

The fake runtime (docs/runtime-api.md) lets the ASGI tests steer delays, queue capacity, failures
and readiness precisely; the end-to-end tests use the real runtime with the tiny model on ONNX
Runtime CPU. (A uniquely named module, not conftest.py, so tests can import it.)
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import skimage
from PIL import Image

from service.backends.base import BackendInfo
from service.errors import DeadlineExceeded, Draining, EngineFailure, ModelNotFound, NotReady, Overloaded
from service.imageops import resize_rgb
from service.manifest import TileGeometry
from service.metrics import Metrics
from service.pipeline import RequestPlan, make_plan

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"


# --- real photos (docs/architecture.md, test data) -----------------------------------------------


def photo(name: str) -> Image.Image:
    """A scikit-image sample as shipped (astronaut.png, chelsea.png, camera.png, horse.png, ...)."""
    im = Image.open(SKIMAGE_DATA / name)
    im.load()
    return im


def small(name: str, width: int) -> Image.Image:
    """A photo shrunk to `width` (keeps tests fast on 2 cores), mode and ICC profile kept."""
    im = photo(name)
    icc = im.info.get("icc_profile")
    h = max(1, round(im.height * width / im.width))
    out = im.resize((width, h), Image.Resampling.BICUBIC)
    if icc:
        out.info["icc_profile"] = icc
    return out


def encode(im: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    if "icc_profile" not in kw and im.info.get("icc_profile"):
        kw["icc_profile"] = im.info["icc_profile"]
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


# --- fake runtime following docs/runtime-api.md ---------------------------------------------


@dataclass
class FakeOutcome:
    image: np.ndarray
    model: str
    backend: str
    precision: str
    tiles: int
    queue_s: float
    compute_s: float
    runtime_s: float


class FakeReservation:
    def __init__(self, owner: FakeModelRuntime, tiles: int) -> None:
        self.owner, self.tiles, self._released = owner, tiles, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.owner.in_use -= self.tiles
            self.owner.requests -= 1


@dataclass
class FakeManifest:
    name: str
    native_scale: int
    kind: str = "gendr"


class FakeModelRuntime:
    """Bicubic 'model': resize_rgb to the target, after `delay_s` per request (cancellable)."""

    def __init__(
        self,
        name: str = "tiny",
        *,
        native_scale: int = 4,
        capacity_tiles: int = 1000,
        delay_s: float = 0.0,
        fail: Callable[[Any], bool] | None = None,
        geometry: TileGeometry | None = None,
    ) -> None:
        self.name = name
        self.manifest = FakeManifest(name, native_scale)
        self.info = BackendInfo("fake", "cpu", "fp32", "0123456789abcdef" * 4, (1, 2, 4), 1)
        self.geometry = geometry or TileGeometry(tile=64, overlap=8, graph_scale=1)
        self.capacity_tiles = capacity_tiles
        self.delay_s = delay_s
        self.fail = fail
        self.in_use = 0
        self.requests = 0
        self.runtime: FakeRuntime | None = None
        self.jobs: list[Any] = []
        self.cancelled = 0
        self.started_jobs = 0

    def plan(self, in_h: int, in_w: int, out_h: int, out_w: int) -> RequestPlan:
        return make_plan(in_h, in_w, out_h, out_w, self.geometry)

    def reserve(self, tiles: int) -> FakeReservation:
        rt = self.runtime
        if rt is not None and rt.draining:
            raise Draining("draining")
        if rt is not None and not rt.started:
            raise NotReady("warming up")
        if self.in_use + tiles > self.capacity_tiles and self.in_use > 0:
            raise Overloaded(f"queue full ({self.in_use} tiles)", retry_after_s=1.5)
        self.in_use += tiles
        self.requests += 1
        return FakeReservation(self, tiles)

    async def upscale(self, job: Any, reservation: FakeReservation) -> FakeOutcome:
        t0 = time.monotonic()
        self.started_jobs += 1
        try:
            self.jobs.append(job)
            if self.delay_s:
                try:
                    async with asyncio.timeout(max(0.0, job.deadline - time.monotonic())):
                        await asyncio.sleep(self.delay_s)
                except TimeoutError as e:
                    raise DeadlineExceeded("deadline passed while queued") from e
            if time.monotonic() > job.deadline:
                raise DeadlineExceeded("deadline passed")
            if self.fail is not None and self.fail(job):
                raise EngineFailure("fake engine failure for this batch")
            out = await asyncio.to_thread(resize_rgb, job.image, job.out_height, job.out_width)
            t1 = time.monotonic()
            return FakeOutcome(out, self.name, "fake", "fp32", reservation.tiles, 0.001, t1 - t0, t1 - t0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            reservation.release()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "gendr",
            "native_scale": self.manifest.native_scale,
            "backend": "fake",
            "precision": "fp32",
            "engine_key": self.info.engine_key[:16],
            "tile": self.geometry.model_dump(),
            "batch_sizes": [1, 2, 4],
            "instances": 1,
            "limits": {"queue_capacity_tiles": self.capacity_tiles},
        }


class FakeRuntime:
    def __init__(
        self, *models: FakeModelRuntime, start_delay_s: float = 0.0, start_error: Exception | None = None
    ):
        self.models = {m.name: m for m in (models or (FakeModelRuntime(),))}
        for m in self.models.values():
            m.runtime = self
        self.start_delay_s = start_delay_s
        self.start_error = start_error
        self.started = False
        self.draining = False
        self.healthy = True
        self.closed = False
        self.metrics = Metrics()

    @property
    def ready(self) -> bool:
        return self.started and self.healthy and not self.draining

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay_s)
        if self.start_error is not None:
            raise self.start_error
        for m in self.models.values():  # as the real runtime does
            i = m.info
            self.metrics.build_info.labels(m.name, "test", i.name, i.precision, i.engine_key).set(1)
        self.started = True

    def get(self, name: str | None) -> FakeModelRuntime:
        if name is None:
            return next(iter(self.models.values()))
        try:
            return self.models[name]
        except KeyError:
            raise ModelNotFound(f"no model {name!r}; loaded: {sorted(self.models)}") from None

    async def drain(self, timeout_s: float) -> bool:
        self.draining = True
        end = time.monotonic() + timeout_s
        while any(m.in_use for m in self.models.values()) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return not any(m.in_use for m in self.models.values())

    async def close(self) -> None:
        self.closed = True


def same_colour(icc_a: bytes | None, icc_b: bytes | None) -> bool:
    """True when two ICC profiles map colours to sRGB identically (the service rebuilds profiles)."""
    from PIL import ImageCms

    if not icc_a or not icc_b:
        return False
    ramp = np.stack(np.meshgrid(np.arange(0, 256, 17), np.arange(0, 256, 17)), -1).reshape(-1, 2)
    im = Image.fromarray(np.concatenate([ramp, ramp[:, :1]], 1).astype(np.uint8).reshape(16, 16, 3))
    srgb = ImageCms.createProfile("sRGB")
    outs = [
        np.asarray(ImageCms.profileToProfile(im, ImageCms.ImageCmsProfile(io.BytesIO(p)), srgb))
        for p in (icc_a, icc_b)
    ]
    return bool(np.array_equal(outs[0], outs[1]))
