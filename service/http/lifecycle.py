"""Process lifecycle of one app: readiness, drain, cut-off at shutdown, and per-request accounting.

`GendrState.drain()` is the graceful stop (not ready, stop admitting, wait for in-flight requests);
`cut_off()` answers what is still running when the drain budget is spent; `RequestContext` is the
ASGI middleware that counts requests and turns any request cut off at shutdown into JSON 503
`draining` instead of the server's plain-text 500 (docs/http.md, "Shutdown").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Draining
from service.http.auth import ApiKeys
from service.http.quotas import Quotas
from service.manifest import ManifestError
from service.metrics import Metrics
from service.runtime_api import RuntimeClient
from service.settings import Settings

log = logging.getLogger("gendr.http")
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
UPSCALE_PATH = "/upscale"
UPSCALE_PATHS = (UPSCALE_PATH, "/v1/upscale")  # the versioned path; /upscale stays as its alias
LINGER_S = 2.0  # a request refused unread: how long its body is drained before the connection closes


@dataclass
class GendrState:
    """Process-wide state of one app: runtime, pool, readiness, in-flight accounting."""

    settings: Settings
    runtime: RuntimeClient
    metrics: Metrics
    pool: Executor
    keys: ApiKeys
    quotas: Quotas = field(default_factory=Quotas)
    started: bool = False
    start_error: BaseException | None = None
    inflight: int = 0
    on_fatal: Callable[[BaseException], None] | None = None  # the CLI exits the process
    shutdown_deadline: float | None = None  # monotonic; set by the CLI at SIGTERM
    _cut: asyncio.Event | None = field(default=None, repr=False)
    _idle: asyncio.Event | None = field(default=None, repr=False)
    _start_task: asyncio.Task[None] | None = field(default=None, repr=False)
    _closed: bool = False

    @property
    def draining(self) -> bool:
        """The one draining flag is the runtime's (its batchers follow it); the app only reads it."""
        return bool(self.runtime.draining)

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and bool(self.runtime.ready)

    def not_ready_reason(self) -> str:
        if self.start_error is not None:
            return "failed"
        if self.draining:
            return "draining"
        if not self.started:
            return "starting"
        if not self.runtime.healthy:
            return "unhealthy"
        return "not_ready" if not self.runtime.ready else "ready"

    def enter(self) -> None:
        self.inflight += 1
        self.metrics.inflight_requests.inc()

    def leave(self) -> None:
        self.inflight -= 1
        self.metrics.inflight_requests.dec()
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()

    async def start(self) -> None:
        """Load and warm every model (runs as a background task from the lifespan)."""
        try:
            await self.runtime.start()
        except (ManifestError, OSError, ValueError) as e:  # a deployment problem, not a bug: no traceback
            log.error("runtime failed to start; the server will not become ready: %s", e)
            self.start_error = e
            if self.on_fatal is not None:
                self.on_fatal(e)
            return
        except Exception as e:
            log.exception("runtime failed to start; the server will not become ready")
            self.start_error = e
            if self.on_fatal is not None:
                self.on_fatal(e)
            return
        self.started = True
        log.info(
            "ready: %s",
            ", ".join(f"{n} ({m.info.name}, {m.info.precision})" for n, m in self.runtime.models.items()),
        )

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting, wait up to `timeout_s` for admitted and in-flight requests. True if all done."""
        first = not self.draining
        self.metrics.ready.set(0)
        deadline = time.monotonic() + timeout_s
        if first:
            log.info("draining: %d request(s) in flight, up to %.1f s", self.inflight, timeout_s)
        # Sets the one flag (before start too: nothing is admitted then, so nothing to wait for).
        runtime_done = bool(await self.runtime.drain(timeout_s))
        while self.inflight > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._idle = asyncio.Event()
            if self.inflight == 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._idle.wait()
        done = runtime_done and self.inflight == 0
        if first:
            log.info(
                "drain %s", "complete" if done else f"timed out with {self.inflight} request(s) in flight"
            )
        return done

    def cut_off_event(self) -> asyncio.Event:
        if self._cut is None:
            self._cut = asyncio.Event()
        return self._cut

    def cut_off(self) -> None:
        """The drain budget is spent: every request still running is answered 503 `draining` now."""
        if self.inflight:
            log.warning("drain budget spent: answering %d unfinished request(s) 503 draining", self.inflight)
        self.cut_off_event().set()

    def time_left(self, default_s: float) -> float:
        """Seconds left before the shutdown deadline (`default_s` when no signal set one)."""
        if self.shutdown_deadline is None:
            return default_s
        return max(0.0, self.shutdown_deadline - time.monotonic())

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop the runtime, waiting at most `timeout_s` (a stuck native engine call never returns)."""
        if self._closed:
            return
        self._closed = True
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(BaseException):
                await self._start_task
        try:
            async with asyncio.timeout(max(0.05, timeout_s)):
                await asyncio.shield(self.runtime.close())
        except TimeoutError:
            log.warning("the runtime did not close within %.1f s (an engine call is stuck)", timeout_s)
        except Exception:
            log.exception("closing the runtime failed")
        self.pool.shutdown(wait=False, cancel_futures=True)


class RequestContext:
    """Pure ASGI middleware: request id, arrival time, /upscale metrics and in-flight accounting.

    Counting here (not in the route) sees every outcome: 401 and 400 raised before the handler,
    unhandled 500s, and 499 for clients that went away.
    """

    def __init__(self, app: ASGIApp, state: GendrState) -> None:
        self.app = app
        self.st = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id":
                candidate = v.decode("latin-1")
                rid = candidate if REQUEST_ID_PATTERN.match(candidate) else ""
                break
        rid = rid or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["t0"] = time.monotonic()
        status = [500]
        started = [False]
        upscale = scope["path"] in UPSCALE_PATHS and scope["method"] == "POST"

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                started[0] = True
                headers = MutableHeaders(scope=message)
                if "x-request-id" not in headers:
                    headers["X-Request-Id"] = rid
            elif message["type"] == "http.response.body" and upscale and status[0] == 200:
                c0 = time.thread_time()  # uvicorn writes the body to the socket inside this call
                await send(message)
                self.st.metrics.host_cpu("write", time.thread_time() - c0)
                return
            elif state.get("linger") and not message.get("more_body", False):
                await self._linger(message, receive, send)
                return
            await send(message)

        if not upscale:
            await self._guarded(scope, receive, send_with_id, started, rid)
            return
        st = self.st
        st.enter()
        try:
            await self._guarded(scope, receive, send_with_id, started, rid)
        finally:
            st.leave()
            model = state.get("model", "unknown")
            code = status[0]
            st.metrics.requests.labels(model=model, status=str(code)).inc()
            if code == 200:
                st.metrics.request_seconds.labels(model=model).observe(time.monotonic() - state["t0"])
            else:
                st.metrics.request_errors.labels(
                    model=model, code=state.get("error_code", "internal_error")
                ).inc()

    async def _linger(self, last: Message, receive: Receive, send: Send) -> None:
        """A request refused before its body was read: the whole answer goes out now (its
        Content-Length is complete), then the body is read and dropped for up to LINGER_S — no buffering,
        no parsing — before the connection closes. Closing at once with the body still arriving would
        make the kernel reset the connection, and a client still sending could lose the 503 with it."""
        await send({**last, "more_body": True})
        deadline = time.monotonic() + LINGER_S
        left = self.st.settings.max_body_bytes
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_S):
                while left > 0 and time.monotonic() < deadline:
                    message = await receive()
                    if message["type"] != "http.request":
                        break
                    left -= len(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _guarded(
        self, scope: Scope, receive: Receive, send: Send, started: list[bool], rid: str
    ) -> None:
        """Run the app; a request cut off at shutdown gets JSON 503 `draining`, never uvicorn's plain 500.

        Cut off means: the drain budget ended (`GendrState.cut_off`) or uvicorn cancelled the task at
        its graceful-shutdown timeout. With the response already started, the connection just closes.
        """
        task = asyncio.ensure_future(self.app(scope, receive, send))
        cut = asyncio.ensure_future(self.st.cut_off_event().wait())
        try:
            done, _ = await asyncio.wait({task, cut}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            done = set()
        if task in done:
            cut.cancel()
            task.result()
            return
        cut.cancel()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if started[0]:
            return
        err = Draining(
            "the server shut down before this request finished; retry on another replica",
            retry_after_s=self.st.settings.retry_after_s,
        )
        scope.setdefault("state", {})["error_code"] = err.code
        body = json.dumps({"error": {**err.body()["error"], "request_id": rid}}).encode()  # type: ignore[dict-item]
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(max(1, math.ceil(self.st.settings.retry_after_s))).encode()),
            (b"connection", b"close"),
        ]
        with contextlib.suppress(Exception):
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
