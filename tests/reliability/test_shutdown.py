"""Holes 4 and 5, against real processes with the fake engine's delay set by the test (GENDR_FAKE_DELAY_S):
SIGTERM ends the process within the drain timeout plus a fixed margin whatever an engine call does;
requests cut off get JSON 503 `draining` (or a closed connection), never a 500; admitted requests that
can finish in time all finish."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import httpx
from reliability_helpers import encode, json_body, noise, start_server, status_of

from service.cli import FORCE_EXIT_MARGIN_S

BODY = encode(noise(16, 16))  # ×2 → 32×32: one tile of the fake model


def _post(url: str, out: list[object]) -> None:
    try:
        r = httpx.post(
            f"{url}/upscale?scale=2", content=BODY, headers={"content-type": "image/png"}, timeout=90
        )
        out.append((r.status_code, r.headers.get("content-type"), r.text))
    except httpx.TransportError as e:  # a closed connection is an accepted answer
        out.append(("closed", None, repr(e)))


def _slow_upload(port: int, out: list[object]) -> None:
    """Sends a head and then a body one byte every 50 ms: still uploading when the drain ends."""
    head = (
        f"POST /upscale?scale=2 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        resp = b""
        s.settimeout(0.05)
        for b in BODY:
            try:
                s.sendall(bytes([b]))
                resp += s.recv(65536)
                if resp:
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        s.settimeout(30)
        try:
            while chunk := s.recv(65536):
                resp += chunk
        except OSError:
            pass
    out.append(resp)


def test_stuck_engine_call_cannot_stretch_the_shutdown(fake_repo: Path, tmp_path: Path) -> None:
    drain = 3.0
    srv = start_server(fake_repo, tmp_path / "server.log", delay_s=60, drain_timeout_s=drain)
    try:
        stuck: list[object] = []
        uploads: list[object] = []
        threads = [
            threading.Thread(target=_post, args=(srv.url, stuck)),
            threading.Thread(target=_slow_upload, args=(srv.port, uploads)),
        ]
        for t in threads:
            t.start()
        srv.wait_metric("gendr_queue_depth_requests", lambda v: v == 1)  # in the 60 s engine call
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(drain + 30)
        elapsed = time.monotonic() - t0
        for t in threads:
            t.join(30)
    finally:
        srv.proc.kill()
    log = srv.log.read_text()
    assert elapsed < drain + FORCE_EXIT_MARGIN_S + 1.0, (elapsed, log)
    status, ctype, text = stuck[0]  # type: ignore[misc]
    assert status in (503, "closed"), (status, text)
    if status == 503:
        assert ctype == "application/json" and '"draining"' in text
    resp = uploads[0]
    assert isinstance(resp, bytes)
    if resp:  # else: closed without an answer, also accepted
        assert status_of(resp) == 503 and json_body(resp)["error"]["code"] == "draining", resp[:300]  # type: ignore[index]
    assert "Exception in ASGI application" not in log and "Internal Server Error" not in log


def test_sigterm_loses_no_admitted_request(fake_repo: Path, tmp_path: Path) -> None:
    n, delay = 6, 0.4
    srv = start_server(fake_repo, tmp_path / "server.log", delay_s=delay, drain_timeout_s=30, max_batch=1)
    try:
        results: list[object] = []
        threads = [threading.Thread(target=_post, args=(srv.url, results)) for _ in range(n)]
        for t in threads:
            t.start()
        srv.wait_metric("gendr_queue_depth_requests", lambda v: v == n)  # all admitted, ~n × delay of work
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        late = httpx.post(f"{srv.url}/upscale", content=BODY, headers={"content-type": "image/png"})
        for t in threads:
            t.join(60)
        rc = srv.proc.wait(30)
    finally:
        srv.proc.kill()
    assert [r[0] for r in results] == [200] * n, results  # type: ignore[index]
    assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
    assert rc == 0
    assert "drain complete" in srv.log.read_text()
