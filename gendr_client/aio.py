"""The asyncio client (httpx.AsyncClient): the same calls as `Client`, awaitable; folders with a semaphore."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx

from gendr_client._core import (
    DEFAULT_URL,
    Backoff,
    Options,
    Result,
    read_image,
    result_from,
    server_deadline_ms,
    wants_job,
)
from gendr_client.errors import (
    ConnectionFailed,
    GendrError,
    JobNotFound,
    Retryable,
    from_error,
    from_response,
)
from gendr_client.folder import FolderReport, plan_folder
from gendr_client.sync import Progress, _bar


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
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.deadline_s, self.poll_s = deadline_s, poll_s
        self._http = http or httpx.AsyncClient(
            base_url=url, headers=headers, timeout=httpx.Timeout(60.0, connect=10.0)
        )

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
        **options: Any,
    ) -> Result:
        """Upscale one image (a path or bytes). Large work runs as a job (`use_job=None`: decided by size)."""
        data = await asyncio.to_thread(read_image, image) if not isinstance(image, bytes) else image
        opts = Options(**options)
        backoff = Backoff(self.deadline_s if deadline_s is None else deadline_s)
        job = wants_job(data, opts, use_job)
        while True:
            try:
                if job:
                    created = (
                        await self._send("POST", "/v1/jobs", params=opts.params(), content=data)
                    ).json()
                    return await self._follow(created, backoff, on_progress)
                headers = {
                    "Content-Type": "application/octet-stream",
                    "X-Deadline-Ms": server_deadline_ms(backoff),
                }
                r = await self._send("POST", "/upscale", params=opts.params(), content=data, headers=headers)
                return result_from(r.content, r.headers)
            except Retryable as e:
                await asyncio.sleep(backoff.next_wait(e))

    async def _send(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            r = await self._http.request(method, url, **kw)
        except httpx.TransportError as e:
            raise ConnectionFailed(f"{method} {url}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            raise from_response(r.status_code, r.content, r.headers)
        return r

    async def _follow(self, job: dict[str, Any], backoff: Backoff, on_progress: Progress | None) -> Result:
        url = f"/v1/jobs/{job['id']}"
        try:
            while job["state"] in ("queued", "running"):
                if on_progress:
                    on_progress(job["tiles"]["done"], job["tiles"]["total"])
                backoff.check(f"job {job['id']} was {job['state']}")
                await asyncio.sleep(min(self.poll_s, max(0.0, backoff.left())))
                try:
                    job = (await self._send("GET", url)).json()
                except ConnectionFailed:
                    continue
                except JobNotFound as e:
                    raise ConnectionFailed(f"job {job['id']} was lost: {e.message}") from e
        except BaseException:
            await asyncio.shield(self._forget(url))
            raise
        if job["state"] != "succeeded":
            raise from_error(job.get("error") or {"code": "job_failed", "message": job["state"]}, 409)
        if on_progress:
            on_progress(job["tiles"]["total"], job["tiles"]["total"])
        r = await self._send("GET", job["result_url"])
        await self._forget(url)
        return result_from(r.content, r.headers, job_id=job["id"])

    async def _forget(self, url: str) -> None:
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
