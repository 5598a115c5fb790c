"""The tile batcher: one queue lane per engine input shape, batches across requests, N engine instances.

Requests arrive as reflect-padded images plus a tile plan whose tiles all have one shape (a static
tile bucket, or a whole-image / dynamic rectangle); their tiles are cut lazily (views into the padded
image) when a batch is formed, so the queue holds no tile copies. Each lane holds the requests of one
shape, so every engine call is static-shape.

Scheduling is shortest-remaining-work with aging: a free instance serves the request with the least
`submitted + AGING × remaining engine seconds` (from the measured cost table), filling the batch with
the next requests of the same lane. A tiny request therefore waits for about one engine call whatever
is queued, and a large one can be passed over only until it has waited AGING × its remaining work.
Batch size comes from the same table (the size with the least cost per useful tile). Outputs are
checked (count, shape, dtype) and handed to a completion thread that feeds each request's sink (the
stitcher), so the engine thread is back at work while the previous batch is being blended.

Admission (service/scheduling/admission.py) is counted in tile units before a request's image is decoded. All
queue state lives behind one lock; engine calls run outside it and release the GIL.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from service.backends.base import Backend, Timings, check_output, served_tiles
from service.errors import DeadlineExceeded as DeadlineExceededError
from service.errors import Draining, EngineFailure, NotReady, ServiceError
from service.metrics import Metrics
from service.pixels.tiling import TilePlan
from service.scheduling.admission import TileAccount
from service.scheduling.batch_outcomes import BatchOutcomes, Instance
from service.scheduling.costs import CostTable
from service.scheduling.gather import TileGatherer
from service.scheduling.lanes import AGING, Entry, next_batch_plan, take
from service.scheduling.tickets import Reservation, Sink, Ticket, TicketState

log = logging.getLogger(__name__)


class TileBatcher(BatchOutcomes):
    def __init__(
        self,
        backend: Backend,
        *,
        model: str,
        metrics: Metrics | None = None,
        max_batch: int = 4,
        max_queue_delay_s: float = 0.002,
        capacity_tiles: int = 512,
        unhealthy_after: int = 3,
        stuck_after_s: float = 600.0,
        completion_threads: int | None = None,
        max_retry_after_s: float = 600.0,
        retry_after_s: float = 5.0,
        work_weight: float = AGING,
    ) -> None:
        info = backend.info
        self.backend = backend
        self.model = model
        self.metrics = metrics
        self._max_batch_setting = max_batch
        self._use_backend_shapes()  # provisional: start() reads the loaded engine's
        self.max_queue_delay_s = max_queue_delay_s
        self.retry_after_s = retry_after_s  # 503s with no estimate (draining, no healthy instance)
        self.work_weight = work_weight  # scheduling: seconds of waiting one second of remaining work is worth
        self.unhealthy_after = unhealthy_after
        self.stuck_after_s = stuck_after_s
        self.tile = backend.manifest.tile.tile  # the primary tile: one admission unit
        self._instances = [Instance(i) for i in range(info.instances)]
        if completion_threads is None:
            completion_threads = 1 if info.instances == 1 else 2
        self._n_completion = completion_threads
        self._completion_threads: list[threading.Thread] = []
        # bounded: a slow stitcher holds the engines back instead of piling up output tiles in memory
        self._completions: queue.Queue[tuple[list[Entry], np.ndarray, float, int] | None] = queue.Queue(
            maxsize=2 * info.instances
        )
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # workers wait here for tiles
        self._queue: list[Ticket] = []  # tickets with tiles not yet handed to a batch
        self._active: set[Ticket] = set()
        self._next_id = 0
        self._draining = False
        self._closing = False
        self._started = False
        self._rate_per_instance: float | None = None  # tile units/s, EWMA over batches
        self.costs: CostTable | None = None
        self.account = TileAccount(
            model,
            capacity_tiles=capacity_tiles,
            rate=self._rate,
            refuse=self._refusal,
            metrics=metrics,
            max_retry_after_s=max_retry_after_s,
        )
        if metrics is not None:
            for inst in self._instances:
                metrics.instance_busy.labels(model, str(inst.index)).set_function(inst.meter.ratio)

    # ------------------------------------------------------------------ lifecycle

    def _use_backend_shapes(self) -> None:
        info = self.backend.info
        offered = info.batch_sizes
        if not offered:
            raise ValueError(f"{self.model}: the backend offers no batch size")
        self.batch_sizes = tuple(sorted(b for b in offered if b <= self._max_batch_setting)) or (
            min(offered),
        )
        self.max_batch = self.batch_sizes[-1]
        self.tiles = served_tiles(info, self.backend.manifest)
        self.dynamic = info.dynamic
        self._gatherer = TileGatherer(self.backend, self.tiles, self.max_batch)

    def start(self, warmup_timings: Timings | None = None) -> None:
        """Start one worker thread per instance (+ completion threads); the timings are the cost table.

        Call after the backend's load(): shapes and batch sizes are read again here, because an
        engine's real ones (a TensorRT plan's profiles and buckets) are only known once it is loaded;
        padding to a size the engine refuses would fail every such batch.
        """
        if self._started:
            return
        self._use_backend_shapes()
        if warmup_timings:
            self.costs = CostTable(warmup_timings, self.batch_sizes)
            t = self.tile
            self._rate_per_instance = 1.0 / max(self.costs.per_tile_s(t, t), 1e-6)
        for inst in self._instances:
            inst.thread = threading.Thread(
                target=self._worker, args=(inst,), name=f"{self.model}-engine-{inst.index}", daemon=True
            )
            inst.thread.start()
        for i in range(self._n_completion):
            t = threading.Thread(target=self._completion_loop, name=f"{self.model}-stitch-{i}", daemon=True)
            t.start()
            self._completion_threads.append(t)
        self._started = True

    def start_drain(self) -> None:
        with self._lock:
            self._draining = True
            self._work.notify_all()  # partial batches stop waiting for company

    def wait_idle(self, timeout_s: float | None) -> bool:
        """True once no reservation is held (every admitted request has finished)."""
        return self.account.wait_idle(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the workers; requests still queued or running fail with Draining."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._draining = True
            left = list(self._active)
            self._work.notify_all()
        self._fail(left, lambda: Draining("the service is shutting down"))
        deadline = time.monotonic() + timeout_s
        for inst in self._instances:
            if inst.thread is not None:
                inst.thread.join(max(0.0, deadline - time.monotonic()))
                if inst.thread.is_alive():
                    log.warning(
                        "%s: engine instance %d did not stop (stuck in an engine call)",
                        self.model,
                        inst.index,
                    )
        for _ in self._completion_threads:
            try:
                self._completions.put(None, timeout=max(0.01, deadline - time.monotonic()))
            except queue.Full:
                break
        for t in self._completion_threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ admission (scheduling/admission.py)

    def reserve(self, tiles: int, plan: object = None) -> Reservation:
        return self.account.reserve(tiles, plan)

    def admit_more(self, tiles: int) -> None:
        self.account.admit_more(tiles)

    def give_back(self, tiles: int) -> None:
        self.account.give_back(tiles)

    @property
    def capacity_tiles(self) -> int:
        return self.account.capacity_tiles

    def _refusal(self, new_request: bool) -> ServiceError | None:
        if self._closing:
            return Draining("the service is shutting down", retry_after_s=self.retry_after_s)
        if self._draining and new_request:
            return Draining(
                "the service is draining; retry on another replica", retry_after_s=self.retry_after_s
            )
        if not any(i.healthy for i in self._instances):
            return NotReady("no healthy engine instance", retry_after_s=self.retry_after_s)
        return None

    def _rate(self) -> float:
        """Measured tile units/s of all healthy instances (per-instance EWMA × healthy instances)."""
        per = self._rate_per_instance or 1.0
        return max(1e-3, per * max(1, sum(i.healthy for i in self._instances)))

    @property
    def tiles_per_s(self) -> float:
        return self._rate()

    # ------------------------------------------------------------------ requests

    def submit(
        self,
        source: np.ndarray,
        plan: TilePlan,
        deadline: float,
        sink: Sink,
        admitted: float | None = None,
    ) -> Ticket:
        """Queue every tile of one prepared request. `sink(indices, tiles)` gets outputs in batches."""
        if source.shape[:2] != (plan.padded_h, plan.padded_w) or source.dtype != np.uint8:
            raise ValueError(f"source {source.shape} {source.dtype} does not match the plan's padded size")
        th, tw = plan.shape
        if not ((th == tw and th in self.tiles) or self.dynamic):
            raise ValueError(f"plan tiles are {tw}×{th}; this engine runs tiles {self.tiles}")
        positions = tuple((y, x) for _, y, x in plan.positions())
        cost = self.costs.call_s(th, tw, 1) if self.costs is not None else 0.0
        if self.costs is not None and th == tw and th in self.tiles:
            cost = self.costs.per_tile_s(th, tw)
        now = time.monotonic()
        with self._lock:
            if self._closing:
                raise Draining("the service is shutting down")
            self._next_id += 1
            t = Ticket(self._next_id, source, positions, (th, tw), deadline, admitted or now, sink)
            t.tile_cost_s = cost
            self._queue.append(t)
            self._active.add(t)
            self._work.notify()
        return t

    def cancel(self, ticket: Ticket) -> None:
        """Drop the request's unrun tiles; outputs of tiles already running are discarded."""
        with self._lock:
            if ticket.state is not TicketState.ACTIVE:
                return
            ticket.state = TicketState.CANCELLED
            self._unlink(ticket)
        ticket.future.cancel()

    def _unlink(self, t: Ticket) -> None:
        """Remove a ticket that is no longer ACTIVE from the queue and the books. Lock held."""
        if t.unqueued:
            self._queue.remove(t)
            t.next = t.n_tiles
        self._active.discard(t)

    def _fail(self, tickets: Sequence[Ticket], error: Callable[[], ServiceError]) -> None:
        failed = []
        with self._lock:
            for t in tickets:
                if t.state is TicketState.ACTIVE:
                    t.state = TicketState.FAILED
                    self._unlink(t)
                    failed.append(t)
        for t in failed:
            t.future.set_exception(error())

    # ------------------------------------------------------------------ stats for tests / metrics

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "queued_tiles": sum(t.unqueued for t in self._queue),
                "queued_requests": len(self._queue),
                "active_requests": len(self._active),
                "reserved_tiles": self.account.reserved,
                "reservations": self.account.reservations,
                "tiles_per_s": self._rate(),
                "instances": [
                    {
                        "index": i.index,
                        "healthy": i.healthy,
                        "failures": i.failures,
                        "batches": i.batches,
                        "busy_ratio": round(i.meter.ratio(), 3),
                    }
                    for i in self._instances
                ],
            }

    @property
    def healthy(self) -> bool:
        now = time.monotonic()
        with self._lock:
            for i in self._instances:
                if not i.healthy:
                    return False
                if i.busy_since is not None and now - i.busy_since > self.stuck_after_s:
                    return False
        return self.backend.healthy()

    @property
    def draining(self) -> bool:
        return self._draining

    # ------------------------------------------------------------------ batch formation

    def _next_batch(self, inst: Instance) -> tuple[list[Entry], int, int] | None:
        """(entries, tiles, batch size) for a free instance; blocks until there is work."""
        with self._lock:
            while True:
                if self._closing or not inst.healthy:
                    return None
                now = time.monotonic()
                expired = self._expire(now)
                if expired:
                    self._lock.release()
                    try:
                        for t in expired:
                            t.future.set_exception(DeadlineExceededError("deadline passed while queued"))
                    finally:
                        self._lock.acquire()
                    continue
                if not self._queue:
                    self._work.wait()
                    continue
                delay = 0.0 if self._draining else self.max_queue_delay_s
                choice = next_batch_plan(
                    self._queue, now, self.costs, self.batch_sizes, self.tiles, delay, self.work_weight
                )
                if choice.wait_s > 0:
                    self._work.wait(choice.wait_s)
                    continue
                entries, n = take(self._queue, choice)
                for t, _ in entries:
                    if t.started is None:
                        t.started = now
                        if self.metrics is not None:
                            self.metrics.queue_seconds.labels(self.model).observe(now - t.admitted)
                if self._queue:
                    self._work.notify()  # another free worker can take the rest
                return entries, n, choice.batch

    def _expire(self, now: float) -> list[Ticket]:
        dead = [t for t in self._queue if t.deadline <= now]
        for t in dead:
            t.state = TicketState.FAILED
            self._unlink(t)
        return dead

    # ------------------------------------------------------------------ workers

    def _worker(self, inst: Instance) -> None:
        while True:
            job = self._next_batch(inst)
            if job is None:
                return
            entries, n, bs = job
            c0 = time.thread_time()
            try:
                x = self._gatherer.gather(inst.index, entries, n, bs)
            except Exception as e:  # a malformed request: fail it, not the instance
                log.exception("%s: could not gather a batch", self.model)
                msg = f"could not prepare tiles: {type(e).__name__}"
                self._fail([t for t, _ in entries], functools.partial(EngineFailure, msg))
                continue
            if self.metrics is not None:
                self.metrics.host_cpu("gather", time.thread_time() - c0)
            t0 = time.monotonic()
            inst.busy_since = t0
            inst.meter.start(t0)
            err: BaseException | None = None
            try:
                y = check_output(self.backend.manifest, x, self.backend.infer(inst.index, x))
            except Exception as e:  # one failing batch fails only its own requests
                err = e
            t1 = time.monotonic()
            inst.meter.stop(t1)
            inst.busy_since = None
            inst.batches += 1
            if err is not None:
                self._on_failure(inst, entries, err)
                continue
            self._measured(inst, x.shape, n, t1 - t0)
            if self._n_completion:
                self._completions.put((entries, y, t1 - t0, n))
            else:  # inline: CPU engines already use every core, a hand-off would only add switches
                self._complete(entries, y, t1 - t0, n)
