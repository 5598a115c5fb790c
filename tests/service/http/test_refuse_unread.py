"""A refused request costs almost nothing: with the model's backlog at capacity, a real server answers
503 before reading the body (a client that sends only the headers gets it at once), drops the body as
it arrives without parsing it, and closes the connection cleanly (no reset, so a client still sending
reads its 503)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, live_server, photo_png

from service.http.lifecycle import LINGER_S


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server whose backlog (capacity 1 tile unit) is held full by one request its engine never runs."""
    with live_server(tmp_path_factory.mktemp("refuse"), GENDR_QUEUE_CAPACITY_TILES="1") as srv:
        srv.hold(0)
        holder = threading.Thread(
            target=lambda: httpx.post(f"{srv.url}/upscale", content=photo_png(64), timeout=60), daemon=True
        )
        holder.start()
        srv.wait_metric("gendr_queue_depth_tiles", lambda v: v >= 1, model="fake")
        yield srv
        srv.release()
        holder.join(30)


def test_headers_only_client_gets_503_at_once_and_a_clean_close(full: LiveServer) -> None:
    probes = full.metric("gendr_host_cpu_seconds_total", stage="probe")
    read = full.metric("gendr_request_body_bytes_total")
    head = b"POST /upscale HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", full.port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(head)  # and never a byte of the body
        resp = b""
        while b"\r\n\r\n" not in resp or not resp.rstrip().endswith(b"}"):
            resp += s.recv(65536)
        answered = time.monotonic() - t0
        rest = s.recv(65536)  # blocks until the server closes: an EOF, not a reset
        closed = time.monotonic() - t0
    assert resp.startswith(b"HTTP/1.1 503") and b'"overloaded"' in resp, resp
    assert b"connection: close" in resp.lower() and b"retry-after:" in resp.lower()
    assert answered < LINGER_S / 2, answered  # not after waiting for the body
    assert rest == b"" and LINGER_S * 0.5 < closed < LINGER_S + 5, closed
    assert full.metric("gendr_request_body_bytes_total") == read  # nothing was read as an upload
    assert full.metric("gendr_host_cpu_seconds_total", stage="probe") == probes  # nor probed


def test_a_client_sending_its_whole_body_reads_the_503(full: LiveServer) -> None:
    body = photo_png(400)  # hundreds of KB: more than the socket buffers hold while nobody reads
    before = full.metric("gendr_requests_total", model="fake", status="503")
    for _ in range(3):
        r = httpx.post(f"{full.url}/upscale", content=body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert r.headers["connection"] == "close" and int(r.headers["retry-after"]) >= 1
    assert full.metric("gendr_requests_total", model="fake", status="503") == before + 3


def test_a_named_model_is_refused_unread_too_and_an_unknown_one_is_404(full: LiveServer) -> None:
    r = httpx.post(f"{full.url}/upscale?model=fake", content=b"not even an image", timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    r = httpx.post(f"{full.url}/upscale?model=other", content=b"x", timeout=10)
    assert r.status_code == 404


def test_nothing_is_refused_unread_below_capacity(tmp_path: Path) -> None:
    with live_server(tmp_path, GENDR_QUEUE_CAPACITY_TILES="64") as srv:
        r = httpx.post(f"{srv.url}/upscale", content=b"not an image", timeout=10)
        assert r.status_code == 415  # read and probed: the body decides
