"""`gendr-serve`: run the HTTP service with uvicorn.

Host and port are flags, never settings: Kubernetes injects `<SERVICE>_PORT` variables, so a
`GENDR_PORT` setting would break as soon as the Service is called `gendr` (docs/architecture.md,
known pitfalls).

SIGTERM / SIGINT → graceful drain: /readyz turns 503, new /upscale requests get 503 `draining` with
Retry-After, admitted work finishes, then the server stops listening and exits — all within
`drain_timeout_s`. Requests still unfinished when the drain budget ends are answered 503 `draining`
(JSON) by the app; if anything still holds the process (an engine call stuck in native code), a
watchdog ends it at `drain_timeout_s + FORCE_EXIT_MARGIN_S` with exit status 1. A second signal
skips the drain.

uvicorn's connection limits are set deliberately from settings (docs/http.md, "Before the app"):
h11 with `max_header_bytes`, `keep_alive_timeout_s`, `max_connections` and a header timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import threading
import time
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service import __version__
from service.http.httpserver import protocol_class
from service.manifest import ManifestError
from service.settings import CONFIG_FILE_ENV, Settings

log = logging.getLogger("gendr.cli")
# Leave this much of drain_timeout_s (at most half of it) for answering, closing connections and the
# runtime after the drain.
_SHUTDOWN_MARGIN_S = 1.0
# The process is gone at the latest this long after drain_timeout_s, whatever an engine call does.
FORCE_EXIT_MARGIN_S = 0.5


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the app before uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.drain_timeout_s = drain_timeout_s
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_started = False
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_started or self._loop is None or not self.started:
            super().handle_exit(sig, frame)  # second signal, or before startup: uvicorn's own stop
            return
        self._drain_started = True
        t_signal = time.monotonic()
        watchdog = threading.Timer(self.drain_timeout_s + FORCE_EXIT_MARGIN_S, self._force_exit)
        watchdog.daemon = True
        watchdog.start()
        self._loop.call_soon_threadsafe(self._begin_drain, t_signal)

    def _begin_drain(self, t_signal: float) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit(t_signal))

    async def _drain_then_exit(self, t_signal: float) -> None:
        st = self.config.app.state.gendr  # type: ignore[union-attr]
        st.shutdown_deadline = t_signal + self.drain_timeout_s
        margin = min(_SHUTDOWN_MARGIN_S, self.drain_timeout_s / 2)
        budget = max(0.0, t_signal + self.drain_timeout_s - margin - time.monotonic())
        try:
            if not await st.drain(budget):
                st.cut_off()  # answer what is left (503 draining) instead of uvicorn's plain 500
        finally:
            self.should_exit = True

    def _force_exit(self) -> None:
        """Backstop: the drain timeout is what the orchestrator waits before SIGKILL; never overrun it."""
        log.error(
            "shutdown took longer than drain_timeout_s=%.1f s (an engine call is stuck?): exiting now",
            self.drain_timeout_s,
        )
        for h in logging.getLogger().handlers:
            h.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    def fatal(self, exc: BaseException) -> None:
        """The runtime could not start: exit non-zero so the orchestrator restarts or reports us."""
        log.error("exiting: runtime start failed: %s", exc)
        self.exit_code = 1
        self.should_exit = True


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gendr-serve",
        description="GenDR super-resolution HTTP service. Settings come from GENDR_* environment "
        f"variables and the optional {CONFIG_FILE_ENV} file (see README).",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 in containers)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=None,
        help="overrides GENDR_LOG_LEVEL",
    )
    p.add_argument("--config", metavar="FILE", help=f"settings file (.toml/.json); same as {CONFIG_FILE_ENV}")
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    p.add_argument("--version", action="version", version=f"gendr-serve {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.config:
        os.environ[CONFIG_FILE_ENV] = args.config
    try:
        settings = Settings()
    except (ValidationError, ValueError) as e:
        print(f"gendr-serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    level = args.log_level or settings.log_level
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from service.http.app import create_app  # after logging is configured: the runtime logs while loading

    try:
        app = create_app(settings)
    except (ManifestError, OSError, ValueError) as e:  # no models, bad manifest, unusable backend setting
        logging.getLogger("gendr.cli").error("cannot start: %s", e)
        return 1
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=level,
        access_log=not args.no_access_log,
        lifespan="on",
        timeout_graceful_shutdown=max(0.1, _SHUTDOWN_MARGIN_S / 2),
        server_header=False,
        http=protocol_class(settings.header_timeout_s, settings.retry_after_s),
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        limit_concurrency=settings.max_connections,
        # No root_path here: uvicorn would prepend it to every request's path, and the drain and the
        # request metrics match /upscale literally. settings.root_path goes to FastAPI (create_app).
    )
    server = _DrainingServer(config, settings.drain_timeout_s)
    app.state.gendr.on_fatal = server.fatal
    server.run()
    return server.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
