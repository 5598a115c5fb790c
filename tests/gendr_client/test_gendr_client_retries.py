"""The client's retry rules over real HTTP: Idempotency-Key on every try, Retry-After, polls through
dropped connections and 503s, no DELETE because of a 404.

The claims are about what the client sends, so the server is a small scripted HTTP server on loopback
(http.server on a real socket) that records every request and can drop a connection after reading the
request, answer 503 with Retry-After, or forget a job, exactly when the test says. Waits go through
an injected sleep that records them, so Retry-After is checked without waiting it.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

import gendr_client
from gendr_client import AsyncClient, Client

RESULT = io.BytesIO()
Image.new("RGB", (8, 6), (200, 10, 10)).save(RESULT, format="PNG")
PNG = RESULT.getvalue()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Stub:
    """A job API in memory. `script[route]` lists what the next requests to a route get ("drop",
    ("503", retry_after_s), "404", ("failed", code), "hang"); an empty list means the normal answer.
    Routes: "submit", "poll", "result"."""

    script: dict[str, list[Any]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # Idempotency-Key → job id
    polls: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def next(self, route: str) -> Any:
        todo = self.script.get(route) or []
        return todo.pop(0) if todo else "ok"

    def posts(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST"]

    def deletes(self) -> list[str]:
        return [s.path for s in self.seen if s.method == "DELETE"]


def _handler(stub: Stub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, status: int, body: bytes, ctype: str = "application/json", **hdr: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in hdr.items():
                self.send_header(k.replace("_", "-"), v)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, code: str, **hdr: str) -> None:
            self._answer(status, json.dumps({"error": {"code": code, "message": code}}).encode(), **hdr)

        def _drop(self) -> None:
            """The request was read (and acted on) but no answer comes back: a replica that died."""
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        def _job(self, job_id: str) -> dict[str, Any]:
            n = stub.polls.get(job_id, 0)
            done = n >= 2
            return {
                "id": job_id,
                "state": "succeeded" if done else ("running" if n else "queued"),
                "tiles": {"done": 2 if done else n, "total": 2},
                "queue_position": 0,
                "result_url": f"/v1/jobs/{job_id}/result",
                "error": None,
            }

        def _act(self, action: Any) -> bool:
            """Apply a scripted failure; False when the normal answer should follow."""
            if action == "drop":
                self._drop()
            elif isinstance(action, tuple) and action[0] == "503":
                self._error(503, "job_store_unavailable", Retry_After=str(action[1]))
            else:
                return False
            return True

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            key = self.headers.get("Idempotency-Key", "")
            with stub.lock:
                stub.seen.append(Seen("POST", self.path, dict(self.headers)))
                action = stub.next("submit")
                if isinstance(action, tuple) and action[0] == "503":
                    self._act(action)  # refused before anything was stored
                    return
                known = stub.keys.get(key)
                job_id = known or uuid.uuid4().hex
                if not known:
                    stub.jobs[job_id] = {"state": "queued"}
                    stub.keys[key] = job_id
                if self._act(action):  # "drop": the job exists, the answer is lost
                    return
                body = json.dumps(self._job(job_id)).encode()
            self._answer(200 if known else 202, body, Location=f"/v1/jobs/{job_id}")

        def do_GET(self) -> None:
            parts = self.path.strip("/").split("/")  # v1 jobs ID [result]
            job_id, result = parts[2], len(parts) == 4
            with stub.lock:
                stub.seen.append(Seen("GET", self.path, dict(self.headers)))
                action = stub.next("result" if result else "poll")
                if self._act(action):
                    return
                if job_id not in stub.jobs or action == "404":
                    stub.jobs.pop(job_id, None)  # truly gone, its key with it
                    stub.keys = {k: v for k, v in stub.keys.items() if v != job_id}
                    self._error(404, "job_not_found")
                    return
                if result:
                    self._answer(200, PNG, "image/png", X_Image_Size="8x6", X_Model="fake", X_Tiles="2")
                    return
                if isinstance(action, tuple) and action[0] == "failed":
                    err = {"code": action[1], "message": action[1]}
                    job = self._job(job_id) | {"state": "failed", "error": err}
                    stub.jobs.pop(job_id)
                elif action == "hang":
                    job = self._job(job_id) | {"state": "running"}
                else:
                    stub.polls[job_id] = stub.polls.get(job_id, 0) + 1
                    job = self._job(job_id)
                body = json.dumps(job).encode()
            self._answer(200, body)

        def do_DELETE(self) -> None:
            with stub.lock:
                stub.seen.append(Seen("DELETE", self.path, dict(self.headers)))
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@pytest.fixture
def stub() -> Iterator[Stub]:
    s = Stub()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(s))
    httpd.daemon_threads = True
    s.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield s
    finally:
        httpd.shutdown()
        httpd.server_close()


def upscale(kind: str, stub: Stub, sleeps: list[float], **kw: Any) -> gendr_client.Result:
    """One job through the sync or the async client, every wait recorded instead of slept."""
    kw = {"use_job": True, "scale": 1, **kw}
    deadline = kw.pop("deadline_s", 60.0)
    if kind == "sync":
        with Client(stub.url, deadline_s=deadline, poll_s=0.01, sleep=sleeps.append) as c:
            return c.upscale(PNG, **kw)

    async def record(s: float) -> None:
        sleeps.append(s)

    async def run() -> gendr_client.Result:
        async with AsyncClient(stub.url, deadline_s=deadline, poll_s=0.01, sleep=record) as c:
            return await c.upscale(PNG, **kw)

    return asyncio.run(run())


KINDS = pytest.mark.parametrize("kind", ["sync", "async"])


@KINDS
def test_a_lost_answer_and_a_503_are_retried_with_the_same_key(kind: str, stub: Stub) -> None:
    """The first POST is acted on but its answer lost, the second is refused with Retry-After: 7; the
    third, with the same key, gets the job the first one made: one job, not two."""
    stub.script["submit"] = ["drop", ("503", 7)]
    sleeps: list[float] = []
    res = upscale(kind, stub, sleeps)
    keys = [p.headers.get("Idempotency-Key") for p in stub.posts()]
    assert len(keys) == 3 and len(set(keys)) == 1 and uuid.UUID(str(keys[0])).version == 4
    assert len(stub.keys) == 1 and res.job_id == stub.keys[keys[0]]  # the job of the first POST
    assert (res.width, res.height, res.data) == (8, 6, PNG)
    assert any(7.0 <= s <= 7.0 * 1.5 for s in sleeps), sleeps  # Retry-After honoured, jitter ≤ 50 %
    assert stub.deletes() == [f"/v1/jobs/{res.job_id}"]  # only the finished job, after its result


@KINDS
def test_polls_ride_out_errors_and_a_404_resubmits_without_a_delete(kind: str, stub: Stub) -> None:
    """Polls: a dropped connection and a 503 are asked again (no resubmission); then the job is gone
    (404): submitted again with the same key, and the lost job is never DELETEd."""
    stub.script["poll"] = ["drop", ("503", 3), "404"]
    sleeps: list[float] = []
    res = upscale(kind, stub, sleeps, idempotency_key="photo-42")
    posts = stub.posts()
    assert [p.headers.get("Idempotency-Key") for p in posts] == ["photo-42", "photo-42"]
    polls = [s.path for s in stub.seen if s.method == "GET" and not s.path.endswith("/result")]
    lost = polls[0]
    assert polls[:3] == [lost] * 3 and res.job_id and lost != f"/v1/jobs/{res.job_id}"
    assert lost not in stub.deletes() and stub.deletes() == [f"/v1/jobs/{res.job_id}"]
    assert any(3.0 <= s <= 4.5 for s in sleeps), sleeps


@KINDS
def test_a_job_lost_by_the_service_is_resubmitted_with_a_new_key(kind: str, stub: Stub) -> None:
    """`job_lost` (and `draining`, `interrupted`) finished that job: the image is a new submission."""
    stub.script["poll"] = [("failed", "job_lost"), ("failed", "draining")]
    res = upscale(kind, stub, [])
    keys = [p.headers.get("Idempotency-Key") for p in stub.posts()]
    assert len(keys) == 3 and len(set(keys)) == 3
    assert stub.deletes() == [f"/v1/jobs/{res.job_id}"]


def test_resubmissions_are_bounded_and_other_failures_are_not_retried(stub: Stub) -> None:
    stub.script["poll"] = ["404"] * 10
    with pytest.raises(gendr_client.JobNotFound, match="resubmission"):
        upscale("sync", stub, [])
    assert len(stub.posts()) == 4 and not stub.deletes()  # the first try and 3 more

    stub.seen.clear()
    stub.script["poll"] = [("failed", "engine_failure")]
    with pytest.raises(gendr_client.EngineFailure):
        upscale("sync", stub, [])
    assert len(stub.posts()) == 1 and not stub.deletes()


def test_a_caller_that_gives_up_deletes_its_job(stub: Stub) -> None:
    """The deadline passing is the caller giving up: the unfinished job is cancelled (DELETE)."""
    stub.script["poll"] = ["hang"] * 1000
    with pytest.raises(gendr_client.DeadlineExceeded):
        with Client(stub.url, deadline_s=0.3, poll_s=0.02) as c:
            c.upscale(PNG, use_job=True)
    job = stub.posts() and stub.keys[str(stub.posts()[0].headers.get("Idempotency-Key"))]
    assert stub.deletes() == [f"/v1/jobs/{job}"]


def test_a_bad_idempotency_key_is_refused_before_sending(stub: Stub) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        upscale("sync", stub, [], idempotency_key="é")
    assert not stub.seen
