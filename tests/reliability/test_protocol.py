"""Hole 8, against a real server process: requests that never reach the app get the documented JSON
answers (docs/http.md, "Before the app"), and slow or hoarding clients cannot starve the others."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from reliability_helpers import ServerProcess, encode, json_body, noise, raw_exchange, start_server, status_of

HEADER_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 12
MAX_HEADER_BYTES = 8192


@pytest.fixture(scope="module")
def server(fake_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(
        fake_repo,
        tmp_path_factory.mktemp("proto") / "server.log",
        header_timeout_s=HEADER_TIMEOUT_S,
        keep_alive_timeout_s=HEADER_TIMEOUT_S,
        max_connections=MAX_CONNECTIONS,
        max_header_bytes=MAX_HEADER_BYTES,
    )
    yield srv
    srv.stop()


POST = b"POST /upscale HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
MALFORMED = [
    ("bad Content-Length", POST + b"Content-Length: 12abc\r\n\r\n", 400, "bad_request"),
    (
        "two Content-Lengths",
        POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        400,
        "bad_request",
    ),
    ("bad chunk size", POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n", 400, "bad_request"),
    ("header without colon", b"GET /healthz HTTP/1.1\r\nHost: x\r\nnonsense\r\n\r\n", 400, "bad_request"),
    ("bad method", b"G(T /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    (
        "100 KB request line",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        431,
        "header_too_large",
    ),
    (
        "header block",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * 20_000 + b"\r\n\r\n",
        431,
        "header_too_large",
    ),
    (
        "many headers",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-B: c\r\n" * 2000 + b"\r\n",
        431,
        "header_too_large",
    ),
]


@pytest.mark.parametrize(("name", "data", "status", "code"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_json_and_a_closed_connection(
    server: ServerProcess, name: str, data: bytes, status: int, code: str
) -> None:
    resp, closed = raw_exchange(server.port, data)
    assert status_of(resp) == status, (name, resp[:300])
    assert json_body(resp)["error"]["code"] == code  # type: ignore[index]
    rid = json_body(resp)["error"]["request_id"]  # type: ignore[index]
    assert len(rid) == 32 and f"x-request-id: {rid}".encode() in resp.lower()  # the log names it too
    assert closed


def test_slowloris_gets_408_and_others_are_served(server: ServerProcess) -> None:
    """Heads trickled a byte at a time: each is cut at the header timeout; meanwhile requests succeed."""
    n = MAX_CONNECTIONS // 2
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 200
    results: list[tuple[int, float]] = []

    def trickle() -> None:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=HEADER_TIMEOUT_S + 5) as s:
            resp = b""
            try:
                for b in head:
                    s.sendall(bytes([b]))
                    time.sleep(0.05)
                    if time.monotonic() - t0 > HEADER_TIMEOUT_S + 4:
                        break
            except OSError:
                pass
            try:
                while chunk := s.recv(4096):
                    resp += chunk
            except OSError:
                pass
            results.append((status_of(resp), time.monotonic() - t0))

    threads = [threading.Thread(target=trickle) for _ in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    body = encode(noise(16, 16))
    for _ in range(5):
        r = httpx.post(f"{server.url}/upscale?scale=2", content=body, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
    for t in threads:
        t.join(HEADER_TIMEOUT_S + 10)
    assert len(results) == n
    for status, elapsed in results:
        assert status == 408, results
        assert HEADER_TIMEOUT_S * 0.9 <= elapsed < HEADER_TIMEOUT_S + 3, results


def test_connection_limit_answers_json_503_then_recovers(server: ServerProcess) -> None:
    hoard = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # the server has accepted them (the header timeout is 1 s)
        ask = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: trace-42\r\n\r\n"
        resp, closed = raw_exchange(server.port, ask)
        assert status_of(resp) == 503, resp[:300]
        assert json_body(resp)["error"]["code"] == "overloaded"  # type: ignore[index]
        assert json_body(resp)["error"]["request_id"] == "trace-42"  # type: ignore[index]
        assert b"retry-after: " in resp.lower() and closed
    finally:
        for s in hoard:
            s.close()
    end = time.monotonic() + 5
    while httpx.get(f"{server.url}/healthz").status_code != 200:
        assert time.monotonic() < end
        time.sleep(0.05)


def test_idle_keep_alive_connection_is_closed_silently(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=HEADER_TIMEOUT_S + 5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        t0, data = time.monotonic(), b""
        while chunk := s.recv(65536):
            data += chunk
        assert status_of(data) == 200 and data.count(b"HTTP/1.1 ") == 1, data  # no stray 408
        assert time.monotonic() - t0 >= HEADER_TIMEOUT_S * 0.9  # closed by the keep-alive timeout
