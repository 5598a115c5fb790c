"""The HTTP layer through the ASGI app, on the real runtime with the fake backend (http_helpers.py).

Every endpoint, every option and every error path, start-up included: the fake backend's load, delays
and failures are set by the test, so no outcome depends on the machine's speed. Overload, deadline,
engine failure isolation, disconnect and drain are in test_app_concurrency.py; the tiny ONNX model is
exercised in test_e2e.py and test_process.py.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from http_helpers import (
    BrokenLoad,
    Spy,
    decode,
    encode,
    err,
    fake_app,
    held_load,
    photo,
    same_colour,
    small,
)
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings

PNG = encode(small("astronaut.png", 64))  # 64×64 real photo with an ICC profile
JPEG = encode(small("chelsea.png", 60).convert("RGB"), "JPEG", quality=92)  # 60×40


def metric(client: Any, name: str, **labels: str) -> float:
    text = client.get("/metrics").text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# --- endpoints ----------------------------------------------------------------------------------


def test_health_ready_models_docs(make_client: Any) -> None:
    c = make_client(models=["tiny", "other"])
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").json() == {"status": "ready", "ready": True}
    models = c.get("/v1/models").json()
    assert models["default"] == "tiny"
    assert [m["name"] for m in models["data"]] == ["tiny", "other"]
    assert models["limits"]["max_input_pixels"] == Settings.model_fields["max_input_pixels"].default
    assert "<html" in c.get("/docs").text.lower()
    spec = c.get("/openapi.json").json()
    up = spec["paths"]["/v1/upscale"]["post"]  # /upscale: the same route, kept out of the schema
    assert {"multipart/form-data", "image/*"} <= set(up["requestBody"]["content"])
    assert {p["name"] for p in up["parameters"]} >= {"model", "scale", "width", "format", "X-Deadline-Ms"}
    assert {"400", "413", "415", "422", "503", "504"} <= set(up["responses"])


def test_not_ready_while_starting_then_ready(make_client: Any) -> None:
    loaded = threading.Event()  # the model loads when the test says, not after a guessed delay
    c = make_client(backend=held_load(loaded), wait_ready=False)
    try:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "starting"
        body = r.json()
        assert body.pop("request_id") and "retry-after" not in r.headers
        assert body == {"status": "starting", "ready": False}
        assert c.get("/healthz").status_code == 200  # alive while warming up
        r = c.post("/upscale", content=PNG)
        assert r.status_code == 503 and err(r) == "not_ready" and int(r.headers["retry-after"]) >= 1
        retry = Settings.model_fields["retry_after_s"].default  # GENDR_RETRY_AFTER_S: no estimate here
        assert r.headers["retry-after"] == str(math.ceil(retry))
        assert r.json()["error"]["retry_after_s"] == retry
        assert c.get("/v1/models").status_code == 503
    finally:
        loaded.set()
    end = time.monotonic() + 5
    while c.get("/readyz").status_code != 200:
        assert time.monotonic() < end
        time.sleep(0.02)
    assert c.post("/upscale", content=PNG).status_code == 200


def test_failed_start_makes_healthz_fail(make_client: Any) -> None:
    c = make_client(backend=BrokenLoad, wait_ready=False)
    end = time.monotonic() + 5
    while c.get("/healthz").status_code != 503:
        assert time.monotonic() < end
        time.sleep(0.01)
    assert c.get("/readyz").json()["status"] == "failed"
    unhealthy = c.get("/healthz").json()
    assert unhealthy.pop("request_id") and unhealthy == {"status": "unhealthy"}


def test_unknown_route_and_method_use_the_error_shape(make_client: Any) -> None:
    c = make_client()
    r = c.get("/nope")
    assert r.status_code == 404 and err(r) == "not_found"
    r = c.get("/upscale")
    assert r.status_code == 405 and err(r) == "method_not_allowed" and r.headers["allow"] == "POST"


# --- /upscale happy paths and options ------------------------------------------------------------


def test_upscale_raw_png_default_scale_and_headers(make_client: Any) -> None:
    c = make_client(models=["tiny", "other"])
    spy = Spy(c.app.state.gendr.runtime)
    r = c.post("/upscale", content=PNG, headers={"content-type": "image/png", "x-request-id": "abc-123"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    im = decode(r.content)
    assert im.size == (256, 256) and im.mode == "RGB"  # native scale 4, format of the input
    assert same_colour(im.info.get("icc_profile"), photo("astronaut.png").info["icc_profile"])
    assert r.headers["x-model"] == "tiny" and r.headers["x-backend"] == "fake"
    assert int(r.headers["x-tiles"]) >= 1 and float(r.headers["x-queue-time-ms"]) >= 0
    assert r.headers["x-request-id"] == "abc-123"
    timing = dict(p.strip().split(";dur=") for p in r.headers["server-timing"].split(","))
    assert {"decode", "queue", "compute", "encode", "total"} <= set(timing)
    assert all(float(v) >= 0 for v in timing.values())
    job = spy.jobs[-1]
    assert job.image.dtype == np.uint8 and job.image.shape == (64, 64, 3) and job.color_fix is None
    assert job.request_id == "abc-123"


@pytest.mark.parametrize(
    ("query", "size"),
    [
        ("scale=2", (120, 80)),
        ("scale=1", (60, 40)),
        ("scale=1.5", (90, 60)),
        ("width=150", (150, 100)),  # aspect kept
        ("height=100", (150, 100)),
        ("width=100&height=100", (100, 67)),  # fit=contain by default: inside the box, aspect kept
        ("width=100&height=100&fit=fill", (100, 100)),  # stretched only on request
        ("width=100&height=100&fit=cover", (100, 100)),  # filled, centred crop
        ("model=other", (120, 80)),  # native ×2
    ],
)
def test_size_options(make_client: Any, query: str, size: tuple[int, int]) -> None:
    r = make_client(models=["tiny", "other"]).post(
        f"/upscale?{query}", content=JPEG, headers={"content-type": "image/jpeg"}
    )
    assert r.status_code == 200, r.text
    assert decode(r.content).size == size and r.headers["x-image-size"] == f"{size[0]}x{size[1]}"
    assert r.headers["content-type"] == "image/jpeg"  # JPEG in → JPEG out


@pytest.mark.parametrize(
    ("fmt", "ctype", "pil"),
    [
        ("png", "image/png", "PNG"),
        ("jpeg", "image/jpeg", "JPEG"),
        ("jpg", "image/jpeg", "JPEG"),
        ("webp", "image/webp", "WEBP"),
    ],
)
def test_format_option(make_client: Any, fmt: str, ctype: str, pil: str) -> None:
    r = make_client().post(f"/upscale?scale=2&format={fmt}", content=PNG)
    assert r.status_code == 200 and r.headers["content-type"] == ctype
    assert decode(r.content).format == pil


def test_quality_color_fix_and_deadline_reach_the_job(make_client: Any) -> None:
    c = make_client(max_deadline_s=30, default_deadline_s=20)
    spy = Spy(c.app.state.gendr.runtime)
    lo = c.post("/upscale?scale=2&format=jpeg&quality=15", content=PNG).content
    hi = c.post("/upscale?scale=2&format=jpeg&quality=95", content=PNG).content
    assert len(lo) < len(hi)
    for fix in ("none", "adain", "wavelet"):
        assert c.post(f"/upscale?scale=2&color_fix={fix}", content=PNG).status_code == 200
        assert spy.jobs[-1].color_fix == fix
    jobs = spy.jobs
    t = time.monotonic()
    c.post("/upscale?scale=2", content=PNG)
    assert 19 < jobs[-1].deadline - t <= 20.01  # default
    c.post("/upscale?scale=2&deadline_ms=5000", content=PNG)
    assert 4 < jobs[-1].deadline - time.monotonic() <= 5
    c.post("/upscale?scale=2", content=PNG, headers={"X-Deadline-Ms": "3000"})
    assert 2 < jobs[-1].deadline - time.monotonic() <= 3
    c.post("/upscale?scale=2&deadline_ms=9000", content=PNG, headers={"X-Deadline-Ms": "7000"})
    assert 6 < jobs[-1].deadline - time.monotonic() <= 7  # the smaller wins
    c.post("/upscale?scale=2&deadline_ms=3600000", content=PNG)
    assert jobs[-1].deadline - time.monotonic() <= 30  # capped by max_deadline_s


def test_multipart_upload_with_form_options(make_client: Any) -> None:
    c = make_client()
    r = c.post(
        "/upscale", files={"image": ("cat.jpg", JPEG, "image/jpeg")}, data={"scale": "2", "format": "png"}
    )
    assert r.status_code == 200, r.text
    assert decode(r.content).size == (120, 80) and r.headers["content-type"] == "image/png"
    r = c.post("/upscale?scale=2", files={"image": ("cat.jpg", JPEG, "image/jpeg")}, data={"scale": "3"})
    assert r.status_code == 400 and "both" in r.json()["error"]["message"]
    r = c.post("/upscale", files={"file": ("cat.jpg", JPEG, "image/jpeg")})
    assert r.status_code == 400 and err(r) == "bad_request"
    r = c.post("/upscale", data={"scale": "2"}, files={"other": ("x", b"", "text/plain")})
    assert r.status_code == 400
    r = c.post("/upscale", files={"image": ("cat.jpg", JPEG, "image/jpeg")}, data={"bogus": "1"})
    assert r.status_code == 400 and "bogus" in r.json()["error"]["message"]


def test_grayscale_rgba_cmyk_and_exif_through_http(make_client: Any) -> None:
    c = make_client()
    gray = decode(c.post("/upscale?scale=2", content=encode(small("camera.png", 64))).content)
    assert gray.mode == "L" and gray.size == (128, 128)
    horse = photo("horse.png").resize((100, 82))
    rgba = decode(c.post("/upscale?scale=2", content=encode(horse)).content)
    assert rgba.mode == "RGBA" and rgba.size == (200, 164)
    cmyk = encode(small("coffee.png", 60).convert("CMYK"), "JPEG", quality=95)
    out = decode(c.post("/upscale?scale=2", content=cmyk).content)
    assert out.mode == "RGB" and out.format == "JPEG" and out.size == (120, 80)
    exif = Image.Exif()
    exif[0x0112] = 8
    rotated = encode(
        small("chelsea.png", 60).transpose(Image.Transpose.ROTATE_270), "JPEG", exif=exif.tobytes()
    )
    assert decode(c.post("/upscale?scale=2", content=rotated).content).size == (120, 80)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "scale=0",
        "scale=abc",
        "scale=2&width=10",
        "format=gif",
        "quality=0",
        "quality=101",
        "color_fix=magic",
        "width=0",
        "model=Bad%20Name",
        "deadline_ms=0",
        "typo=1",
        "scale=9",
    ],
)
def test_bad_options_are_400(make_client: Any, query: str) -> None:
    r = make_client().post(f"/upscale?{query}", content=PNG)
    assert r.status_code == 400, (query, r.text)
    assert err(r) == "bad_request"


def test_bad_deadline_header_is_400(make_client: Any) -> None:
    r = make_client().post("/upscale", content=PNG, headers={"X-Deadline-Ms": "soon"})
    assert r.status_code == 400 and err(r) == "bad_request"


def test_unknown_model_is_404(make_client: Any) -> None:
    r = make_client().post("/upscale?model=nope", content=PNG)
    assert r.status_code == 404 and err(r) == "model_not_found"


def test_unsupported_and_undecodable_images(make_client: Any) -> None:
    c = make_client()
    gif = encode(small("coffee.png", 32), "GIF")
    for body, ctype in ((gif, "image/gif"), (b"%PDF-1.4 not an image", "application/octet-stream")):
        r = c.post("/upscale", content=body, headers={"content-type": ctype})
        assert r.status_code == 415 and err(r) == "unsupported_media_type"
    r = c.post("/upscale", content=b'{"image": "..."}', headers={"content-type": "application/json"})
    assert r.status_code == 415
    truncated = JPEG[: len(JPEG) // 2]
    r = c.post("/upscale", content=truncated, headers={"content-type": "image/jpeg"})
    assert r.status_code == 422 and err(r) == "undecodable_image"
    r = c.post("/upscale", content=b"", headers={"content-type": "image/png"})
    assert r.status_code == 400


def _png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 150)).save(buf, "PNG")
    return buf.getvalue()


def test_pixel_limits_are_413_before_decoding(make_client: Any) -> None:
    from test_images import bomb_png

    c = make_client(max_input_pixels=10_000, max_output_pixels=50_000)
    r = c.post("/upscale", content=bomb_png(50_000, 50_000))
    assert r.status_code == 413 and err(r) == "image_too_large"
    r = c.post("/upscale?scale=1", content=PNG)  # 64² = 4096 input OK, output 4096 OK
    assert r.status_code == 200
    r = c.post("/upscale?scale=4", content=PNG)  # output 256² > 50 000
    assert r.status_code == 413 and "output" in r.json()["error"]["message"]
    r = c.post(
        "/upscale?width=16384&height=2&fit=fill&format=webp", content=PNG
    )  # ×256: over GENDR_MAX_SCALE
    assert (
        r.status_code == 400 and err(r) == "bad_request" and "the limit is ×8" in r.json()["error"]["message"]
    )
    wide = make_client(max_output_pixels=1 << 22)
    r = wide.post("/upscale?width=16384&height=16&format=webp", content=_png(2048, 2))  # ×8, WebP max 16383
    assert r.status_code == 413 and err(r) == "image_too_large" and "16383" in r.json()["error"]["message"]


def test_body_limit_with_content_length_is_413(make_client: Any) -> None:
    c = make_client(max_body_bytes=4096)
    r = c.post("/upscale", content=PNG)  # ~ 10 kB
    assert r.status_code == 413 and err(r) == "payload_too_large"
    assert r.headers["connection"] == "close"


def test_body_limit_without_content_length_stops_reading(http_repo: Path) -> None:
    """Chunked upload (no Content-Length): 413 after the limit, the rest is never pulled."""
    app = fake_app(http_repo, max_body_bytes=64 * 1024)
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1000):  # would be 16 MB
            sent += 1
            yield b"\0" * 16384

    async def main() -> httpx.Response:
        await app.state.gendr.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await c.post("/upscale", content=body(), headers={"content-type": "image/png"})
        finally:
            await app.state.gendr.close()

    r = asyncio.run(main())
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert sent <= 6  # 64 KiB limit / 16 KiB chunks, plus the one that crossed it


def test_auth_protects_upscale_only(make_client: Any) -> None:
    c = make_client(api_keys="k1,secret-2")
    r = c.post("/upscale?scale=2", content=PNG)
    assert (
        r.status_code == 401
        and err(r) == "unauthorized"
        and r.headers["www-authenticate"].startswith("Bearer")
    )
    r = c.post("/upscale?scale=2", content=PNG, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = c.post("/upscale?scale=2", content=PNG, headers={"Authorization": "Basic c2VjcmV0LTI="})
    assert r.status_code == 401
    r = c.post("/upscale?scale=2", content=PNG, headers={"Authorization": "Bearer secret-2"})
    assert r.status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):
        assert c.get(path).status_code == 200, path
    # 401 comes before option validation and before the body is read.
    assert c.post("/upscale?scale=abc", content=PNG).status_code == 401


def test_unhandled_error_is_500_without_internals(make_client: Any) -> None:
    c = make_client(raise_server_exceptions=False)
    model = c.app.state.gendr.runtime.get("tiny")

    async def broken(job: Any, reservation: Any) -> Any:  # a bug in the runtime, not an engine failure
        reservation.release()
        raise RuntimeError("secret internal detail /opt/models/x")

    model.upscale = broken
    r = c.post("/upscale", content=PNG)
    assert r.status_code == 500 and err(r) == "internal_error"
    assert "secret" not in r.text and "RuntimeError" not in r.text
    assert c.get("/healthz").status_code == 200


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_page_parses_and_counters_move(make_client: Any) -> None:
    c = make_client()
    before = metric(c, "gendr_requests_total", model="tiny", status="200")
    dec_before = metric(c, "gendr_decode_duration_seconds_count")
    assert c.post("/upscale?scale=2", content=PNG).status_code == 200
    assert c.post("/upscale?scale=2", content=b"junk").status_code == 415
    assert metric(c, "gendr_requests_total", model="tiny", status="200") == before + 1
    assert metric(c, "gendr_requests_total", status="415") >= 1
    assert metric(c, "gendr_request_errors_total", code="unsupported_media_type") >= 1
    assert metric(c, "gendr_decode_duration_seconds_count") == dec_before + 1
    assert metric(c, "gendr_encode_duration_seconds_count") >= 1
    assert metric(c, "gendr_request_duration_seconds_count", model="tiny") >= 1
    assert metric(c, "gendr_ready") == 1
    assert metric(c, "gendr_build_info", model="tiny", backend="fake") == 1
    assert metric(c, "gendr_http_inflight_requests") == 0
    names = {f.name for f in text_string_to_metric_families(c.get("/metrics").text)}
    assert {
        "gendr_requests",
        "gendr_request_duration_seconds",
        "gendr_queue_depth_tiles",
        "gendr_ready",
    } <= names
