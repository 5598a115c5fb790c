"""Helpers for the HTTP tests: real photos, image builders, and the real runtime on the fake backend.

The ASGI tests run `service.runtime.Runtime` itself over a manifest-only repository; the fake backend
(service/backends/fake.py) lets them steer delays, hangs, failures and start-up precisely, so what a
client sees (503 bodies, Retry-After, drain) is the runtime's own. The end-to-end tests use the tiny
model on ONNX Runtime CPU. (A uniquely named module, not conftest.py, so tests can import it.)
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import skimage
from PIL import Image

from service.backends.fake import FakeBackend, FakeBehaviour, FakeEngineError
from service.manifest import Manifest
from service.metrics import Metrics
from service.runtime import Runtime, UpscaleJob
from service.settings import Settings

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


def err(r: httpx.Response) -> str:
    """The error code of a JSON error response, after checking its shape and request id (docs/http.md)."""
    body = r.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    assert body["error"]["request_id"] == r.headers["x-request-id"]
    return body["error"]["code"]


# --- the real runtime over a fake-backend repository ------------------------------------------

TINY_TILE, TINY_OVERLAP = 64, 8  # `tiny`: GenDR kind (native ×4, graph ×1); `other`: a ×2 network


def write_http_repo(root: Path) -> Path:
    """models/ with `tiny` (GenDR kind, native ×4) and `other` (single ×2 network): manifests only,
    served by the fake backend (nearest-neighbour tiles, delays and failures on demand)."""
    from runtime_helpers import write_fake_repo

    write_fake_repo(root, name="tiny", tile=TINY_TILE, overlap=TINY_OVERLAP, kind="gendr")
    write_fake_repo(root, name="other", tile=32, overlap=8, scale=2, kind="single")
    return root


def held_load(gate: threading.Event) -> type[FakeBackend]:
    """A fake backend whose load() waits for `gate`: start-up lasts as long as the test says."""

    class HeldLoad(FakeBackend):
        def load(self) -> None:
            if not gate.wait(30):
                raise TimeoutError("the test never let the model load")
            super().load()

    return HeldLoad


class BrokenLoad(FakeBackend):
    """A fake backend whose load() fails, as a corrupt engine file does."""

    def load(self) -> None:
        raise FakeEngineError("bad manifest")


def real_runtime(
    settings: Settings,
    metrics: Metrics | None = None,
    behaviour: FakeBehaviour | None = None,
    backend: type[FakeBackend] = FakeBackend,
) -> Runtime:
    """`Runtime.from_settings` with every model on the fake backend sharing one `behaviour`."""
    beh = behaviour or FakeBehaviour()

    def factory(m: Manifest, d: Path, s: Settings) -> tuple[FakeBackend, str]:
        return backend(m, d, instances=s.instances_per_device, max_batch=s.max_batch, behaviour=beh), "tests"

    return Runtime.from_settings(settings, metrics or Metrics(), backend_factory=factory)


def fake_app(
    repo: Path,
    behaviour: FakeBehaviour | None = None,
    backend: type[FakeBackend] = FakeBackend,
    **settings: Any,
) -> Any:
    """create_app over the real runtime (fake backend); `app.state.gendr.runtime` is the Runtime."""
    from service.http.app import create_app

    settings.setdefault("models", ["tiny"])
    s = Settings(model_repository=repo, **settings)
    rt = real_runtime(s, behaviour=behaviour, backend=backend)
    return create_app(s, runtime=rt, metrics=rt.metrics)


class Spy:
    """Records what the HTTP layer hands one model's runtime: the jobs, and how each call ended.

    It wraps the real `ModelRuntime.upscale` (the contract's entry point) and changes nothing.
    """

    def __init__(self, runtime: Runtime, name: str = "tiny") -> None:
        self.model = runtime.get(name)
        self.jobs: list[UpscaleJob] = []
        self.started = 0
        self.cancelled = 0
        inner = self.model.upscale

        async def upscale(job: UpscaleJob, reservation: Any) -> Any:
            self.started += 1
            self.jobs.append(job)
            try:
                return await inner(job, reservation)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

        self.model.upscale = upscale  # type: ignore[method-assign]

    @property
    def reserved_tiles(self) -> int:
        """Tiles admitted and not yet released, from the runtime's own gauge (0 once all are given back)."""
        labels = {"model": self.model.name}
        got = self.model.metrics.registry.get_sample_value("gendr_queue_depth_tiles", labels)
        return int(got or 0)

    @property
    def backend(self) -> FakeBackend:
        return self.model.backend  # type: ignore[return-value]


async def until(pred: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Wait for a state the test set up (the timeout only catches a hang, it is never tight)."""
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


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
