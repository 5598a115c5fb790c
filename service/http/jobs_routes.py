"""HTTP routes of the job API (/v1/jobs, docs/jobs.md) and the web page at `/` (service/http/static/).

POST /v1/jobs runs POST /upscale's own handler (service.http.upscale.handle_upscale) with a hand-off: every
check, the admission (same 503 + Retry-After) and the decode are shared; once admitted, the job store
takes the reservation and the pixels and answers 202 at once.

GET /v1/jobs (the caller's jobs, paged) and GET /v1/jobs/{id}/events (Server-Sent Events) work the same on
both stores: the paging is service/jobs/listing.py, the event stream service/jobs/events.py.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.staticfiles import StaticFiles
from pydantic import Field
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.types import Scope

from service.errors import BadRequest
from service.http.error_body import UPLOAD_ERRORS, error_responses
from service.http.jobs import JobStore
from service.http.shared_jobs import SharedJobs
from service.http.upscale import Context, UpscaleParams, handle_upscale
from service.jobs import events, listing
from service.jobs.extras import JobExtras, fetch_input
from service.jobs.extras import check as check_extras
from service.jobs.records import IDEMPOTENCY_KEY, owner_of
from service.jobs.webhooks import DEFAULT_EVENTS

STATIC_DIR = Path(__file__).parent / "static"
JobId = Annotated[
    str, PathParam(pattern=r"^[A-Za-z0-9_-]{8,64}$", description="The id POST /v1/jobs returned.")
]


_IMAGE = {"schema": {"type": "string", "format": "binary"}}
_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["image"], "properties": {"image": _IMAGE["schema"]}}
        },
        "image/*": _IMAGE,
        "application/octet-stream": _IMAGE,
    },
}


def _state(request: Request) -> Any:
    return request.app.state.gendr  # service.http.app.GendrState


def job_store(request: Request) -> JobStore | SharedJobs:
    """The app's store: the shared one (made at start-up when `GENDR_REDIS_URL` is set), else the embedded
    one, made on first use (its folder is created then, not at import or app build)."""
    app_state = request.app.state
    store: JobStore | SharedJobs | None = getattr(app_state, "gendr_jobs", None)
    if store is None:
        st = _state(request)
        store = JobStore(st.settings, st.pool, st.enter, st.leave, lambda: st.draining, st.metrics)
        app_state.gendr_jobs = store
    return store


def _owner(request: Request) -> str | None:
    """Check the API key exactly like /upscale does, then name the caller for job visibility."""
    st = _state(request)
    auth = request.headers.get("authorization")
    request.state.caller = st.keys.check(auth)
    return owner_of(auth, st.keys.enabled)


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise BadRequest("Idempotency-Key must be 1 to 255 printable ASCII characters without spaces")
    return key


class JobParams(UpscaleParams):
    """POST /v1/jobs: the options of /upscale, plus where the input comes from and the result goes."""

    input_url: str | None = Field(
        None, max_length=4096, description="Fetch the image from this URL (https) instead of an upload."
    )
    output_url: str | None = Field(
        None, max_length=8192, description="PUT the result to this (presigned) URL instead of keeping it."
    )
    webhook_url: str | None = Field(None, max_length=2048, description="Signed POSTs when the job ends.")
    webhook_events: str | None = Field(
        None,
        max_length=64,
        description="Comma-separated: completed, failed, progress (default: the first two).",
    )

    def extras(self) -> JobExtras:
        events = tuple(e.strip() for e in (self.webhook_events or "").split(",") if e.strip())
        return JobExtras(self.webhook_url, events or DEFAULT_EVENTS, self.output_url)


def _has_body(request: Request) -> bool:
    return int(request.headers.get("content-length") or 0) > 0 or "transfer-encoding" in request.headers


# --- a root path (GENDR_ROOT_PATH): a proxy serves us under a prefix it strips --------------------------
# The stores write server-relative URLs ("/v1/jobs/{id}"); the routes below put the prefix in front, so
# a client that follows Location or result_url from the public URL stays under the prefix.


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _prefixed(root: str, job: dict[str, Any]) -> dict[str, Any]:
    url = job.get("result_url")
    if root and isinstance(url, str) and url.startswith("/") and not url.startswith(root + "/"):
        return {**job, "result_url": root + url}
    return job


def _with_root(request: Request, resp: Response) -> Response:
    """POST /v1/jobs's answer with the prefix in its Location and (an idempotent repeat) its result_url."""
    root = _root(request)
    if not root:
        return resp
    if isinstance(resp, JSONResponse) and b'"result_url":"/' in resp.body:
        body = _prefixed(root, json.loads(resp.body))
        keep = {k: v for k, v in resp.headers.items() if k not in ("content-length", "content-type")}
        resp = JSONResponse(body, status_code=resp.status_code, headers=keep)
    location = resp.headers.get("location")
    if location and location.startswith("/") and not location.startswith(root + "/"):
        resp.headers["location"] = root + location
    return resp


class _Static(StaticFiles):
    """StaticFiles that finds its files whether or not the proxy stripped the root path: Starlette strips
    the mount's root path (root + /static) from the request path only when the path carries the root."""

    def get_path(self, scope: Scope) -> str:
        root = scope.get("app_root_path", "")
        if root and not scope["path"].startswith(root):
            scope = {**scope, "root_path": scope["root_path"][len(root) :]}
        return super().get_path(scope)


def _index_html(root: str) -> str:
    """index.html with a <base href> at the root path and its links relative to it."""
    text = (STATIC_DIR / "index.html").read_text()
    text = re.sub(r'\b(href|src)="/(?!/)', r'\1="', text)
    return text.replace("<head>", f'<head>\n  <base href="{html.escape(root)}/">', 1)


def jobs_router() -> APIRouter:
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

    @router.post(
        "",
        status_code=202,
        summary="Start a job: same body and options as POST /upscale; poll the Location",
        responses={
            202: {"description": "Admitted: the job's state (as GET /v1/jobs/{id})."},
            200: {"description": "The job this Idempotency-Key already made (same image and options)."},
            **error_responses(
                {
                    **UPLOAD_ERRORS,
                    409: "the Idempotency-Key was used with other image or options (idempotency_key_reused)",
                    503: "saturated (`overloaded`), `draining`, `not_ready` or the shared store is away "
                    "(`job_store_unavailable`); see Retry-After",
                }
            ),
        },
        openapi_extra={
            "requestBody": _BODY,
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "maxLength": 255},
                    "description": "Same key + same body → the same job (kept 24 h); another body → 409.",
                }
            ],
        },
    )
    async def create_job(request: Request, params: Annotated[JobParams, Query()]) -> Response:
        owner = _owner(request)
        key = _idempotency_key(request)
        st = _state(request)
        store = job_store(request)
        extras = params.extras()
        await check_extras(extras, st.settings)
        if isinstance(store, SharedJobs):
            hooks: dict[str, Any] = {
                "enqueue": lambda c: store.enqueue(c, owner, extras),
                "idempotency_key": key,
            }
        else:
            hooks = store.hooks(owner, key, st.runtime, extras)
        if params.input_url:
            if _has_body(request):
                raise BadRequest("give either an upload or input_url, not both")
            url = params.input_url
            hooks["fetch_input"] = lambda: fetch_input(url, st.settings)
        ctx = Context(
            st.settings, st.runtime, st.metrics, st.pool, lambda: st.draining, quotas=st.quotas, **hooks
        )
        return _with_root(request, await handle_upscale(request, params, ctx))

    @router.get(
        "",
        summary="The caller's jobs, newest first, one page at a time (send next_cursor back as cursor)",
        responses={403: {"description": "No API keys are configured: there is no caller to list for."}},
    )
    async def list_jobs(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=listing.MAX_LIMIT, description="Jobs per page.")] = (
            listing.DEFAULT_LIMIT
        ),
        cursor: Annotated[
            str | None,
            Query(max_length=listing.MAX_CURSOR_CHARS, description="next_cursor of the previous page."),
        ] = None,
    ) -> JSONResponse:
        owner = _owner(request)
        if owner is None:
            raise listing.ListingNeedsKeys(
                "listing jobs needs API keys (GENDR_API_KEYS): on an open server a job's id is the only "
                "capability to its result, so no one may list them; keep the ids POST /v1/jobs returned"
            )
        pos = listing.decode_cursor(cursor)
        store = job_store(request)
        if isinstance(store, SharedJobs):
            data, nxt = await store.list_view(owner, limit, pos)
        else:
            data, nxt = await store.list_view(owner, limit, pos, _state(request).runtime)
        root = _root(request)
        body = {"object": "list", "data": [_prefixed(root, j) for j in data], "next_cursor": nxt}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @router.get(
        "/{job_id}/events",
        summary="Server-Sent Events: `progress` as tiles land, then `done` with the final state",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def job_events(request: Request, job_id: JobId) -> StreamingResponse:
        owner = _owner(request)
        st = _state(request)
        store = job_store(request)

        root = _root(request)

        async def poll() -> Any:
            if isinstance(store, SharedJobs):
                key, view = await store.poll(job_id, owner)
            else:
                key, view = await store.poll(job_id, owner, st.runtime)

            async def prefixed_view() -> dict[str, Any]:
                return _prefixed(root, await view())

            return key, prefixed_view

        await poll()  # 404 (or 503) as a JSON error before the stream starts
        stream = events.job_events(poll, stop=lambda: st.draining)
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}  # nginx: pass events at once
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    @router.get("/{job_id}", summary="State, tiles done of total, queue position and ETA of a job")
    async def get_job(request: Request, job_id: JobId) -> JSONResponse:
        store = job_store(request)
        if isinstance(store, SharedJobs):
            body = await store.get(job_id, _owner(request))
        else:
            body = await store.get_view(job_id, _owner(request), _state(request).runtime)
        return JSONResponse(_prefixed(_root(request), body), headers={"Cache-Control": "no-store"})

    @router.get(
        "/{job_id}/result",
        summary="The finished job's image (409 while it runs or when it failed, 410 when expired)",
        response_class=Response,
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
    )
    async def get_result(request: Request, job_id: JobId) -> Response:
        return await job_store(request).result(job_id, _owner(request))

    @router.delete("/{job_id}", summary="Cancel an unfinished job (its tiles are freed) or delete a result")
    async def delete_job(request: Request, job_id: JobId) -> JSONResponse:
        store = job_store(request)
        if isinstance(store, SharedJobs):
            body = await store.cancel(job_id, _owner(request))
        else:
            body = await store.delete(job_id, _owner(request), _state(request).runtime)
        return JSONResponse(body)

    return router


def add_routes(app: FastAPI) -> None:
    """The job API, and the web page: `/` is index.html (its links relative to a <base> at the root path),
    its script and styles under /static/."""
    app.include_router(jobs_router())
    app.mount("/static", _Static(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(_index_html(_root(request)), headers={"Cache-Control": "no-cache"})
