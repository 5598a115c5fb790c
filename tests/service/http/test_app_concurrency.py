"""The HTTP layer under concurrency, on the real runtime with the fake backend (http_helpers.py): overload,
deadline, engine failure isolation, client disconnect and drain.

The fake engine is held (`FakeBehaviour.hang`) until the test lets it go, and the test waits for the
state it needs (admitted, in the engine, draining) instead of sleeping: no outcome depends on the
machine's speed.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from http_helpers import Spy, encode, err, fake_app, small, until
from PIL import Image

from service.backends.fake import FakeBehaviour
from service.settings import Settings

PNG = encode(small("astronaut.png", 64))  # 64×64 real photo with an ICC profile


def _upscale_scope(query: bytes, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """An ASGI scope for POST /upscale of a PNG, for tests that drive receive/send themselves."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/upscale",
        "raw_path": b"/upscale",
        "query_string": query,
        "root_path": "",
        "headers": [(b"content-type", b"image/png"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("t", 80),
    }


async def _started(app: Any) -> httpx.AsyncClient:
    await app.state.gendr.start()
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30)


def test_overload_is_503_with_retry_after(http_repo: Path) -> None:
    """The first request holds the engine (a hang the test releases); the second finds the queue full.

    Retry-After is the runtime's estimate: the tiles ahead over the measured tiles/s, here the fake
    engine's warm-up timing (one tile per batch in 1.5 s), so one tile ahead is 1.5 s.
    """
    hang = threading.Event()
    hang.set()
    beh = FakeBehaviour(delay_s=1.5, hang=hang)  # the estimate is seeded from warm-up, before any batch
    app = fake_app(http_repo, beh, queue_capacity_tiles=1, max_batch=1)
    spy = Spy(app.state.gendr.runtime)
    held: list[int] = []

    async def main() -> list[httpx.Response]:
        async with await _started(app) as c:
            try:
                first = asyncio.create_task(c.post("/upscale?scale=1", content=PNG))  # 64² at tile 64: 1 tile
                await until(lambda: spy.backend.calls != [], "the first request to reach the engine")
                held.append(spy.reserved_tiles)
                second = await c.post("/upscale?scale=1", content=PNG)
                beh.delay_s = 0.0  # let the held request finish at once
                hang.clear()
                return [await first, second]
            finally:
                hang.clear()
                await app.state.gendr.close()

    first, second = asyncio.run(main())
    assert held == [1]
    assert first.status_code == 200
    assert second.status_code == 503 and second.json()["error"]["code"] == "overloaded"
    assert second.headers["retry-after"] == "2"  # ceil(1.5) from the runtime's estimate
    assert second.json()["error"]["retry_after_s"] == 1.5
    assert spy.reserved_tiles == 0  # every reservation released


def test_deadline_is_504(make_client: Any) -> None:
    hang = threading.Event()  # the engine holds the batch until the test lets go
    hang.set()
    c = make_client(behaviour=FakeBehaviour(hang=hang))
    spy = Spy(c.app.state.gendr.runtime)
    try:
        t = time.monotonic()
        r = c.post("/upscale?scale=2&deadline_ms=200", content=PNG)
        assert r.status_code == 504 and err(r) == "deadline_exceeded"
        assert time.monotonic() - t < 1.5
        assert spy.reserved_tiles == 0
    finally:
        hang.clear()


def test_engine_failure_fails_only_the_affected_request(http_repo: Path) -> None:
    """The fake engine fails every batch holding a black tile: only the black image's request fails."""
    beh = FakeBehaviour(delay_s=0.01, fail_if=lambda inst, batch: bool(batch.max() == 0))
    app = fake_app(http_repo, beh, max_batch=1, unhealthy_after_failures=100)
    poison = encode(Image.new("RGB", (64, 64)))

    async def main() -> list[httpx.Response]:
        async with await _started(app) as c:
            try:
                ids = ["ok-1", "poison-1", "ok-2", "ok-3"]
                return await asyncio.gather(
                    *(
                        c.post(
                            "/upscale?scale=2&color_fix=none",
                            content=poison if i.startswith("poison") else PNG,
                            headers={"X-Request-Id": i},
                        )
                        for i in ids
                    )
                )
            finally:
                await app.state.gendr.close()

    codes = [r.status_code for r in asyncio.run(main())]
    assert codes == [200, 500, 200, 200]


def test_client_disconnect_cancels_the_runtime_call(http_repo: Path) -> None:
    hang = threading.Event()  # the engine never finishes on its own
    hang.set()
    app = fake_app(http_repo, FakeBehaviour(hang=hang))
    spy = Spy(app.state.gendr.runtime)
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        await app.state.gendr.start()
        gone = asyncio.Event()
        messages = [{"type": "http.request", "body": PNG, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = _upscale_scope(b"scale=2", [(b"content-length", str(len(PNG)).encode())])
        try:
            call = asyncio.create_task(app(scope, receive, send))
            await until(lambda: spy.backend.calls != [], "the request to reach the engine")
            assert spy.started == 1 and spy.reserved_tiles > 0
            gone.set()
            await asyncio.wait_for(call, 2)  # while the engine is still held
        finally:
            hang.clear()
            await app.state.gendr.close()

    t = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - t < 3  # did not wait for the engine
    assert spy.cancelled == 1 and spy.reserved_tiles == 0
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 499
    text = app.state.gendr.metrics.registry
    assert text.get_sample_value("gendr_requests_total", {"model": "tiny", "status": "499"}) == 1


def test_client_gone_during_upload_is_499_not_500(http_repo: Path) -> None:
    app = fake_app(http_repo)
    sent: list[dict[str, Any]] = []
    messages = [
        {"type": "http.request", "body": PNG[:1000], "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> None:
        await app.state.gendr.start()
        scope = _upscale_scope(b"", [])
        try:
            await app(scope, receive, send)
        finally:
            await app.state.gendr.close()

    asyncio.run(main())
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 499
    reg = app.state.gendr.metrics.registry
    assert (
        reg.get_sample_value(
            "gendr_request_errors_total", {"model": "unknown", "code": "client_closed_request"}
        )
        == 1
    )


def test_drain_finishes_in_flight_work_and_refuses_new(http_repo: Path) -> None:
    hang = threading.Event()  # in-flight work stays in flight until the test lets the engine go
    hang.set()
    app = fake_app(http_repo, FakeBehaviour(hang=hang))
    st = app.state.gendr
    spy = Spy(st.runtime)

    async def main() -> tuple[list[httpx.Response], httpx.Response, httpx.Response, bool]:
        async with await _started(app) as c:
            try:
                inflight = [asyncio.create_task(c.post("/upscale?scale=2", content=PNG)) for _ in range(3)]
                await until(lambda: spy.started == 3, "three requests admitted")
                drain = asyncio.create_task(st.drain(5.0))
                await until(lambda: st.draining, "the drain to begin")
                late = await c.post("/upscale?scale=2", content=PNG)
                ready = await c.get("/readyz")
                hang.clear()
                done = await drain
                return [await t for t in inflight], late, ready, done
            finally:
                hang.clear()
                await st.close()

    results, late, ready, done = asyncio.run(main())
    assert [r.status_code for r in results] == [200, 200, 200]
    assert (
        late.status_code == 503
        and late.json()["error"]["code"] == "draining"
        and "retry-after" in late.headers
    )
    assert late.headers["retry-after"] == str(math.ceil(Settings.model_fields["retry_after_s"].default))
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert done and st.inflight == 0
