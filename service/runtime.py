"""The runtime behind the HTTP layer (contract: docs/runtime-api.md). No FastAPI, no torch.

One `ModelRuntime` per served model: its backend, its tile batcher (one queue per model and tile
shape) and the per-request steps of service.pixels.pipeline around it — resize and pad before the queue,
stitching as batches complete, post-resize and colour fix after. Pixel work runs in a thread pool,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from service import __version__
from service.backends.base import Backend, BackendInfo
from service.backends.chain import GpuExpectation, load_chain
from service.errors import BadRequest, DeadlineExceeded, ImageTooLarge, ModelNotFound, NotReady, ServiceError
from service.hardware import available_cpus
from service.manifest import COLOR_FIXES, Manifest, ManifestError, list_models, read_manifest
from service.metrics import Metrics
from service.pixels.pipeline import RequestPlan, make_plan
from service.pixels.tiling import TilePlan
from service.requests import (
    UpscaleJob,
    UpscaleOutcome,
    finish_request,
    plain_view,
    prepare_request,
    request_sink,
    shape_label,
)
from service.scheduling.batcher import TileBatcher
from service.scheduling.planner import EngineShapes, choose
from service.scheduling.pools import SizeClassPool, pool_for
from service.scheduling.tickets import Reservation, Ticket, TicketResult
from service.scheduling.whole_image import WholeImageCap, cap_for
from service.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["ModelRuntime", "Reservation", "Runtime", "UpscaleJob", "UpscaleOutcome"]


BackendFactory = Callable[[Manifest, Path, Settings], tuple[Backend, str]]


class ModelRuntime:
    def __init__(
        self,
        name: str,
        model_dir: Path,
        manifest: Manifest,
        backend: Backend,
        settings: Settings,
        metrics: Metrics,
        host: concurrent.futures.Executor,
        selection_reason: str = "",
        fallbacks: Sequence[tuple[str, Callable[[], Backend]]] = (),
        gpu: GpuExpectation | None = None,
    ) -> None:
        self.name = name
        self.model_dir = model_dir
        self.manifest = manifest
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.selection_reason = selection_reason
        self._fallbacks = list(fallbacks)  # (reason, constructor), tried in order when a load fails
        self._gpu = gpu or GpuExpectation()  # a GPU backend expected or required: a CPU fallback is loud
        self.fallback = ""  # why the model runs on the CPU although a GPU was expected (set at load)
        self._host = host
        self.batcher = self._make_batcher()
        self.max_request_tiles = self._max_request_tiles()
        self._shapes: EngineShapes | None = None  # known once loaded: the planner's view of the engine
        self.whole_image = WholeImageCap(0, "not loaded yet")  # the whole-image cap and why (at load)
        self._ready = False
        self._closed = False

    @property
    def info(self) -> BackendInfo:
        return self.backend.info

    @property
    def default_color_fix(self) -> str:
        return self.manifest.pipeline.color_fix if self.manifest.pipeline is not None else "none"

    @property
    def ready(self) -> bool:
        return self._ready and not self._closed and not self.batcher.draining and self.batcher.healthy

    @property
    def healthy(self) -> bool:
        return not self._ready or self.batcher.healthy

    def _make_batcher(self) -> TileBatcher:
        s = self.settings
        return TileBatcher(
            self.backend,
            model=self.name,
            metrics=self.metrics,
            max_batch=s.max_batch,
            max_queue_delay_s=s.max_queue_delay_ms / 1000.0,
            capacity_tiles=s.queue_capacity_tiles,
            unhealthy_after=s.unhealthy_after_failures,
            max_retry_after_s=s.max_deadline_s,
            retry_after_s=s.retry_after_s,
            work_weight=s.scheduling_work_weight,
        )

    def _load_backend(self) -> dict[int, float]:
        """Load and warm the backend, falling back down `auto`'s list from environmental failures only
        (service/backends/chain.py: an integrity failure refuses the model; a lost GPU is loud)."""
        first = self.backend
        done = load_chain(
            self.name, self.backend, self.selection_reason, self._fallbacks, self.metrics, self._gpu
        )
        self.backend, self.selection_reason, self.fallback = done.backend, done.reason, done.fallback
        if self.backend is not first:
            self.batcher = self._make_batcher()  # nothing is admitted before ready
        return done.timings

    def load(self) -> None:
        """Blocking: load the engine, time every shape and batch size (the cost table), start the workers."""
        t0 = time.monotonic()
        timings = self._load_backend()
        self.batcher.start(timings)
        b = self.batcher
        self.whole_image = cap_for(self.settings, self.manifest, b.dynamic, self.backend)
        cap = self.whole_image
        log.info("%s: whole-image cap %s px — %s", self.name, f"{cap.pixels:,}", cap.reason)
        self._shapes = EngineShapes.of(
            self.manifest.tile, b.tiles, b.dynamic, self.settings, b.max_batch, self.whole_image.pixels
        )
        costs = b.costs
        for h, w, n in costs.entries() if costs is not None else []:  # read at scrape time, not per batch
            gauge = self.metrics.call_cost.labels(self.name, f"{h}x{w}", str(n))
            gauge.set_function(functools.partial(costs.call_s, h, w, n))  # type: ignore[union-attr]
        info = self.info
        self.metrics.build_info.labels(
            self.name, __version__, info.name, info.precision, info.engine_key
        ).set(1)
        self._ready = True
        log.info(
            "%s: ready on %s (%s, %s, batch sizes %s, %d instance(s)) in %.1fs; %s",
            self.name,
            info.name,
            info.device,
            info.precision,
            info.batch_sizes,
            info.instances,
            time.monotonic() - t0,
            self.selection_reason,
        )

    # ------------------------------------------------------------------ contract

    def _max_request_tiles(self) -> int:
        """Twice the tiles of the largest square output the pixel limit allows.

        The pixel limits alone do not bound the work: a 4 × 4,000,000 image is within 16 MP but is
        41,667 mostly-padding tiles (gigabytes of padded input). Any aspect ratio up to about 2× the
        padding waste of a square passes; degenerate shapes get a 413.
        """
        side = max(1, math.isqrt(self.settings.max_output_pixels))
        g = self.manifest.tile.graph_scale
        square = make_plan(math.ceil(side / g), math.ceil(side / g), side, side, self.manifest.tile)
        return 2 * square.n_tiles

    def _tiler(self, h: int, w: int) -> TilePlan:
        # not loaded: the primary tile (the cost is all admission needs then)
        shapes = self._shapes or EngineShapes.of(self.manifest.tile, (self.manifest.tile.tile,))
        return choose(h, w, shapes, self.batcher.costs)

    def plan(self, in_h: int, in_w: int, out_h: int, out_w: int) -> RequestPlan:
        """Cheap (no pixels): the HTTP layer calls it on header sizes; the cost-aware planner picks the
        engine input shape, and the plan's tile units are what admission reserves."""
        try:
            p = make_plan(
                in_h, in_w, out_h, out_w, self.manifest.tile, self.settings.max_output_pixels, self._tiler
            )
        except ValueError as e:
            raise BadRequest(str(e)) from e
        if p.units > self.max_request_tiles:
            raise ImageTooLarge(
                f"a {in_w}×{in_h} → {out_w}×{out_h} request needs {p.units} tiles of "
                f"{self.manifest.tile.tile} px; the limit per request is {self.max_request_tiles} "
                "(very thin images waste most of each tile)"
            )
        return p

    def reserve(self, plan: RequestPlan) -> Reservation:
        """Admission for one plan; the reservation carries the plan so it is computed once."""
        if not self._ready or self._closed:
            raise NotReady(f"model {self.name} is still loading", retry_after_s=self.settings.retry_after_s)
        return self.batcher.reserve(plan.units, plan)

    def refusal(self) -> ServiceError | None:
        """Why a new request for this model would be refused now, whatever its size (loading, draining,
        no healthy instance, a full backlog), or None: the HTTP layer asks before reading a body."""
        if not self._ready or self._closed:
            return NotReady(f"model {self.name} is still loading", retry_after_s=self.settings.retry_after_s)
        return self.batcher.account.refusal()

    async def upscale(self, job: UpscaleJob, reservation: Reservation) -> UpscaleOutcome:
        """Run the job; always releases the reservation (whoever holds it)."""
        try:
            return await self._upscale(job, reservation)
        finally:
            reservation.release()

    async def _upscale(self, job: UpscaleJob, reservation: Reservation) -> UpscaleOutcome:
        if reservation.owner is not self.batcher.account or reservation.released:
            raise ValueError("reservation does not belong to this model or was already released")
        img = job.image
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise BadRequest(f"expected an HWC uint8 RGB image, got {img.shape} {img.dtype}")
        color_fix = job.color_fix or self.default_color_fix
        if color_fix not in COLOR_FIXES:
            raise BadRequest(f"unknown color_fix {color_fix!r}; use one of {', '.join(COLOR_FIXES)}")
        if time.monotonic() >= job.deadline:
            raise DeadlineExceeded("deadline passed before processing started")
        plan = reservation.plan
        want = (img.shape[0], img.shape[1], job.out_height, job.out_width)
        if not isinstance(plan, RequestPlan) or (plan.in_h, plan.in_w, plan.out_h, plan.out_w) != want:
            plan = self.plan(*want)  # the decoded image differs from its header (EXIF rotation, …)
            reservation.rebind(plan)
        self.metrics.plan_shape.labels(self.name, shape_label(plan.tiles, self.batcher.tiles)).inc()
        loop = asyncio.get_running_loop()

        pixels = pool_for(self._host, job.out_height * job.out_width)
        cpu = self.metrics.host_cpu
        padded, stitcher = await loop.run_in_executor(pixels, prepare_request, img, plan, cpu)
        ticket = self.batcher.submit(
            padded,
            plan.tiles,
            job.deadline,
            request_sink(stitcher, job.progress, cpu),
            admitted=reservation.created,
        )
        plain = plain_view(padded, plan, color_fix, job.strength)  # the colour fix's reference, resized once
        del padded  # the ticket holds it until its last tile has been cut
        result = await self._wait(ticket, job.deadline)
        del ticket  # frees the padded input before the colour fix allocates (unless `plain` is a view of it)
        out = await loop.run_in_executor(
            pixels, finish_request, stitcher, img, plan, color_fix, job.strength, cpu, plain
        )
        now = time.monotonic()
        self.metrics.output_megapixels.labels(self.name).inc(job.out_height * job.out_width / 1e6)
        self.metrics.tile_occupancy.labels(self.name).observe(plan.tiles.occupancy)
        info = self.info
        return UpscaleOutcome(
            image=out,
            model=self.name,
            backend=info.name,
            precision=info.precision,
            tiles=plan.n_tiles,
            queue_s=result.started - reservation.created,
            compute_s=result.compute_s,
            runtime_s=now - reservation.created,
        )

    async def _wait(self, ticket: Ticket, deadline: float) -> TicketResult:
        fut = asyncio.wrap_future(ticket.future)
        # if we stop waiting (deadline, cancel) and the batcher fails it at that moment, nobody else reads it
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self.batcher.cancel(ticket)
            raise DeadlineExceeded("deadline passed before the result was ready") from None
        except asyncio.CancelledError:
            self.batcher.cancel(ticket)  # client gone: drop unrun tiles
            raise

    def describe(self) -> dict[str, object]:
        m, info = self.manifest, self.info
        return {
            "name": self.name,
            "kind": m.kind,
            "native_scale": m.native_scale,
            "backend": info.name,
            "device": info.device,
            "precision": info.precision,
            "engine_key": info.engine_key,
            "selection_reason": self.selection_reason,
            "fallback": self.fallback or None,  # set when a GPU was expected and the model runs on the CPU
            "tile": {
                "input": m.tile.tile,
                "overlap": m.tile.overlap,
                "graph_scale": m.tile.graph_scale,
                "output": m.tile.out_tile,
            },
            "batch_sizes": list(self.batcher.batch_sizes),
            "shapes": {
                "tiles": list(self.batcher.tiles),
                "dynamic": self.batcher.dynamic,
                "whole_image_max_pixels": self.whole_image.pixels,
            },
            "whole_image_cap": self.whole_image.describe(),  # the cap, how it was chosen, the measurement
            "cost_table": self.batcher.costs.rows() if self.batcher.costs is not None else [],
            "instances": info.instances,
            "tiles_per_s": round(float(self.batcher.tiles_per_s), 3),  # measured; the client sizes timeouts
            "color_fix_default": self.default_color_fix,
            "limits": {
                "queue_capacity_tiles": self.settings.queue_capacity_tiles,
                "max_batch": self.batcher.max_batch,
                "max_queue_delay_ms": self.settings.max_queue_delay_ms,
                "max_output_pixels": self.settings.max_output_pixels,
                "max_request_tiles": self.max_request_tiles,
            },
            "ready": self.ready,
        }

    def close(self) -> None:
        self._closed = True
        self.batcher.close()
        self.backend.close()


class Runtime:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        models: dict[str, ModelRuntime],
        default: str,
        host: concurrent.futures.Executor,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models = models
        self.default = default
        self._host = host
        self._started = False
        self._draining = False

    @classmethod
    def from_settings(
        cls, settings: Settings, metrics: Metrics, backend_factory: BackendFactory | None = None
    ) -> Runtime:
        """Read the manifests and choose each model's backend; cheap (no artifact is hashed or loaded)."""
        from service.backends.select import create_backend, fallbacks, gpu_expectation

        repo = Path(settings.model_repository)
        names = settings.models or list_models(repo)
        if not names:
            raise ManifestError(
                f"no model found in {repo.resolve()} (each model is a folder with a manifest.json)"
            )
        factory = backend_factory or create_backend
        host = SizeClassPool(max(2, available_cpus()), "pixels")
        models: dict[str, ModelRuntime] = {}
        gpu = gpu_expectation(settings) if backend_factory is None else GpuExpectation()
        for name in names:
            model_dir = repo / name
            manifest = read_manifest(model_dir, verify=False)  # the backend verifies what it loads
            backend, reason = factory(manifest, model_dir, settings)
            more = fallbacks(manifest, model_dir, settings) if backend_factory is None else []
            log.info("%s: backend %s — %s", name, backend.info.name, reason)
            models[name] = ModelRuntime(
                name, model_dir, manifest, backend, settings, metrics, host, reason, fallbacks=more, gpu=gpu
            )
        default = settings.default_model or names[0]
        if default not in models:
            raise ManifestError(f"default model {default!r} is not among the served models {sorted(models)}")
        return cls(settings, metrics, models, default, host)

    async def start(self) -> None:
        """Load and warm every model off the event loop (one after another: peak memory of one load)."""
        for m in self.models.values():
            await asyncio.to_thread(m.load)
        self._started = True

    def get(self, name: str | None) -> ModelRuntime:
        key = self.default if name is None else name
        try:
            return self.models[key]
        except KeyError:
            raise ModelNotFound(f"no model {name!r}; available: {', '.join(sorted(self.models))}") from None

    @property
    def ready(self) -> bool:
        return self._started and not self._draining and all(m.ready for m in self.models.values())

    @property
    def healthy(self) -> bool:
        return all(m.healthy for m in self.models.values())

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting, wait for admitted work to finish; True if everything finished in time."""
        self._draining = True
        for m in self.models.values():
            m.batcher.start_drain()
        deadline = time.monotonic() + timeout_s
        for m in self.models.values():
            left = max(0.0, deadline - time.monotonic())
            if not await asyncio.to_thread(m.batcher.wait_idle, left):
                return False
        return True

    async def close(self) -> None:
        self._draining = True
        for m in self.models.values():
            await asyncio.to_thread(m.close)
        self._host.shutdown(wait=False, cancel_futures=True)
