"""The blocking client (httpx.Client): one image, or a folder in a thread pool with a progress bar."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import httpx

from gendr_client._core import CONTENT_TYPES, DEFAULT_URL, Options, Result, read_image
from gendr_client._estimate import INFO_RETRY_S, ServerInfo
from gendr_client._flow import Call, Flow, Progress, Tracker, Wait, upscale_flow
from gendr_client.errors import ConnectionFailed, DeadlinePassed, GendrError, from_response
from gendr_client.folder import FolderReport, plan_folder


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
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.deadline_s, self.poll_s = deadline_s, poll_s
        self._sleep = sleep  # injectable: tests check the waits (Retry-After) without waiting them
        self._http = http or httpx.Client(
            base_url=url, headers=headers, timeout=httpx.Timeout(60.0, connect=10.0)
        )
        self._info: ServerInfo | None = None
        self._info_next = 0.0  # monotonic time of the next try after a failed one
        self._info_lock = threading.Lock()

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
        idempotency_key: str | None = None,
        **options: Any,
    ) -> Result:
        """Upscale one image (a path or bytes). Large work runs as a job (`use_job=None`: decided by size).

        `idempotency_key` (jobs only; a fresh uuid4 by default) lets a caller that crashed submit again
        and get the same job back instead of a second one.
        """
        data = read_image(image)
        info = self.server_info() if use_job is not True else None
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
        return self._run(flow, tracker)

    def server_info(self) -> ServerInfo | None:
        """GET /v1/models once per client (what the job choice and the read timeout come from); None
        while it is unavailable (asked again after INFO_RETRY_S), when the fixed rules apply."""
        with self._info_lock:
            if self._info is None and time.monotonic() >= self._info_next:
                try:
                    r = self._http.get("/v1/models", timeout=10.0)
                    self._info = ServerInfo.parse(r.json()) if r.status_code == 200 else None
                except (httpx.HTTPError, ValueError):
                    self._info = None
                if self._info is None:
                    self._info_next = time.monotonic() + INFO_RETRY_S
            return self._info

    def _run(self, flow: Flow, tracker: Tracker) -> Result:
        """Drive a flow; when the caller gives up (deadline, Ctrl-C) its unfinished job is deleted."""
        try:
            return self._drive(flow)
        except BaseException as e:
            if tracker.active and (isinstance(e, DeadlinePassed) or not isinstance(e, GendrError)):
                self._forget(tracker.active)
            raise

    def _drive(self, flow: Flow) -> Result:
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
                self._sleep(step.seconds)
                continue
            assert isinstance(step, Call)
            try:
                reply = self._send(step.method, step.url, **step.kw)
            except GendrError as e:
                error = e

    def _send(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, url, **kw)
        except httpx.TransportError as e:
            raise ConnectionFailed(f"{method} {url}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            raise from_response(r.status_code, r.content, r.headers)
        return r

    def _forget(self, url: str) -> None:
        """Delete the job the caller gave up on (cancels it, frees its tiles); best effort."""
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


__all__ = ["CONTENT_TYPES", "Client", "Progress"]
