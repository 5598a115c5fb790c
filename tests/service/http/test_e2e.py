"""The ASGI app on the real runtime: the tiny GenDR model on ONNX Runtime CPU (tests/service/conftest.py).

Real photos go through the real decode → admission → tile batcher → ONNX → stitch → encode path;
the runtime's own metrics must show up on /metrics. Engine failure isolation uses the real runtime
with the fake backend (failures on demand).
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from http_helpers import decode, encode, photo, same_colour, small
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.http import images
from service.http.app import create_app
from service.metrics import Metrics
from service.pixels.imageops import resize_rgb
from service.runtime import Runtime
from service.settings import Settings


def _settings(repo: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "model_repository": repo,
        "backend": "onnxruntime-cpu",
        "max_batch": 2,
        "intra_op_threads": 1,
    }
    return Settings(**{**base, **kw})


def _wait_ready(c: TestClient, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while c.get("/readyz").status_code != 200:
        assert time.monotonic() < end, c.get("/readyz").text
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(tiny_repo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tiny_repo, queue_capacity_tiles=40))) as c:
        _wait_ready(c)
        yield c


def samples(c: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(c.get("/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and all((k, labels[k]) in ls for k in labels))


def test_models_and_readiness_on_the_real_runtime(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    (tiny,) = models["data"]
    assert tiny["name"] == "tiny" and tiny["backend"] == "onnxruntime-cpu" and tiny["native_scale"] == 4
    assert tiny["tile"]["input"] == 64 and tiny["ready"] is True
    assert client.get("/readyz").json()["ready"] is True


def test_real_photo_through_the_tiny_model(client: TestClient) -> None:
    before = samples(client)
    src = small("astronaut.png", 48)
    r = client.post("/upscale?scale=2", content=encode(src), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    out = decode(r.content)
    assert out.size == (96, 96) and out.mode == "RGB" and out.format == "PNG"
    assert same_colour(out.info.get("icc_profile"), photo("astronaut.png").info["icc_profile"])
    assert r.headers["x-backend"] == "onnxruntime-cpu" and r.headers["x-model"] == "tiny"
    assert r.headers["x-precision"] == "fp32" and int(r.headers["x-tiles"]) >= 1
    timing = dict(p.strip().split(";dur=") for p in r.headers["server-timing"].split(","))
    assert float(timing["compute"]) > 0 and float(timing["total"]) >= float(timing["compute"])
    # A random tiny model changes the pixels; the default AdaIN colour fix keeps the colours.
    got = np.asarray(out).astype(np.float64)
    bic = resize_rgb(np.asarray(src), 96, 96).astype(np.float64)
    assert np.abs(got - bic).mean() > 1
    assert np.abs(got.mean(axis=(0, 1)) - bic.mean(axis=(0, 1))).max() < 8
    after = samples(client)
    for name in (
        "gendr_tiles_total",
        "gendr_batch_size_count",
        "gendr_output_megapixels_total",
        "gendr_compute_duration_seconds_count",
        "gendr_queue_duration_seconds_count",
    ):
        assert total(after, name) > total(before, name), name
    assert total(after, "gendr_requests_total", model="tiny", status="200") == (
        total(before, "gendr_requests_total", model="tiny", status="200") + 1
    )
    assert total(after, "gendr_build_info", model="tiny", backend="onnxruntime-cpu") == 1
    assert total(after, "gendr_queue_depth_tiles", model="tiny") == 0


def test_options_on_the_real_runtime(client: TestClient) -> None:
    jpeg = encode(small("chelsea.png", 48).convert("RGB"), "JPEG", quality=92)  # 48×32
    outs = {}
    for fix in ("none", "adain", "wavelet"):
        r = client.post(f"/upscale?scale=2&color_fix={fix}&format=png", content=jpeg)
        assert r.status_code == 200, r.text
        outs[fix] = np.asarray(decode(r.content))
    assert not np.array_equal(outs["none"], outs["adain"]) and not np.array_equal(
        outs["none"], outs["wavelet"]
    )
    cases = {
        "width=80": ((80, 53), "JPEG"),
        "height=40&format=webp": ((60, 40), "WEBP"),
        "scale=1&format=jpeg&quality=40": ((48, 32), "JPEG"),
        "model=tiny&width=64&height=64": ((64, 43), "JPEG"),  # fit=contain by default
        "model=tiny&width=64&height=64&fit=fill": ((64, 64), "JPEG"),
    }
    for query, (size, fmt) in cases.items():
        r = client.post(f"/upscale?{query}", content=jpeg)
        assert r.status_code == 200, (query, r.text)
        im = decode(r.content)
        assert (im.size, im.format) == (size, fmt), query
    multipart = client.post("/upscale", files={"image": ("cat.jpg", jpeg, "image/jpeg")}, data={"scale": "2"})
    assert multipart.status_code == 200 and decode(multipart.content).size == (96, 64)


def test_user_image_kinds_on_the_real_runtime(client: TestClient) -> None:
    gray = decode(client.post("/upscale?scale=2", content=encode(small("camera.png", 40))).content)
    assert gray.mode == "L" and gray.size == (80, 80)
    horse = photo("horse.png").resize((50, 41))
    rgba = decode(client.post("/upscale?scale=2", content=encode(horse)).content)
    assert rgba.mode == "RGBA" and rgba.size == (100, 82)
    want_alpha = np.asarray(horse.getchannel("A").resize((100, 82), Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(np.asarray(rgba.getchannel("A")).astype(int) - want_alpha).max() <= 1
    cmyk = encode(small("coffee.png", 48).convert("CMYK"), "JPEG", quality=95)
    out = decode(client.post("/upscale?scale=2", content=cmyk).content)
    assert out.mode == "RGB" and out.size == (96, 64)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = small("chelsea.png", 48)
    rotated = encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    assert decode(client.post("/upscale?scale=2", content=rotated).content).size == (96, 64)
    arr16 = (np.asarray(small("coffee.png", 40)).astype(np.uint16) * 257 + 100).astype(np.uint16)
    r = client.post("/upscale?scale=2", content=images.write_png16(arr16))
    assert r.status_code == 200 and images.read_png16(r.content).shape == (2 * arr16.shape[0], 80, 3)
    assert decode(r.content).format == "PNG"


def test_deadline_on_the_real_runtime_drops_the_work(tiny_repo: Path) -> None:
    """The real runtime with the fake engine at 50 ms per tile: the deadline passes after a few tiles."""
    settings = _settings(tiny_repo, backend="fake", fake_per_tile_s=0.05)
    with TestClient(create_app(settings)) as c:
        _wait_ready(c)
        body = encode(small("coffee.png", 96))  # ×4: ~60 tiles, 3 s of engine time
        r = c.post("/upscale?scale=4&deadline_ms=150", content=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        end = time.monotonic() + 5
        while total(samples(c), "gendr_queue_depth_tiles", model="tiny") != 0:
            assert time.monotonic() < end, "expired tiles were not dropped"
            time.sleep(0.05)
        backend = c.app.state.gendr.runtime.models["tiny"].backend  # type: ignore[attr-defined]
        assert sum(n for _, n in backend.calls) < 30  # the rest was dropped, never computed


def test_overload_on_the_real_runtime(tiny_repo: Path) -> None:
    """Capacity 40 tiles: a 36-tile request is admitted, a second one meanwhile gets 503 + Retry-After.
    The fake engine at 50 ms per tile keeps the first one running (1.8 s) whatever the machine's speed."""
    settings = _settings(tiny_repo, backend="fake", fake_per_tile_s=0.05, queue_capacity_tiles=40)
    with TestClient(create_app(settings)) as client:
        _wait_ready(client)
        big = encode(small("astronaut.png", 96))  # ×4 → 384²: 36 tiles of 64 with overlap 16
        results: dict[str, httpx.Response] = {}
        t = threading.Thread(
            target=lambda: results.setdefault("big", client.post("/upscale?scale=4", content=big))
        )
        t.start()
        end = time.monotonic() + 10
        while total(samples(client), "gendr_queue_depth_tiles", model="tiny") == 0:
            assert time.monotonic() < end
            time.sleep(0.01)
        second = client.post("/upscale?scale=4", content=encode(small("coffee.png", 40)))
        t.join(60)
        assert results["big"].status_code == 200
        assert second.status_code == 503 and second.json()["error"]["code"] == "overloaded"
        assert int(second.headers["retry-after"]) >= 1


def test_degenerate_aspect_is_413_before_any_work(client: TestClient) -> None:
    """A thin image within the pixel limits would still be thousands of mostly-padding tiles
    (gigabytes of padded input, the queue blocked for everyone): refused from the header, at once."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1_000_000, 2)).save(buf, "PNG")  # 2 MP in, 8 MP out at ×2: within pixel limits
    t0 = time.monotonic()
    r = client.post("/upscale?scale=2", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    assert "tiles" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 5
    limit = client.get("/v1/models").json()["data"][0]["limits"]["max_request_tiles"]
    assert 0 < limit < 20_000
    ok = client.post("/upscale?scale=1", content=encode(small("coffee.png", 24)))
    assert ok.status_code == 200  # the queue was never touched


def test_engine_failure_only_fails_affected_requests(tmp_path: Path) -> None:
    """Real runtime + fake backend that fails on black tiles: only the black image's request is a 500."""
    from runtime_helpers import write_fake_repo

    from service.backends.fake import FakeBackend, FakeBehaviour

    repo = write_fake_repo(tmp_path, name="fake", tile=32, overlap=8, kind="gendr")
    behaviour = FakeBehaviour(delay_s=0.02, fail_if=lambda inst, batch: bool(batch.max() == 0))
    settings = Settings(model_repository=repo, max_batch=1, unhealthy_after_failures=100)
    metrics = Metrics()
    runtime = Runtime.from_settings(
        settings, metrics, backend_factory=lambda m, d, s: (FakeBackend(m, d, behaviour=behaviour), "test")
    )
    app = create_app(settings, runtime=runtime, metrics=metrics)
    black = encode(Image.new("RGB", (40, 40)))
    ok = encode(small("astronaut.png", 40))

    async def main() -> list[int]:
        await app.state.gendr.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
                rs = await asyncio.gather(
                    *(
                        c.post("/upscale?scale=1&color_fix=none", content=b)
                        for b in (ok, black, ok, ok, black)
                    )
                )
            return [r.status_code for r in rs]
        finally:
            await app.state.gendr.close()

    codes = asyncio.run(main())
    assert codes == [200, 500, 200, 200, 500]
    assert (
        metrics.registry.get_sample_value(
            "gendr_request_errors_total", {"model": "fake", "code": "engine_failure"}
        )
        == 2
    )
