"""A real S3-compatible HTTP server for the push / pull tests (moto's server mode on 127.0.0.1), and a
small HTTP proxy in front of it that cuts object downloads mid-body, as a dropped connection would.
(A uniquely named module: tests/ has no packages.)"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's ThreadedMotoServer (werkzeug, real HTTP) on a free loopback port: its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@dataclass
class CuttingProxy:
    """Forwards every request to `upstream`; a GET of a blob (`/blobs/` in the path) while `cuts` > 0 is
    answered with the full headers but only `keep` bytes of the body, then the connection is closed (or,
    with `stall`, held open silently: a download that never ends, for killing the puller)."""

    upstream: str
    keep: int = 100
    cuts: int = 0
    stall: bool = False
    seen_ranges: list[str] = field(default_factory=list)
    cut_done: threading.Event = field(default_factory=threading.Event)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CuttingProxy:
        proxy = self
        host, port = self.upstream.removeprefix("http://").split(":")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if self.command == "GET" and "/blobs/" in self.path:
                    if self.headers.get("Range"):
                        proxy.seen_ranges.append(self.headers["Range"])
                    if proxy.cuts > 0 and len(data) > proxy.keep:
                        proxy.cuts -= 1
                        self._send_head(resp)
                        self.wfile.write(data[: proxy.keep])
                        self.wfile.flush()
                        proxy.cut_done.set()
                        if proxy.stall:
                            time.sleep(60)
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                self._send_head(resp)
                self.wfile.write(data)

            def _send_head(self, resp: http.client.HTTPResponse) -> None:
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "server", "date"):
                        self.send_header(k, v)
                self.end_headers()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
