"""HTTP routes of the job API (/v1/jobs, docs/jobs.md) and the web page at `/` (service/http/static/).

POST /v1/jobs runs POST /upscale's own handler (service.http.upscale.handle_upscale) with a hand-off: every
check, the admission (same 503 + Retry-After) and the decode are shared; once admitted, the job store
takes the reservation and the pixels and answers 202 at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.staticfiles import StaticFiles
from starlette.responses import FileResponse, JSONResponse, Response

from service.http import images
from service.http.job_records import JobExpired, owner_of
from service.http.jobs import JobStore
from service.http.upscale import Admitted, Context, UpscaleParams, handle_upscale

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


def job_store(request: Request) -> JobStore:
    """The app's store, made on first use (the folder is created then, not at import or app build)."""
    app_state = request.app.state
    store: JobStore | None = getattr(app_state, "gendr_jobs", None)
    if store is None:
        st = _state(request)
        store = JobStore(st.settings, st.pool, st.enter, st.leave, lambda: st.draining)
        app_state.gendr_jobs = store
    return store


def _owner(request: Request) -> str | None:
    """Check the API key exactly like /upscale does, then name the caller for job visibility."""
    st = _state(request)
    auth = request.headers.get("authorization")
    st.keys.check(auth)
    return owner_of(auth, st.keys.enabled)


def jobs_router() -> APIRouter:
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

    @router.post(
        "",
        status_code=202,
        summary="Start a job: same body and options as POST /upscale; poll the Location",
        responses={202: {"description": "Admitted: the job's state (as GET /v1/jobs/{id})."}},
        openapi_extra={"requestBody": _BODY},
    )
    async def create_job(request: Request, params: Annotated[UpscaleParams, Query()]) -> Response:
        owner = _owner(request)
        st = _state(request)
        store = job_store(request)
        store.make_room()

        async def hand_off(a: Admitted) -> Response:
            job = store.start(a, owner)
            body = store.describe(job, st.runtime)
            return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})

        ctx = Context(st.settings, st.runtime, st.metrics, st.pool, lambda: st.draining, hand_off=hand_off)
        return await handle_upscale(request, params, ctx)

    @router.get("/{job_id}", summary="State, tiles done of total, queue position and ETA of a job")
    async def get_job(request: Request, job_id: JobId) -> JSONResponse:
        store = job_store(request)
        job = store.get(job_id, _owner(request))
        return JSONResponse(
            store.describe(job, _state(request).runtime), headers={"Cache-Control": "no-store"}
        )

    @router.get(
        "/{job_id}/result",
        summary="The finished job's image (409 while it runs or when it failed, 410 when expired)",
        response_class=Response,
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
    )
    async def get_result(request: Request, job_id: JobId) -> Response:
        store = job_store(request)
        job = store.get(job_id, _owner(request))
        path = store.result_path(job)
        if not path.is_file():
            raise JobExpired(f"the result of job {job.id} is no longer stored")
        headers = {**job.headers, "Cache-Control": "no-store"}
        return FileResponse(path, media_type=images.CONTENT_TYPES[job.format], headers=headers)

    @router.delete("/{job_id}", summary="Cancel an unfinished job (its tiles are freed) or delete a result")
    async def delete_job(request: Request, job_id: JobId) -> JSONResponse:
        store = job_store(request)
        job = store.get(job_id, _owner(request))
        await store.cancel(job)
        return JSONResponse({**store.describe(job, _state(request).runtime), "deleted": True})

    return router


def add_routes(app: FastAPI) -> None:
    """The job API, and the web page: `/` is index.html, its script and styles under /static/."""
    app.include_router(jobs_router())
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
