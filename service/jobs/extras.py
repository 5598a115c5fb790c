"""What a job does beyond the upscale, the same in both stores: its input from `input_url`, its result
`PUT` to `output_url`, and webhooks when it ends (or progresses). Every URL goes through the SSRF-safe
client (service/jobs/urls.py); webhooks are signed per Standard Webhooks (service/jobs/webhooks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from service.errors import BadRequest
from service.jobs import urls, webhooks
from service.settings import Settings

log = logging.getLogger("gendr.jobs")
PROGRESS_EVERY_S = 2.0  # progress webhooks: at most one per job this often


@dataclass(frozen=True)
class JobExtras:
    webhook_url: str | None = None
    webhook_events: tuple[str, ...] = webhooks.DEFAULT_EVENTS
    output_url: str | None = None

    def record(self) -> dict[str, Any]:
        """What the job record keeps (the output URL is a credential: only whether there is one)."""
        out: dict[str, Any] = {}
        if self.webhook_url:
            out["webhook"] = {"url": self.webhook_url, "events": list(self.webhook_events), "deliveries": []}
        return out


def policy(settings: Settings) -> urls.UrlPolicy:
    return urls.UrlPolicy.from_settings(settings)


async def check(extras: JobExtras, settings: Settings) -> None:
    """At submission: a refused URL or webhooks without a secret are the client's 400, before any work."""
    if extras.webhook_url:
        if not settings.webhook_secret:
            raise BadRequest("webhooks are off on this server (no GENDR_WEBHOOK_SECRET)")
        bad = [e for e in extras.webhook_events if e not in webhooks.EVENTS]
        if bad:
            raise BadRequest(f"webhook_events: unknown {bad}; expected some of {list(webhooks.EVENTS)}")
        await urls.check_url(extras.webhook_url, policy(settings), label="webhook_url")
    if extras.output_url:
        await urls.check_url(extras.output_url, policy(settings), label="output_url")


async def fetch_input(url: str, settings: Settings) -> bytes:
    return await urls.fetch(url, policy(settings), settings.max_body_bytes, label="input_url")


async def put_output(url: str, body: bytes, content_type: str, settings: Settings) -> None:
    await urls.put(url, body, content_type, policy(settings), label="output_url")


SaveDelivery = Callable[[list[dict[str, Any]]], Awaitable[None] | None]


class Notifier:
    """Webhook deliveries of one process, each in its own task (at least once, bounded in time)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_progress: dict[str, float] = {}

    def wants(self, webhook: dict[str, Any] | None, event: str) -> bool:
        return bool(webhook and webhook.get("url") and event in webhook.get("events", ()))

    def progress(
        self, job_id: str, webhook: dict[str, Any] | None, view: Callable[[], Any], save: SaveDelivery
    ) -> None:
        """A batch landed: a progress event, at most every PROGRESS_EVERY_S per job."""
        if not self.wants(webhook, "progress"):
            return
        now = time.monotonic()
        if now - self._last_progress.get(job_id, 0.0) < PROGRESS_EVERY_S:
            return
        self._last_progress[job_id] = now
        self.send(job_id, webhook, "progress", view, save)

    def send(
        self,
        job_id: str,
        webhook: dict[str, Any] | None,
        event: str,
        view: Callable[[], Any],
        save: SaveDelivery,
    ) -> None:
        if not self.wants(webhook, event) or not self.settings.webhook_secret:
            return
        assert webhook is not None
        if event != "progress":
            self._last_progress.pop(job_id, None)
        deliveries: list[dict[str, Any]] = webhook.setdefault("deliveries", [])

        async def run() -> None:
            payload = await view() if asyncio.iscoroutinefunction(view) else view()
            slot = len(deliveries)
            deliveries.append({"event": event, "attempts": 0, "delivered": False})

            async def on_attempt(state: dict[str, Any]) -> None:
                deliveries[slot] = dict(state)
                res = save(deliveries[-20:])
                if asyncio.iscoroutine(res):
                    with contextlib.suppress(Exception):
                        await res

            try:
                await webhooks.deliver(
                    webhook["url"],
                    f"msg_{job_id}_{event}_{slot}",
                    event,
                    payload,
                    self.settings.webhook_secret or "",
                    policy(self.settings),
                    self.settings.webhook_max_s,
                    on_attempt=on_attempt,
                )
            except Exception:
                log.exception("webhook of job %s (%s) failed", job_id, event)

        task = asyncio.get_running_loop().create_task(run(), name=f"gendr-webhook-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Give deliveries in flight a moment at shutdown; the rest stop (documented: at least once while
        this process lives)."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for t in pending:
            t.cancel()
