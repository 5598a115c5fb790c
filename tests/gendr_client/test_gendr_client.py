"""gendr_client against a real gendr-serve process (fake backend, engine calls gated by the test)."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, live_server
from PIL import Image
from skimage import data

import gendr_client
from gendr_client import AsyncClient, Client

KEY = "client-test-key"


def png(width: int, height: int | None = None) -> bytes:
    im = Image.fromarray(data.astronaut()).resize((width, height or width), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # 64-px tiles, 16 overlap, batch 1: a 200×200 image at ×1 is 25 tiles, over the queue's 8.
    with live_server(
        tmp_path_factory.mktemp("client"),
        GENDR_API_KEYS=KEY,
        GENDR_MAX_BATCH="1",
        GENDR_QUEUE_CAPACITY_TILES="8",
    ) as srv:
        yield srv


@pytest.fixture
def client(server: LiveServer) -> Iterator[Client]:
    server.release()
    with Client(server.url, api_key=KEY, deadline_s=60, poll_s=0.05) as c:
        yield c
    server.release()


def test_upscale_bytes_and_path(client: Client, tmp_path: Path) -> None:
    res = client.upscale(png(40), scale=2)
    assert (res.width, res.height) == (80, 80) and res.content_type == "image/png" and res.job_id is None
    assert Image.open(io.BytesIO(res.data)).size == (80, 80)
    src = tmp_path / "in.png"
    src.write_bytes(png(30, 20))
    out = client.upscale(src, width=90, format="jpeg").save(tmp_path / "out.jpg")
    assert Image.open(out).size == (90, 60) and Image.open(out).format == "JPEG"


def test_large_images_run_as_jobs_with_progress(
    client: Client, server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fixed rule (no /v1/models) with "large" made small for this test; the server's estimate
    # decides otherwise (tests/gendr_client/test_gendr_client_estimate.py).
    monkeypatch.setattr(gendr_client._estimate.ServerInfo, "parse", classmethod(lambda cls, body: None))
    monkeypatch.setattr(gendr_client._estimate, "JOB_OUTPUT_PIXELS", 100 * 100)
    seen: list[tuple[int, int]] = []
    server.hold(allow=2)
    box: dict[str, object] = {}
    t = threading.Thread(
        target=lambda: box.update(r=client.upscale(png(120), scale=1, on_progress=_add(seen)))
    )
    t.start()
    server.wait_for(lambda: any(d == 2 for d, _ in seen), "progress never showed 2 tiles done")
    assert all(d <= 2 for d, _ in seen)  # the gate let exactly two batches through
    server.release()
    t.join(30)
    res = box["r"]
    assert isinstance(res, gendr_client.Result) and res.job_id and (res.width, res.height) == (120, 120)
    total = seen[-1][1]
    assert total == res.tiles == 9 and seen[-1] == (total, total)
    gone = httpx.get(f"{server.url}/v1/jobs/{res.job_id}", headers={"Authorization": f"Bearer {KEY}"})
    assert gone.status_code == 404  # the client deleted it after fetching the result
    small = client.upscale(png(20), scale=1)
    assert small.job_id is None  # small work stays a plain request


def _add(seen: list[tuple[int, int]]):
    return lambda done, total: seen.append((done, total))


def test_overload_is_retried_after_retry_after(client: Client, server: LiveServer) -> None:
    server.hold()
    auth = {"Authorization": f"Bearer {KEY}"}
    big = threading.Thread(
        target=lambda: httpx.post(f"{server.url}/upscale?scale=1", content=png(200), headers=auth, timeout=60)
    )
    big.start()
    server.wait_for(lambda: server.metric("gendr_queue_depth_tiles") == 25, "the big request never queued")
    before = server.metric("gendr_request_errors_total", code="overloaded")
    box: dict[str, object] = {}
    t = threading.Thread(target=lambda: box.update(r=client.upscale(png(40), scale=1)))
    t.start()
    server.wait_for(
        lambda: server.metric("gendr_request_errors_total", code="overloaded") > before, "no 503 was seen"
    )
    assert "r" not in box  # still retrying
    server.release()
    t.join(60)
    big.join(60)
    res = box["r"]
    assert isinstance(res, gendr_client.Result) and res.width == 40


def test_deadline_while_overloaded_is_a_typed_error(server: LiveServer) -> None:
    server.hold()
    auth = {"Authorization": f"Bearer {KEY}"}
    big = threading.Thread(
        target=lambda: httpx.post(f"{server.url}/upscale?scale=1", content=png(200), headers=auth, timeout=60)
    )
    big.start()
    server.wait_for(lambda: server.metric("gendr_queue_depth_tiles") == 25, "the big request never queued")
    try:
        with (
            Client(server.url, api_key=KEY, deadline_s=2.0) as c,
            pytest.raises(gendr_client.DeadlineExceeded) as e,
        ):
            c.upscale(png(40), scale=1)
        assert isinstance(e.value.__cause__, gendr_client.Overloaded)
    finally:
        server.release()
        big.join(60)


def test_errors_are_typed_from_the_json_codes(client: Client, server: LiveServer) -> None:
    with pytest.raises(gendr_client.BadRequest, match="scale"):
        client.upscale(png(20), scale=100)
    with pytest.raises(gendr_client.ModelNotFound):
        client.upscale(png(20), model="nope")
    with pytest.raises(gendr_client.UnsupportedMediaType):
        client.upscale(b"this is not an image")
    with pytest.raises(gendr_client.UnsupportedMediaType):
        client.upscale(b"this is not an image", use_job=True)
    with Client(server.url, api_key="wrong") as bad, pytest.raises(gendr_client.Unauthorized) as e:
        bad.upscale(png(20))
    assert e.value.status == 401 and e.value.code == "unauthorized"


def test_async_folder_then_resume_skips_finished_files(server: LiveServer, tmp_path: Path) -> None:
    src, dst = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    for i, w in enumerate((24, 32, 40)):
        (src / f"p{i}.png").write_bytes(png(w))
    (src / "sub" / "deep.png").write_bytes(png(16))
    (src / "notes.txt").write_text("not an image")

    async def run() -> gendr_client.FolderReport:
        async with AsyncClient(server.url, api_key=KEY, deadline_s=60) as c:
            return await c.upscale_folder(src, dst, concurrency=3, progress=False, scale=2, format="webp")

    report = asyncio.run(run())
    assert report.ok and len(report.done) == 4 and not report.skipped
    assert Image.open(dst / "sub" / "deep.webp").size == (32, 32)
    assert Image.open(dst / "p2.webp").size == (80, 80)
    (dst / "p1.webp").unlink()
    with Client(server.url, api_key=KEY) as c:
        again = c.upscale_folder(src, dst, progress=False, scale=2, format="webp")
    assert again.done == [dst / "p1.webp"] and len(again.skipped) == 3


def test_fit_strength_and_metadata_reach_the_server(client: Client) -> None:
    res = client.upscale(
        png(60), width=120, height=60, fit="cover", strength=0.5, metadata="keep", format="png"
    )
    assert (res.width, res.height) == (120, 60)  # cover: the whole box, centred crop
    contain = client.upscale(png(60), width=120, height=60, format="png")
    assert (contain.width, contain.height) == (60, 60)  # contain, the default: inside the box
