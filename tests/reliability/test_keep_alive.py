"""An idle kept-alive connection lives for `GENDR_KEEP_ALIVE_TIMEOUT_S` (above common load balancers' idle
timeouts), not for the header timeout: that one times a request's head from its first byte. Otherwise a
load balancer reusing a connection the server just closed answers its client 502."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_helpers import ServerProcess, start_server, status_of

REQ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
HEADER_TIMEOUT_S, KEEP_ALIVE_S = 1.0, 4.0


@pytest.fixture(scope="module")
def server(fake_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("keep-alive") / "server.log"
    srv = start_server(fake_repo, log, header_timeout_s=HEADER_TIMEOUT_S, keep_alive_timeout_s=KEEP_ALIVE_S)
    yield srv
    srv.stop()


def _answer(s: socket.socket) -> bytes:
    data = b""
    while b'{"status":"ok"}' not in data:
        chunk = s.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    return data


def test_an_idle_connection_outlives_the_header_timeout_then_closes_at_keep_alive(
    server: ServerProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(REQ)
        assert status_of(_answer(s)) == 200
        time.sleep(HEADER_TIMEOUT_S * 2.5)  # idle: past the header timeout, within keep-alive
        s.sendall(REQ)
        assert status_of(_answer(s)) == 200  # the same connection still serves
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed silently, by the keep-alive timeout
        assert time.monotonic() - t0 >= KEEP_ALIVE_S * 0.9
