"""POST /upscale, step by step: options → body → header probe → admission → decode → runtime → encode.

The order matters: everything that can be rejected cheaply is rejected before the next, more
expensive step; admission (`reserve`, in tiles) happens after the header is read and *before* the
pixels are decoded, so an overloaded server never spends memory or CPU on work it will refuse. And
when the model's backlog is already at capacity, the request is refused before its body is read at
all (shedding is size-blind, so the body cannot change the answer): the 503 goes out at once, the
body is discarded as it arrives and the connection closed (lifecycle.py). Decode and encode run in
a bounded thread pool, never on the event loop; each stage's CPU time goes to
`gendr_host_cpu_seconds_total{stage}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.requests import Request
from starlette.responses import Response

from service.errors import (
    BadRequest,
    ClientClosedRequest,
    DeadlineExceeded,
    Draining,
    EngineFailure,
)
from service.http import images
from service.http.body import Upload, read_upload
from service.http.hostwork import encode_timed, refused_unread, timed
from service.http.output_size import output_size
from service.http.quotas import Quotas
from service.jobs.records import request_digest
from service.manifest import MODEL_NAME_PATTERN
from service.metrics import Metrics
from service.requests import UpscaleJob
from service.runtime_api import ModelClient, RuntimeClient
from service.scheduling.pools import pool_for
from service.scheduling.tickets import Reservation
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
DEADLINE_HEADER = "x-deadline-ms"


class UpscaleParams(BaseModel):
    """Options of POST /upscale: query parameters, or multipart form fields next to `image`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        pattern=MODEL_NAME_PATTERN,
        description="Model name (GET /v1/models); default: the server's.",
    )
    scale: float | None = Field(
        None, gt=0, le=16, description="Output size = scale × input; default: model's native scale."
    )
    width: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Output width; with only one of width/height the aspect ratio is kept.",
    )
    height: int | None = Field(None, ge=1, le=65535, description="Output height.")
    format: Literal["png", "jpeg", "webp", "avif"] | None = Field(
        None,
        description="Output format; default: the input's (PNG for other inputs). `jpg` is accepted; `avif` "
        "where the server's Pillow writes it (GET /v1/models: output_formats).",
    )
    fit: Literal["contain", "cover", "fill"] | None = Field(
        None,
        description="With width and height: contain (default; inside the box), cover (fill it, centred "
        "crop) or fill (stretch).",
    )
    strength: float | None = Field(
        None, ge=0, le=1, description="Share of the model's result against the plain resize (default 1)."
    )
    metadata: Literal["strip", "keep", "keep_all"] | None = Field(
        None,
        description="strip (default), keep (EXIF without GPS and maker notes, XMP) or keep_all; ICC always.",
    )
    quality: int | None = Field(None, ge=1, le=100, description="JPEG/WebP quality; ignored for PNG.")
    color_fix: Literal["none", "adain", "wavelet"] | None = Field(
        None, description="Colour correction against the bicubic input; default: the model's."
    )
    deadline_ms: int | None = Field(
        None,
        ge=1,
        le=86_400_000,
        description="Time budget from arrival; also header X-Deadline-Ms. Capped by the server.",
    )

    @field_validator("format", "color_fix", "fit", "metadata", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip().lower()
            return "jpeg" if v == "jpg" else v
        return v

    @model_validator(mode="after")
    def _one_size(self) -> UpscaleParams:
        if self.scale is not None and (self.width is not None or self.height is not None):
            raise ValueError("give either scale or width/height, not both")
        return self


def validation_message(errors: list[Any]) -> str:
    """One readable line from pydantic/FastAPI validation errors (never echoes internals)."""
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body", "header"))
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "extra_forbidden":
            msg = "unknown option"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def merge_fields(params: UpscaleParams, fields: dict[str, str]) -> UpscaleParams:
    """Query options plus multipart form options; the same option in both places is an error."""
    given = params.model_dump(exclude_unset=True)
    both = sorted(set(given) & set(fields))
    if both:
        raise BadRequest(f"option(s) {', '.join(both)} given both in the query and the form")
    try:
        return type(params).model_validate({**given, **fields})
    except ValidationError as e:
        raise BadRequest(validation_message(e.errors())) from e


@dataclass
class Context:
    """What the handler needs from the app (kept explicit so the handler is testable alone)."""

    settings: Settings
    runtime: RuntimeClient  # docs/runtime-api.md
    metrics: Metrics
    pool: Executor
    is_draining: Callable[[], bool]
    # POST /v1/jobs (service/http/jobs_routes.py): gets the admitted, decoded request and answers instead
    hand_off: Callable[[Admitted], Awaitable[Response]] | None = None
    # POST /v1/jobs on the shared store: gets the checked upload before any local admission or decode
    enqueue: Callable[[Checked], Awaitable[Response]] | None = None
    idempotency_key: str | None = None  # bind it to the upload and options (a digest of both)
    fetch_input: Callable[[], Awaitable[bytes]] | None = None  # a job's input_url instead of a body
    quotas: Quotas | None = None  # per-key output megapixels per second (service/http/quotas.py)


@dataclass(frozen=True)
class Checked:
    """An upload past every check that needs no pixels: its size, output, format and cost are known."""

    request: Request
    params: UpscaleParams
    model: ModelClient
    data: bytes
    out_width: int
    out_height: int
    fmt: str
    tiles: int
    digest: str | None
    scale: float  # output over input, as X-Scale says


@dataclass(frozen=True)
class Admitted:
    """A request past every check, admission and decode; `Context.hand_off` owns its reservation."""

    request: Request
    params: UpscaleParams
    job: UpscaleJob
    reservation: Reservation
    model: ModelClient
    decoded: images.Decoded
    fmt: str
    quality: int
    tiles: int
    digest: str | None = None
    scale: float = 0.0


def _deadline_budget(request: Request, params: UpscaleParams, s: Settings) -> float:
    values: list[int] = []
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is not None:
        try:
            v = int(raw.strip())
        except ValueError as e:
            raise BadRequest("X-Deadline-Ms must be a positive integer (milliseconds)") from e
        if v < 1:
            raise BadRequest("X-Deadline-Ms must be a positive integer (milliseconds)")
        values.append(v)
    if params.deadline_ms is not None:
        values.append(params.deadline_ms)
    if not values:
        return s.default_deadline_s
    return min(min(values) / 1000.0, s.max_deadline_s)


async def _run(pool: Executor, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (its tiles are dropped)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return
            await asyncio.sleep(0.05)  # stray http.request after the body: keep watching, politely

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientClosedRequest("client disconnected before the result was ready")


def _check_scale(params: UpscaleParams, s: Settings) -> None:
    """`scale` itself above the server's limit is a 400 (the request model only bounds it by 16)."""
    if params.scale is not None and params.scale > s.max_scale:
        raise BadRequest(f"scale {params.scale:g} exceeds the limit of {s.max_scale:g}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


async def handle_upscale(request: Request, params: UpscaleParams, ctx: Context) -> Response:
    s, runtime, metrics = ctx.settings, ctx.runtime, ctx.metrics
    t0: float = getattr(request.state, "t0", None) or time.monotonic()
    request_id: str = getattr(request.state, "request_id", "")
    if ctx.is_draining():
        raise Draining("the server is shutting down; retry on another replica", retry_after_s=s.retry_after_s)
    deadline = t0 + _deadline_budget(request, params, s)
    _check_scale(params, s)
    if params.model is not None:  # unknown model: 404 before reading the upload
        request.state.model = runtime.get(params.model).name
    refused = refused_unread(ctx.runtime, params.model, ctx.enqueue is not None)
    if refused is not None:
        request.state.model = runtime.get(params.model).name
        request.state.linger = True  # answer now, discard the body as it comes, then close (lifecycle.py)
        raise refused

    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            if ctx.fetch_input is not None:
                upload = Upload(await ctx.fetch_input())
            else:
                upload = await read_upload(request, s.max_body_bytes)
    except TimeoutError as e:
        raise DeadlineExceeded("the deadline passed while the request body was being received") from e
    t_read = time.monotonic()
    metrics.host_cpu("read", upload.cpu_s)
    metrics.request_bytes.inc(len(upload.data))
    if upload.fields:
        params = merge_fields(params, upload.fields)
        _check_scale(params, s)
    mr = runtime.get(params.model)
    request.state.model = mr.name
    digest = None
    if ctx.idempotency_key is not None:
        digest = request_digest(upload.data, params.model_dump(exclude_none=True))

    probe = await _run(
        pool_for(ctx.pool, 0),
        timed(metrics, "probe", images.probe),
        upload.data,
        s.image_formats,
        s.max_input_pixels,
        s.max_pixels_per_byte,
    )
    del upload
    probe_s = time.monotonic() - t_read
    try:
        size = output_size(probe.height, probe.width, params, s, float(mr.manifest.native_scale))
        out_h, out_w = size.out_h, size.out_w
        in_h, in_w = size.in_size or (probe.height, probe.width)
        limits: dict[str, str] = {}
        if ctx.quotas is not None:  # 429 before any pixel work, like every other refusal here
            limits = await ctx.quotas.take(getattr(request.state, "caller", None), out_h * out_w / 1e6)
        fmt = params.format or probe.default_output
        images.check_output_format(fmt, out_h, out_w)
        plan = mr.plan(in_h, in_w, out_h, out_w)
        if ctx.enqueue is not None:
            return await ctx.enqueue(
                Checked(request, params, mr, probe.data, out_w, out_h, fmt, plan.n_tiles, digest, size.scale)
            )
        # 503 overloaded / draining / not ready — before decoding; released on leaving the block
        # unless a job took it over (hand_over: the job releases it when it ends)
        with mr.reserve(plan) as reservation:
            t = time.monotonic()
            decoder = timed(metrics, "decode", images.decode)
            decoded = await _run(pool_for(ctx.pool, probe.width * probe.height), decoder, probe)
            if size.crop is not None:
                decoded = images.crop(decoded, size.crop)
            decode_s = probe_s + time.monotonic() - t
            metrics.decode_seconds.observe(decode_s)
            if time.monotonic() >= deadline:
                raise DeadlineExceeded("the deadline passed while the image was being decoded")
            job = UpscaleJob(
                image=decoded.rgb,
                out_height=out_h,
                out_width=out_w,
                color_fix=params.color_fix,
                deadline=deadline,
                request_id=request_id,
                strength=1.0 if params.strength is None else params.strength,
            )
            if ctx.hand_off is not None:
                q = params.quality or s.output_quality
                admitted = Admitted(
                    request, params, job, reservation.hand_over(), mr, decoded, fmt, q, plan.n_tiles, digest,
                    size.scale,
                )  # fmt: skip
                return await ctx.hand_off(admitted)
            outcome = await _unless_disconnected(request, mr.upscale(job, reservation))
    finally:
        probe.close()

    if outcome.image.shape != (out_h, out_w, 3):
        log.error("runtime returned %s for a %dx%d request %s", outcome.image.shape, out_w, out_h, request_id)
        raise EngineFailure("the engine returned an image of the wrong size")
    if time.monotonic() >= deadline:
        raise DeadlineExceeded("the deadline passed before the result could be encoded")
    quality = params.quality or s.output_quality
    t = time.monotonic()
    enc = pool_for(ctx.pool, out_h * out_w)
    meta = params.metadata or "strip"
    body = await _run(
        enc, encode_timed, metrics, s, outcome.image, decoded, fmt, quality, s.png_compress_level, meta
    )
    encode_s = time.monotonic() - t
    metrics.encode_seconds.observe(encode_s)
    metrics.response_bytes.inc(len(body))
    total = time.monotonic() - t0
    timing = ", ".join(
        f"{name};dur={_ms(v)}"
        for name, v in (
            ("read", t_read - t0),
            ("decode", decode_s),
            ("queue", outcome.queue_s),
            ("compute", outcome.compute_s),
            ("encode", encode_s),
            ("total", total),
        )
    )
    headers = {
        "Server-Timing": timing,
        "X-Model": outcome.model,
        "X-Backend": outcome.backend,
        "X-Precision": outcome.precision,
        "X-Tiles": str(outcome.tiles),
        "X-Queue-Time-Ms": _ms(outcome.queue_s),
        "X-Image-Size": f"{out_w}x{out_h}",
        "X-Scale": f"{size.scale:g}",
        "Cache-Control": "no-store",
        **limits,
    }
    return Response(content=body, media_type=images.CONTENT_TYPES[fmt], headers=headers)
