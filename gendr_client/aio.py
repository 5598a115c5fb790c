"""The asyncio client (httpx.AsyncClient): the same calls as `Client`, awaitable; folders with a semaphore."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from gendr_client._core import DEFAULT_URL, Options, Result, read_image
from gendr_client._estimate import INFO_RETRY_S, ServerInfo
from gendr_client._flow import Call, Flow, Progress, Tracker, Wait, upscale_flow
from gendr_client.errors import ConnectionFailed, DeadlinePassed, GendrError, from_response
from gendr_client.folder import FolderReport, plan_folder
from gendr_client.sync import _bar


class AsyncClient:
    """gendr-serve over HTTP from asyncio; retries and jobs exactly as `gendr_client.Client`."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        deadline_s: float = 600.0,
        poll_s: float = 0.5,
        http: httpx.AsyncClient | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.deadline_s, self.poll_s = deadline_s, poll_s
        self._sleep = sleep  # injectable: tests check the waits (Retry-After) without waiting them
        self._http = http or httpx.AsyncClient(
            base_url=url, headers=headers, timeout=httpx.Timeout(60.0, connect=10.0)
        )
        self._info: ServerInfo | None = None
        self._info_next = 0.0  # monotonic time of the next try after a failed one
        self._info_lock: asyncio.Lock | None = None  # made in the loop that first needs it

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def upscale(
        self,
        image: str | os.PathLike[str] | bytes,
        *,
        use_job: bool | None = None,
        on_progress: Progress | None = None,
        deadline_s: float | None = None,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> Result:
        """Upscale one image (a path or bytes). Large work runs as a job (`use_job=None`: decided by size)."""
        data = await asyncio.to_thread(read_image, image) if not isinstance(image, bytes) else image
        info = await self.server_info() if use_job is not True else None
        flow, tracker = upscale_flow(
            data,
            options,
            self.deadline_s if deadline_s is None else deadline_s,
            use_job,
            poll_s=self.poll_s,
            on_progress=on_progress,
            idempotency_key=idempotency_key,
            info=info,
        )
        return await self._run(flow, tracker)

    async def server_info(self) -> ServerInfo | None:
        """Like `Client.server_info`: GET /v1/models once per client, None while it is unavailable."""
        if self._info_lock is None:
            self._info_lock = asyncio.Lock()
        async with self._info_lock:
            if self._info is None and time.monotonic() >= self._info_next:
                try:
                    r = await self._http.get("/v1/models", timeout=10.0)
                    self._info = ServerInfo.parse(r.json()) if r.status_code == 200 else None
                except (httpx.HTTPError, ValueError):
                    self._info = None
                if self._info is None:
                    self._info_next = time.monotonic() + INFO_RETRY_S
            return self._info

    async def _run(self, flow: Flow, tracker: Tracker) -> Result:
        """Drive a flow; when the caller gives up (deadline, task cancelled) its unfinished job is deleted."""
        try:
            return await self._drive(flow)
        except BaseException as e:
            if tracker.active and (isinstance(e, DeadlinePassed) or not isinstance(e, GendrError)):
                await asyncio.shield(self._forget(tracker.active))
            raise

    async def _drive(self, flow: Flow) -> Result:
        reply: Any = None
        error: GendrError | None = None
        while True:
            try:
                step = flow.send(reply) if error is None else flow.throw(error)
            except StopIteration as stop:
                result: Result = stop.value
                return result
            reply, error = None, None
            if isinstance(step, Wait):
                await self._sleep(step.seconds)
                continue
            assert isinstance(step, Call)
            try:
                reply = await self._send(step.method, step.url, **step.kw)
            except GendrError as e:
                error = e

    async def _send(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            r = await self._http.request(method, url, **kw)
        except httpx.TransportError as e:
            raise ConnectionFailed(f"{method} {url}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            raise from_response(r.status_code, r.content, r.headers)
        return r

    async def _forget(self, url: str) -> None:
        """Delete the job the caller gave up on (cancels it, frees its tiles); best effort."""
        try:
            await self._send("DELETE", url)
        except GendrError:
            pass

    async def upscale_folder(
        self,
        src: str | os.PathLike[str],
        dst: str | os.PathLike[str],
        *,
        concurrency: int = 4,
        resume: bool = True,
        progress: bool = True,
        use_job: bool | None = None,
        **options: Any,
    ) -> FolderReport:
        """Like `Client.upscale_folder`: at most `concurrency` images in flight."""
        todo, report = plan_folder(Path(src), Path(dst), Options(**options), resume)
        bar = _bar(len(todo), progress)
        sem = asyncio.Semaphore(max(1, concurrency))

        async def one(s: Path, d: Path) -> None:
            async with sem:
                try:
                    res = await self.upscale(s, use_job=use_job, **options)
                    await asyncio.to_thread(res.save, d)
                    report.done.append(d)
                except (GendrError, OSError) as e:
                    report.failed[s] = str(e)
                if bar is not None:
                    bar.update(1)

        await asyncio.gather(*(one(s, d) for s, d in todo))
        if bar is not None:
            bar.close()
        return report
