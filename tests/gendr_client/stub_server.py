"""A scripted gendr-serve on loopback for the client's tests: a real HTTP server (http.server on a real
socket) that records every request and can drop a connection after reading a request, answer 503 with
Retry-After, forget a job, or answer POST /upscale late, exactly when the test says. GET /v1/models
answers `Stub.models` (404 when None), so a test sets the server's estimate the client works from.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

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
    models: dict[str, Any] | None = None  # the GET /v1/models body (None: 404, an older server)
    model_gets: int = 0
    upscale_delay_s: float = 0.0  # POST /upscale answers after this long (the server computing)

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

        def _upscale(self) -> None:
            with stub.lock:
                stub.seen.append(Seen("POST", self.path, dict(self.headers)))
            time.sleep(stub.upscale_delay_s)
            with contextlib.suppress(OSError):  # a client that gave up waiting has gone
                self._answer(200, PNG, "image/png", X_Image_Size="8x6", X_Model="fake", X_Tiles="1")

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.startswith("/upscale"):
                self._upscale()
                return
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
            if self.path == "/v1/models":
                with stub.lock:
                    stub.model_gets += 1
                if stub.models is None:
                    self._error(404, "not_found")
                else:
                    self._answer(200, json.dumps(stub.models).encode())
                return
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


@contextlib.contextmanager
def serve() -> Iterator[Stub]:
    """The stub on a free loopback port until the block ends."""
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
