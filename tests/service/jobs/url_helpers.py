"""Real loopback servers for the job-URL and webhook tests, and a tripwire against outside traffic.

`Server` is a threading http.server on 127.0.0.1 whose answers a test scripts per request; `AcceptCounter`
is a listening socket that only counts connections (the proof that a refused URL never connected);
`no_outside_connections` makes any connect() to a non-loopback address fail loudly, so a refusal path
that forgot to refuse can never send traffic out of the sandbox.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] | None = None  # sent chunked, one write each
    delay_s: float = 0.0  # before the status line (cut short when the server stops)
    chunk_delay_s: float = 0.0
    declared_length: int | None = None  # a Content-Length that differs from the body


Handler = Callable[[Seen, int], Reply]  # (request, 0-based index of this request) -> reply


class Server:
    """An HTTP(S) server on 127.0.0.1 and a free port; `handler` scripts each answer."""

    def __init__(self, handler: Handler | Reply, tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[Seen] = []
        self.sni: list[str | None] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        script = handler if callable(handler) else (lambda _req, _i, r=handler: r)
        outer = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

            def _serve(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                req = Seen(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(n) if n else b"",
                )
                with outer._lock:
                    index = len(outer.seen)
                    outer.seen.append(req)
                reply = script(req, index)
                if reply.delay_s and outer._stop.wait(reply.delay_s):
                    return
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("Connection", "close")
                if reply.chunks is not None:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for c in reply.chunks:
                        if reply.chunk_delay_s and outer._stop.wait(reply.chunk_delay_s):
                            return
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    return
                length = reply.declared_length if reply.declared_length is not None else len(reply.body)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(reply.body)

            def _safe(self) -> None:
                try:
                    self._serve()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on purpose (a cap or a time limit)

            do_GET = do_PUT = do_POST = do_HEAD = _safe

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _H)
        self.httpd.daemon_threads = True
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)  # type: ignore[assignment]
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


class AcceptCounter:
    """A listening loopback socket that counts the connections made to it (and drops them)."""

    def __init__(self) -> None:
        self.accepts = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepts += 1
            conn.close()

    def __enter__(self) -> AcceptCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def _is_loopback(address: object) -> bool:
    if not isinstance(address, tuple):
        return True  # a Unix socket path
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


@contextmanager
def no_outside_connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Every connect() to a non-loopback address raises (and is listed): the sandbox must see none."""
    attempts: list[object] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self: socket.socket, address: Any) -> None:
        if not _is_loopback(address):
            attempts.append(address)
            raise OSError(f"test tripwire: connection to {address!r} blocked")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if not _is_loopback(address):
            attempts.append(address)
            raise OSError(f"test tripwire: connection to {address!r} blocked")
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield attempts


def table_resolver(table: dict[str, list[str]]) -> Callable[[str, int], Any]:
    """A resolver hook: names in `table` resolve to the listed addresses, any other name fails."""

    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "not in the test's table")
        return list(table[host])

    return resolve
