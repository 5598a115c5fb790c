"""A real `gendr-serve` process on 127.0.0.1 (random free port) with the tiny model on ONNX Runtime CPU.

What only a real server shows: the CLI, uvicorn's socket behaviour for oversized bodies (413 and the
connection closed without reading the rest, with or without Content-Length), client disconnects
cancelling work, and SIGTERM draining every admitted request before the process exits (last test).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from http_helpers import decode, encode, small
from live_server import ServerProcess, free_port
from test_images import bomb_png

KEY = "test-key-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}
DRAIN_TIMEOUT_S = 20.0
MAX_BODY = 2 * 1024 * 1024
FAKE_PER_TILE_S = 0.05  # fake engine: 20 tiles/s, whatever the machine


Server = ServerProcess  # a real gendr-serve process (tests/live_server.py)


def _command() -> list[str]:
    exe = shutil.which("gendr-serve", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "service.cli"]


def _serve(tiny_repo: Path, log: Path, **extra: str) -> Iterator[Server]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENDR_")}
    env.update(
        {
            "GENDR_MODEL_REPOSITORY": str(tiny_repo),
            "GENDR_BACKEND": "onnxruntime-cpu",
            "GENDR_MAX_BATCH": "2",
            "GENDR_INTRA_OP_THREADS": "1",
            "GENDR_API_KEYS": f"{KEY},another-key",
            "GENDR_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
            "GENDR_MAX_BODY_BYTES": str(MAX_BODY),
            "GENDR_MAX_INPUT_PIXELS": "1000000",
            "GENDR_PORT": "tcp://10.0.0.1:8000",  # what Kubernetes injects for a Service named gendr
            "PYTHONUNBUFFERED": "1",
            **extra,
        }
    )
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*_command(), "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    srv = Server(proc, port, log)
    try:
        end = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{srv.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, log.read_text()
            time.sleep(0.1)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(DRAIN_TIMEOUT_S + 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The tiny model on ONNX Runtime CPU: what a deployment runs."""
    yield from _serve(tiny_repo, tmp_path_factory.mktemp("server") / "gendr-serve.log")


@pytest.fixture(scope="module")
def fake_server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The same server with the fake engine at FAKE_PER_TILE_S per tile: timing owned by the test."""
    yield from _serve(
        tiny_repo,
        tmp_path_factory.mktemp("fake-server") / "gendr-serve.log",
        GENDR_BACKEND="fake",
        GENDR_FAKE_PER_TILE_S=str(FAKE_PER_TILE_S),
    )


def _raw(
    port: int, head: bytes, chunks: list[bytes] | None = None, timeout: float = 5
) -> tuple[bytes, int, bool]:
    """Send a request head and then body chunks until the server answers; (response, bytes sent, closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        sent, resp = 0, b""
        s.settimeout(0.05)
        for chunk in chunks or []:
            try:
                s.sendall(chunk)
                sent += len(chunk)
            except OSError:  # the server closed the connection on us: fine
                break
            try:
                resp += s.recv(65536)
                if resp:
                    break
            except TimeoutError:
                pass
        s.settimeout(timeout)
        closed = False
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    closed = True
                    break
                resp += data
        except OSError:
            closed = True
        return resp, sent, closed


# --- endpoints ----------------------------------------------------------------------------------


def test_endpoints_of_a_real_server(server: Server) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").json()["ready"] is True
    models = httpx.get(f"{server.url}/v1/models").json()  # open, like health and metrics
    assert models["default"] == "tiny" and models["data"][0]["backend"] == "onnxruntime-cpu"
    assert "swagger" in httpx.get(f"{server.url}/docs").text.lower()
    assert "/v1/upscale" in httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert server.metric("gendr_ready") == 1
    r = httpx.get(f"{server.url}/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert "server" not in r.headers  # no version banner


def test_upscale_like_curl(server: Server) -> None:
    before = server.metric("gendr_requests_total", model="tiny", status="200")
    png = encode(small("astronaut.png", 48))
    r = httpx.post(
        f"{server.url}/upscale?scale=2", content=png, headers={**AUTH, "content-type": "image/png"}
    )
    assert r.status_code == 200, r.text
    assert decode(r.content).size == (96, 96) and r.headers["content-type"] == "image/png"
    assert r.headers["x-backend"] == "onnxruntime-cpu" and "compute;dur=" in r.headers["server-timing"]
    jpeg = encode(small("chelsea.png", 48).convert("RGB"), "JPEG", quality=90)
    r = httpx.post(
        f"{server.url}/upscale",
        headers=AUTH,
        files={"image": ("cat.jpg", jpeg, "image/jpeg")},
        data={"width": "72", "format": "webp"},
    )
    assert r.status_code == 200, r.text
    im = decode(r.content)
    assert im.format == "WEBP" and im.size == (72, 48)
    assert server.metric("gendr_requests_total", model="tiny", status="200") == before + 2
    assert server.metric("gendr_output_megapixels_total", model="tiny") > 0


def test_errors_of_a_real_server(server: Server) -> None:
    png = encode(small("astronaut.png", 32))
    u = f"{server.url}/upscale"
    cases = [
        (httpx.post(u, content=png), 401, "unauthorized"),
        (httpx.post(u, content=png, headers={"Authorization": "Bearer nope"}), 401, "unauthorized"),
        (httpx.post(f"{u}?scale=2&width=3", content=png, headers=AUTH), 400, "bad_request"),
        (httpx.post(f"{u}?model=missing", content=png, headers=AUTH), 404, "model_not_found"),
        (
            httpx.post(u, content=encode(small("coffee.png", 32), "GIF"), headers=AUTH),
            415,
            "unsupported_media_type",
        ),
        (httpx.post(u, content=png[: len(png) // 2], headers=AUTH), 422, "undecodable_image"),
        (httpx.post(u, content=bomb_png(40_000, 40_000), headers=AUTH), 413, "image_too_large"),
        (httpx.post(f"{u}?scale=4&deadline_ms=1", content=png, headers=AUTH), 504, "deadline_exceeded"),
    ]
    for r, status, code in cases:
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert server.metric("gendr_request_errors_total", code="unauthorized") >= 2


def test_oversized_body_with_content_length_is_refused_before_reading(server: Server) -> None:
    head = (
        f"POST /upscale HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {MAX_BODY + 1}\r\n\r\n"
    ).encode()
    resp, sent, closed = _raw(server.port, head)  # not one body byte sent
    assert resp.startswith(b"HTTP/1.1 413") and b"payload_too_large" in resp
    assert sent == 0 and closed


def test_oversized_chunked_body_is_refused_while_reading(server: Server) -> None:
    head = (
        f"POST /upscale HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: image/png\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"10000\r\n" + b"\0" * 0x10000 + b"\r\n"  # 64 KiB chunks, never a terminating chunk
    resp, sent, closed = _raw(server.port, head, [chunk] * 400)  # up to 26 MB offered
    assert resp.startswith(b"HTTP/1.1 413") and b"payload_too_large" in resp
    assert b"connection: close" in resp.lower()
    assert closed and sent < 4 * MAX_BODY  # stopped long before the client was done


def test_client_disconnect_cancels_the_work(fake_server: Server, tiny_repo: Path) -> None:
    from service.manifest import read_manifest
    from service.pixels.pipeline import make_plan

    server = fake_server
    before = server.metric("gendr_requests_total", model="tiny", status="499")
    tiles_before = server.metric("gendr_tiles_total", model="tiny")
    src = small("coffee.png", 160)  # ×4 → 640×424: >100 tiles, seconds of fake engine time
    geometry = read_manifest(tiny_repo / "tiny", verify=False).tile
    n_tiles = make_plan(src.height, src.width, src.height * 4, src.width * 4, geometry).n_tiles
    assert n_tiles * FAKE_PER_TILE_S > 2
    body = encode(src)
    head = (
        f"POST /upscale?scale=4 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(head + body)
    server.wait_metric("gendr_queue_depth_tiles", lambda v: v > 0, model="tiny")
    s.close()
    server.wait_metric("gendr_queue_depth_tiles", lambda v: v == 0, model="tiny", timeout=5)
    server.wait_metric("gendr_requests_total", lambda v: v == before + 1, model="tiny", status="499")
    computed = server.metric("gendr_tiles_total", model="tiny") - tiles_before
    assert computed < n_tiles / 2, (computed, n_tiles)  # the rest was dropped, never computed


def test_runtime_start_failure_exits_non_zero(tiny_repo: Path, tmp_path: Path) -> None:
    """An artifact whose sha256 no longer matches: /healthz fails and the process exits 1."""
    repo = tmp_path / "models"
    shutil.copytree(tiny_repo / "tiny", repo / "tiny", ignore=shutil.ignore_patterns("checkpoint"))
    graph = next((repo / "tiny" / "onnx").rglob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-16] + b"\0" * 16)  # same size, different hash
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENDR_")}
    env.update({"GENDR_MODEL_REPOSITORY": str(repo), "GENDR_BACKEND": "onnxruntime-cpu"})
    r = subprocess.run(
        [*_command(), "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1, r.stderr
    assert "sha256" in r.stderr and "runtime start failed" in r.stderr


# --- last: SIGTERM drain (stops the module's server) ---------------------------------------------


def test_sigterm_drains_admitted_requests_then_exits(fake_server: Server) -> None:
    server = fake_server
    n = 4
    body = encode(small("astronaut.png", 64))  # ×3 → 192²: 16 tiles each, 0.8 s of fake engine time
    results: list[int] = []

    def call() -> None:
        r = httpx.post(f"{server.url}/upscale?scale=3", content=body, headers=AUTH, timeout=60)
        results.append(r.status_code)

    threads = [threading.Thread(target=call) for _ in range(n)]
    for t in threads:
        t.start()
    server.wait_metric("gendr_queue_depth_requests", lambda v: v == n, model="tiny")  # all admitted
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    ready = httpx.get(f"{server.url}/readyz")
    late = httpx.post(f"{server.url}/upscale?scale=2", content=body, headers=AUTH)
    for t in threads:
        t.join(60)
    rc = server.proc.wait(DRAIN_TIMEOUT_S + 5)
    elapsed = time.monotonic() - t0
    assert results == [200] * n  # no admitted request lost
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
    assert int(late.headers["retry-after"]) >= 1
    assert rc == 0 and elapsed < DRAIN_TIMEOUT_S
    log = server.log.read_text()
    assert "drain complete" in log and "Traceback" not in log
