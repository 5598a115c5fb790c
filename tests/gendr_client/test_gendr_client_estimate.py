"""The client's job choice, read timeout and output size come from the server's own numbers (GET
/v1/models: cost table, tiles, instances, native scale), fetched once per client; without them the old
constants apply. Over real HTTP: the scripted stub (its /v1/models set by the test) and a real
`gendr-serve` whose fake engine takes 0.3 s per tile, as a CPU would take seconds."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import pytest
from live_server import LiveServer, live_server, photo_png
from PIL import Image
from stub_server import Stub

import gendr_client
from gendr_client import AsyncClient, Client, _estimate

KINDS = pytest.mark.parametrize("kind", ["sync", "async"])


def models(per_tile_s: float | None, native: float = 4, tile: int = 64, instances: int = 1) -> dict[str, Any]:
    """A /v1/models body with one model, as service/runtime.py describes it."""
    rows = [] if per_tile_s is None else [{"height": tile, "width": tile, "batch": 1, "seconds": per_tile_s}]
    return {
        "object": "list",
        "default": "m",
        "data": [
            {
                "name": "m",
                "native_scale": native,
                "tile": {"input": tile, "overlap": 16, "graph_scale": 1, "output": tile},
                "shapes": {"tiles": [tile], "dynamic": False, "whole_image_max_pixels": 0},
                "cost_table": rows,
                "instances": instances,
                "limits": {"queue_capacity_tiles": 8},
            }
        ],
        "limits": {"max_output_pixels": 16_777_216, "max_scale": 8.0},
    }


def png(w: int, h: int | None = None) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h or w), (90, 120, 30)).save(buf, format="PNG")
    return buf.getvalue()


def run(kind: str, url: str, images: list[bytes], **kw: Any) -> list[gendr_client.Result]:
    """Upscale each image with one client (sync or async), waits recorded instead of slept."""
    deadline = kw.pop("deadline_s", 30.0)
    if kind == "sync":
        with Client(url, deadline_s=deadline, poll_s=0.01, sleep=lambda s: None) as c:
            return [c.upscale(i, **kw) for i in images]

    async def nap(s: float) -> None:
        pass

    async def go() -> list[gendr_client.Result]:
        async with AsyncClient(url, deadline_s=deadline, poll_s=0.01, sleep=nap) as c:
            return [await c.upscale(i, **kw) for i in images]

    return asyncio.run(go())


def paths(stub: Stub) -> list[str]:
    return [s.path.split("?")[0] for s in stub.posts()]


@KINDS
def test_a_slow_server_gets_a_small_image_as_a_job_and_models_is_read_once(kind: str, stub: Stub) -> None:
    """5 s per tile (a CPU): 200×200 at ×1 is 25 tiles, ~2 min — a job, although it is 0.04 MP."""
    stub.models = models(per_tile_s=5.0)
    res = run(kind, stub.url, [png(200), png(200)], scale=1)
    assert paths(stub) == ["/v1/jobs", "/v1/jobs"] and all(r.job_id for r in res)
    assert stub.model_gets == 1  # once per client, not per image


@KINDS
def test_a_fast_server_takes_a_large_image_in_one_request(kind: str, stub: Stub) -> None:
    """1 ms per 512² tile (a GPU): a 1200×1000 photo at the default scale (16 MP) is ~0.1 s of work."""
    stub.models = models(per_tile_s=0.001, tile=512)
    res = run(kind, stub.url, [png(1200, 1000)])
    assert paths(stub) == ["/upscale"] and res[0].job_id is None  # the old 4 MP rule made this a job


def test_the_output_size_uses_the_models_native_scale(stub: Stub) -> None:
    """No cost table: the pixel rule applies, but at the model's native scale (×1 here), not ×4."""
    stub.models = models(per_tile_s=None, native=1)
    run("sync", stub.url, [png(1200, 1000)])  # 1.2 MP at ×1
    stub.models = models(per_tile_s=None, native=4)
    run("sync", stub.url, [png(1200, 1000)])  # 16 MP at ×4 (capped by the server's output limit)
    assert paths(stub) == ["/upscale", "/v1/jobs"]


def test_without_models_the_fixed_rules_apply(stub: Stub) -> None:
    """An older server (404 on /v1/models): ×4 and 4 MP decide, as before."""
    run("sync", stub.url, [png(1200, 1000), png(300)])
    assert paths(stub) == ["/v1/jobs", "/upscale"] and stub.model_gets == 1


@KINDS
def test_the_read_timeout_comes_from_the_estimate(
    kind: str, stub: Stub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server answers after 2 s. With its estimate the client waits for it: one request. Without
    one the fixed read timeout (1 s here, standing in for 60 s) gives up and sends it again and again."""
    monkeypatch.setattr(_estimate, "FALLBACK_READ_TIMEOUT_S", 1.0)
    monkeypatch.setattr(_estimate, "READ_TIMEOUT_MIN_S", 1.0)
    stub.upscale_delay_s = 2.0
    stub.models = models(per_tile_s=0.5)  # 1 tile: 0.5 s, so wait 3 × 0.5 + the queue's 8 × 0.5 + 10 s
    res = run(kind, stub.url, [png(40)], scale=1)
    assert paths(stub) == ["/upscale"] and res[0].width == 8

    stub.seen.clear()
    stub.models = None
    with pytest.raises(gendr_client.DeadlineExceeded) as e:
        run(kind, stub.url, [png(40)], scale=1, deadline_s=4.5)
    assert isinstance(e.value.__cause__, gendr_client.ConnectionFailed)
    assert len(paths(stub)) >= 2  # the bug this fixes: the same work sent again


# ---------------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """0.3 s per 64² tile, batch 1: its warm-up cost table says so, and its engine takes that long."""
    with live_server(
        tmp_path_factory.mktemp("slow"), GENDR_FAKE_PER_TILE_S="0.3", GENDR_MAX_BATCH="1"
    ) as srv:
        yield srv


def test_a_request_longer_than_the_fixed_timeout_is_sent_once(
    slow: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """120×120 at ×1 is 9 tiles, ~2.7 s. With the fixed read timeout at 1 s (for 60 s) a client
    without the estimate gives up on it again and again (the server logs each as 499); with the
    server's estimate it is one request, answered."""
    monkeypatch.setattr(_estimate, "FALLBACK_READ_TIMEOUT_S", 1.0)
    monkeypatch.setattr(_estimate, "READ_TIMEOUT_MIN_S", 1.0)
    image = photo_png(120)
    ok, gone = (slow.metric("gendr_requests_total", status=s) for s in ("200", "499"))
    with Client(slow.url, deadline_s=60) as c:
        assert c.server_info() is not None
        res = c.upscale(image, scale=1)
    assert res.job_id is None and res.tiles == 9 and (res.width, res.height) == (120, 120)
    assert slow.metric("gendr_requests_total", status="200") == ok + 1
    assert slow.metric("gendr_requests_total", status="499") == gone

    monkeypatch.setattr(_estimate.ServerInfo, "parse", classmethod(lambda cls, body: None))
    with Client(slow.url, deadline_s=4.0) as c, pytest.raises(gendr_client.DeadlineExceeded):
        c.upscale(image, scale=1)
    slow.wait_metric("gendr_requests_total", lambda v: v >= gone + 2, status="499")


def test_the_servers_estimate_picks_a_job_on_a_real_server(
    slow: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the job threshold at 2 s: 9 tiles (2.7 s) become a job, 1 tile (0.3 s) stays a request."""
    monkeypatch.setattr(_estimate, "JOB_ABOVE_S", 2.0)
    with Client(slow.url, deadline_s=60, poll_s=0.05) as c:
        big = c.upscale(photo_png(120), scale=1)
        small = c.upscale(photo_png(40), scale=1)
    assert big.job_id is not None and big.tiles == 9
    assert small.job_id is None and small.tiles == 1
