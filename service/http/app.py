"""FastAPI application: thin routes over the runtime (docs/runtime-api.md), errors mapped in one place.

- `create_app()` builds everything from `Settings`; nothing reads the environment elsewhere.
- The runtime loads and warms up in the background, so the process answers /healthz (live) at once
  and /readyz turns 200 only when every engine is warm (docs/architecture.md: liveness ≠ readiness).
- `GendrState.drain()` (service/http/lifecycle.py) is the graceful stop: not ready, stop admitting (503
  draining), wait for in-flight requests, then `cut_off()` answers what is left. The CLI calls it on
  SIGTERM; the lifespan calls it on any other shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from service import __version__
from service.errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    NotReady,
    ServiceError,
)
from service.http import images
from service.http.auth import ApiKeys
from service.http.error_body import UPLOAD_ERRORS, ErrorBody, ErrorDetail, error_responses
from service.http.jobs_routes import add_routes
from service.http.lifecycle import UPSCALE_PATH, GendrState, RequestContext
from service.http.quotas import Quotas, load_keys_file
from service.http.shared_jobs import SharedJobs
from service.http.upscale import Context, UpscaleParams, handle_upscale, validation_message
from service.metrics import Metrics
from service.runtime import Runtime
from service.runtime_api import RuntimeClient
from service.scheduling.pools import SizeClassPool
from service.settings import Settings

log = logging.getLogger("gendr.http")


def error_response(request: Request, exc: BaseException) -> JSONResponse:
    """THE place where exceptions become responses (ServiceError → its status; else 500, no internals)."""
    st: GendrState | None = getattr(request.app.state, "gendr", None)
    if not isinstance(exc, ServiceError):
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        exc = ServiceError("internal server error")
    body = exc.body()
    rid = getattr(request.state, "request_id", None)
    if rid:
        body["error"]["request_id"] = rid  # type: ignore[index]
    headers = dict(exc.headers())
    if exc.status == 503:
        retry = (
            exc.retry_after_s if exc.retry_after_s is not None else (st.settings.retry_after_s if st else 5.0)
        )
        headers["Retry-After"] = str(max(1, math.ceil(retry)))
        if exc.retry_after_s is None:
            body["error"]["retry_after_s"] = retry  # type: ignore[index]
    if request.method == "POST" and not getattr(request.state, "body_read", False):
        # The body was not (fully) read: close instead of letting the server drain it.
        headers["Connection"] = "close"
    if rid:
        headers["X-Request-Id"] = rid
    request.state.error_code = exc.code
    if exc.status >= 500 and exc.status != 503:
        log.warning(
            "%s %s → %d %s: %s [%s]", request.method, request.url.path, exc.status, exc.code, exc.message, rid
        )
    return JSONResponse(body, status_code=exc.status, headers=headers)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request, exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(request, BadRequest(validation_message(list(exc.errors()))))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(request, NotFound(f"no route {request.url.path}"))
    if exc.status_code == 405:
        resp = error_response(
            request, MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        )
        if exc.headers and "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    err = ServiceError(str(exc.detail))
    err.status = exc.status_code  # type: ignore[misc]
    err.code = "http_error"  # type: ignore[misc]
    return error_response(request, err)


def create_app(
    settings: Settings | None = None, runtime: RuntimeClient | None = None, metrics: Metrics | None = None
) -> FastAPI:
    """Build the app. `runtime`: anything with the runtime contract (service/runtime_api.py); built
    from settings (`service.runtime.Runtime`) when None."""
    settings = settings or Settings()
    if metrics is None:
        metrics = getattr(runtime, "metrics", None) or Metrics()
    if runtime is None:
        runtime = Runtime.from_settings(settings, metrics)
    images.configure_pillow(settings.max_input_pixels)
    st = GendrState(
        settings=settings,
        runtime=runtime,
        metrics=metrics,
        pool=SizeClassPool(settings.image_workers, "gendr-image"),
        keys=ApiKeys(
            settings.api_keys, load_keys_file(settings.api_keys_file) if settings.api_keys_file else None
        ),
    )
    shared = SharedJobs(st) if settings.redis_url else None  # the job layer on Redis (docs/jobs.md)
    st.quotas = Quotas(shared.jobs.r if shared else None, settings.redis_prefix, metrics)
    ctx = Context(settings, runtime, metrics, st.pool, lambda: st.draining, quotas=st.quotas)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        st._start_task = asyncio.create_task(st.start(), name="gendr-runtime-start")
        if shared is not None:
            app.state.gendr_jobs = shared
            await shared.start()
        try:
            yield
        finally:
            # After a SIGTERM drain (the CLI) everything left was answered: only the deadline remains.
            drained_by_cli = st.draining
            if not drained_by_cli and not await st.drain(settings.drain_timeout_s):
                st.cut_off()
            if shared is not None:
                await shared.close()  # jobs still held go back to the stream for another replica
            await st.close(st.time_left(1.0) if drained_by_cli else max(1.0, st.time_left(5.0)))

    errors = error_responses(UPLOAD_ERRORS)
    app = FastAPI(
        title="gendr-serve",
        version=__version__,
        description="GenDR one-step diffusion super-resolution. See docs/http.md.",
        lifespan=lifespan,
        responses={500: {"model": ErrorBody, "description": "internal error"}},
        # Behind a proxy that strips this prefix: URLs we hand out carry it (jobs_routes.py), /docs finds
        # /openapi.json under it. Routes still match the stripped path.
        root_path=settings.root_path,
    )
    app.state.gendr = st
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _service_error)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],  # DELETE: cancelling a job
            allow_headers=["Authorization", "Content-Type", "X-Deadline-Ms", "X-Request-Id"],
            expose_headers=[
                "Location",  # POST /v1/jobs
                "Server-Timing",
                "X-Model",
                "X-Backend",
                "X-Precision",
                "X-Tiles",
                "X-Queue-Time-Ms",
                "X-Image-Size",
                "X-Request-Id",
                "Retry-After",
            ],
        )
    app.add_middleware(RequestContext, state=st)

    def require_key(request: Request) -> None:
        request.state.caller = st.keys.check(request.headers.get("authorization"))

    @app.post(
        "/v1/upscale",
        summary="Upscale / restore one image (`/upscale` is the same route)",
        dependencies=[Depends(require_key)],
        response_class=Response,
        responses={
            200: {
                "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
                "description": "The image; timings in Server-Timing and X-* headers.",
            },
            **errors,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["image"],
                            "properties": {"image": {"type": "string", "format": "binary"}},
                        }
                    },
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "parameters": [
                {
                    "name": "X-Deadline-Ms",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1},
                    "description": "Budget in ms from arrival (the smaller of this and deadline_ms wins).",
                }
            ],
        },
    )
    async def upscale(request: Request, params: Annotated[UpscaleParams, Query()]) -> Response:
        return await handle_upscale(request, params, ctx)

    app.add_api_route(  # the unversioned path of earlier releases: same handler, one schema entry
        UPSCALE_PATH,
        upscale,
        methods=["POST"],
        dependencies=[Depends(require_key)],
        response_class=Response,
        include_in_schema=False,
    )

    @app.get("/v1/models", summary="Loaded models, their backends and limits")
    async def models() -> dict[str, Any]:
        if st.start_error is not None:  # e.g. a model refused (integrity) or a required GPU backend lost
            raise NotReady(f"start-up failed: {st.start_error}", retry_after_s=settings.retry_after_s)
        if not st.started:
            raise NotReady("models are still loading", retry_after_s=settings.retry_after_s)
        default = runtime.get(None).name
        return {
            "object": "list",
            "default": default,
            "data": [mr.describe() for mr in runtime.models.values()],
            "limits": {
                "max_body_bytes": settings.max_body_bytes,
                "max_input_pixels": settings.max_input_pixels,
                "max_output_pixels": settings.max_output_pixels,
                "max_scale": settings.max_scale,
                "default_deadline_s": settings.default_deadline_s,
                "max_deadline_s": settings.max_deadline_s,
                "input_formats": settings.image_formats,
                "output_formats": list(images.output_formats()),
            },
        }

    @app.get("/healthz", summary="Liveness: the process works (503 when startup failed or a backend broke)")
    async def healthz(request: Request) -> JSONResponse:
        broken = st.start_error is not None or (st.started and not runtime.healthy)
        body = {"status": "unhealthy" if broken else "ok"}
        if broken:
            body["request_id"] = request.state.request_id
        return JSONResponse(body, status_code=503 if broken else 200)

    @app.get("/readyz", summary="Readiness: every engine warmed up, healthy, not draining")
    async def readyz(request: Request) -> JSONResponse:
        ready = st.ready
        st.metrics.ready.set(1 if ready else 0)
        body: dict[str, Any] = {"status": "ready" if ready else st.not_ready_reason(), "ready": ready}
        if st.start_error is not None:  # why it will not become ready: a refused model names file and check
            body["reason"] = str(st.start_error)
        if st.started:  # models serving on the CPU although a GPU was expected (ready, but degraded)
            fallbacks = {n: f for n, mr in runtime.models.items() if (f := mr.describe().get("fallback"))}
            if fallbacks:
                body["fallbacks"] = fallbacks
        if not ready:
            body["request_id"] = request.state.request_id
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_page() -> Response:
        st.metrics.ready.set(1 if st.ready else 0)
        await asyncio.to_thread(st.metrics.refresh_gpu_memory)
        if shared is not None:
            await shared.report_backlog(st.metrics)
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    add_routes(app)  # /v1/jobs and the web page at / (service/http/jobs_routes.py)
    app.openapi = lambda: openapi_schema(app, settings)  # type: ignore[method-assign]
    return app


def openapi_schema(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The schema as the server really answers: validation errors are our 400 body (never FastAPI's 422
    schema), and limits are this server's settings (one source: the page reads /v1/models.limits)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    components.setdefault(
        "ErrorBody", ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    )
    components.setdefault("ErrorDetail", ErrorDetail.model_json_schema())
    bad = {
        "description": "bad options (`bad_request`)",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            responses = op.get("responses", {})
            if "422" in responses and "HTTPValidationError" in str(responses["422"]):
                del responses["422"]
                responses.setdefault("400", bad)
            for param in op.get("parameters", []):
                if param.get("name") == "scale" and "schema" in param:
                    _set_maximum(param["schema"], settings.max_scale)
    app.openapi_schema = schema
    return schema


def _set_maximum(schema: dict[str, Any], value: float) -> None:
    for s in [schema, *schema.get("anyOf", [])]:
        if s.get("type") in ("number", "integer") and "maximum" in s:
            s["maximum"] = value
