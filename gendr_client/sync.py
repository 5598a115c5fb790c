"""The blocking client (httpx.Client): one image, or a folder in a thread pool with a progress bar."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import httpx

from gendr_client._core import (
    CONTENT_TYPES,
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

Progress = Callable[[int, int], None]  # (tiles done, tiles total)


class Client:
    """gendr-serve over HTTP: `upscale()` retries 503s (Retry-After, jitter) until `deadline_s` passes."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        deadline_s: float = 600.0,
        poll_s: float = 0.5,
        http: httpx.Client | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.deadline_s, self.poll_s = deadline_s, poll_s
        self._http = http or httpx.Client(
            base_url=url, headers=headers, timeout=httpx.Timeout(60.0, connect=10.0)
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ one image

    def upscale(
        self,
        image: str | os.PathLike[str] | bytes,
        *,
        use_job: bool | None = None,
        on_progress: Progress | None = None,
        deadline_s: float | None = None,
        **options: Any,
    ) -> Result:
        """Upscale one image (a path or bytes). Large work runs as a job (`use_job=None`: decided by size)."""
        data = read_image(image)
        opts = Options(**options)
        backoff = Backoff(self.deadline_s if deadline_s is None else deadline_s)
        if wants_job(data, opts, use_job):
            return self._job(data, opts, backoff, on_progress)
        while True:
            try:
                return self._direct(data, opts, backoff)
            except Retryable as e:
                time.sleep(backoff.next_wait(e))

    def _send(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, url, **kw)
        except httpx.TransportError as e:
            raise ConnectionFailed(f"{method} {url}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            raise from_response(r.status_code, r.content, r.headers)
        return r

    def _direct(self, data: bytes, opts: Options, backoff: Backoff) -> Result:
        headers = {"Content-Type": "application/octet-stream", "X-Deadline-Ms": server_deadline_ms(backoff)}
        r = self._send("POST", "/upscale", params=opts.params(), content=data, headers=headers)
        return result_from(r.content, r.headers)

    def _job(self, data: bytes, opts: Options, backoff: Backoff, on_progress: Progress | None) -> Result:
        """Submit, poll, fetch; a job lost to a drain or a restart is submitted again (same deadline)."""
        while True:
            try:
                job = self._send("POST", "/v1/jobs", params=opts.params(), content=data).json()
                return self._follow(job, backoff, on_progress)
            except Retryable as e:
                time.sleep(backoff.next_wait(e))

    def _follow(self, job: dict[str, Any], backoff: Backoff, on_progress: Progress | None) -> Result:
        url = f"/v1/jobs/{job['id']}"
        try:
            while job["state"] in ("queued", "running"):
                if on_progress:
                    on_progress(job["tiles"]["done"], job["tiles"]["total"])
                backoff.check(f"job {job['id']} was {job['state']}")
                time.sleep(min(self.poll_s, max(0.0, backoff.left())))
                try:
                    job = self._send("GET", url).json()
                except ConnectionFailed:
                    continue  # a restarting server: keep polling until the deadline
                except JobNotFound as e:  # restarted without its job folder: submit again
                    raise ConnectionFailed(f"job {job['id']} was lost: {e.message}") from e
        except BaseException:
            self._forget(url)
            raise
        if job["state"] != "succeeded":
            raise from_error(job.get("error") or {"code": "job_failed", "message": job["state"]}, 409)
        if on_progress:
            on_progress(job["tiles"]["total"], job["tiles"]["total"])
        r = self._send("GET", job["result_url"])
        self._forget(url)
        return result_from(r.content, r.headers, job_id=job["id"])

    def _forget(self, url: str) -> None:
        """Delete the job (cancels it if unfinished, frees the stored result); best effort."""
        try:
            self._send("DELETE", url)
        except GendrError:
            pass

    # ------------------------------------------------------------------ folders

    def upscale_folder(
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
        """Every image under `src` to the same relative path under `dst`; `resume` skips finished ones."""
        opts = Options(**options)
        todo, report = plan_folder(Path(src), Path(dst), opts, resume)
        bar = _bar(len(todo), progress)
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = {pool.submit(self.upscale, s, use_job=use_job, **options): (s, d) for s, d in todo}
            for f in as_completed(futures):
                s, d = futures[f]
                try:
                    f.result().save(d)
                    report.done.append(d)
                except (GendrError, OSError) as e:
                    report.failed[s] = str(e)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return report


def _bar(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="img", desc="upscaling")


__all__ = ["CONTENT_TYPES", "Client"]
