"""uvicorn's h11 protocol with the answers the service documents for requests that never reach the app.

uvicorn answers protocol errors with a plain-text 400 and an exceeded `limit_concurrency` with a
plain-text 503, and has no bound on how long a request head may take to arrive (bytes trickled one
at a time keep a connection forever: slowloris). This subclass keeps uvicorn's parsing and only
changes the edges (docs/http.md, "Before the app"):

- malformed request line, headers, Content-Length or chunk size → 400 `bad_request` (JSON, closed);
- request line + headers over `max_header_bytes` (h11's incomplete-event limit) → 431 `header_too_large`;
- a head not complete within `header_timeout_s` → 408 `request_timeout` (idle keep-alive connections
  are closed silently after `keep_alive_timeout_s`, as uvicorn does);
- more than `max_connections` open connections → their requests get 503 `overloaded` + Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import BadRequest, HeaderTooLarge, Overloaded, RequestTimeout, ServiceError
from service.http.lifecycle import REQUEST_ID_PATTERN


def _with_id(err: ServiceError, request_id: str) -> bytes:
    """The error body with its request id, like every error the app answers (docs/http.md)."""
    body = err.body()
    body["error"]["request_id"] = request_id  # type: ignore[index]
    return json.dumps(body).encode()


def error_bytes(err: ServiceError, extra: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 JSON error response that closes the connection. The request never reached
    the app, so it gets a fresh request id here, logged with the refusal so the two can be matched."""
    rid = uuid.uuid4().hex
    logging.getLogger("gendr.http").info("%d %s before the app (request id %s)", err.status, err.code, rid)
    body = _with_id(err, rid)
    headers = {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "x-request-id": rid,
        "connection": "close",
    }
    headers.update(extra or {})
    head = f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    return head.encode("latin-1") + b"\r\n" + body


class GendrH11Protocol(H11Protocol):
    """Configured through class attributes by `protocol_class()` (uvicorn instantiates it itself)."""

    header_timeout_s: float = 10.0
    retry_after_s: float = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_connections = self.limit_concurrency
        self.limit_concurrency = None  # uvicorn's own check answers in plain text: ours is in _gate
        self._app = self.app
        self.app = self._gate
        self._header_timer: asyncio.TimerHandle | None = None
        self._last_error: h11.RemoteProtocolError | None = None
        next_event = self.conn.next_event

        def watched_next_event() -> Any:
            try:
                event = next_event()
            except h11.RemoteProtocolError as e:
                self._last_error = e
                raise
            if isinstance(event, h11.Request):
                self._stop_header_timer()
                self._check_head_size(event)
            return event

        self.conn.next_event = watched_next_event  # type: ignore[method-assign]

    def _check_head_size(self, event: h11.Request) -> None:
        """h11 bounds only a head that is still incomplete; one that arrived whole is measured here."""
        limit = self.config.h11_max_incomplete_event_size
        size = len(event.method) + len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if limit is not None and size > limit:
            self._last_error = h11.RemoteProtocolError("request head too large", error_status_hint=431)
            raise self._last_error

    # --- header timeout -------------------------------------------------------------------------

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        if self.conn.trailing_data[0]:  # part of a head arrived, never the rest
            self.logger.info("request head not complete after %.1f s: 408", self.header_timeout_s)
            self.transport.write(error_bytes(RequestTimeout("the request head took too long to arrive")))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # The next request on a kept-alive connection: its head's time starts with its first byte. An idle
        # connection is uvicorn's keep-alive timeout's to close (keep_alive_timeout_s), not ours.
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._start_header_timer()
        super().data_received(data)

    # --- protocol errors ------------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        self._stop_header_timer()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # mid-body (bad chunk): the app sees a disconnect
            if self.cycle.response_started:
                self.transport.close()
                return
        e = self._last_error
        detail = str(e)[:200] if e is not None else msg
        if e is not None and e.error_status_hint == 431:
            err: ServiceError = HeaderTooLarge(
                f"the request line and headers exceed {self.config.h11_max_incomplete_event_size} bytes"
            )
        else:
            err = BadRequest(f"malformed HTTP request: {detail}")
        self.transport.write(error_bytes(err))
        self.transport.close()

    # --- connection limit -----------------------------------------------------------------------

    async def _gate(self, scope: Any, receive: Any, send: Any) -> None:
        limit = self._max_connections
        if limit is not None and (len(self.connections) > limit or len(self.tasks) > limit):
            self.logger.warning("more than %d connections: 503", limit)
            err = Overloaded(f"the server holds more than {limit} connections; retry shortly")
            sent = dict(scope.get("headers", ())).get(b"x-request-id", b"").decode("latin-1")
            rid = sent if REQUEST_ID_PATTERN.match(sent) else uuid.uuid4().hex
            body = _with_id(err, rid)
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", rid.encode()),
                (b"retry-after", str(max(1, math.ceil(self.retry_after_s))).encode()),
                (b"connection", b"close"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self._app(scope, receive, send)


def protocol_class(header_timeout_s: float, retry_after_s: float) -> type[GendrH11Protocol]:
    """A GendrH11Protocol subclass carrying this server's settings (uvicorn builds one per connection)."""
    return type(
        "ConfiguredGendrH11Protocol",
        (GendrH11Protocol,),
        {"header_timeout_s": header_timeout_s, "retry_after_s": retry_after_s},
    )
