"""The tile batcher: one queue per model and tile shape, batches across requests, N engine instances.

Requests arrive as reflect-padded images plus a tile plan; their tiles are cut lazily (views into the
padded image) when a batch is formed, so the queue holds no tile copies. A free instance worker takes
a batch of up to the largest batch size, or fewer once the oldest waiting tile has waited
`max_queue_delay_s`, pads it to the next batch size the engine runs, and calls the engine. Outputs are
checked (count, shape, dtype) and handed to a completion thread that feeds each request's sink (the
stitcher), so the engine thread is back at work while the previous batch is being blended.

Scheduling is round-robin by batch quantum: a request contributes up to one batch of tiles, then goes
to the back of the queue. Small requests behind a 16-megapixel one therefore wait for a few batches,
not for the whole image.

Admission is counted in tiles (pixel cost): `reserve()` is called before a request's image is decoded
and raises Overloaded with a retry-after computed from the measured tiles/s. All state lives behind
one lock; engine calls run outside it and release the GIL.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.backends.base import Backend, check_output
from service.errors import DeadlineExceeded as DeadlineExceededError
from service.errors import Draining, EngineFailure, NotReady, Overloaded, ServiceError
from service.metrics import BusyMeter, Metrics
from service.tickets import Reservation, Sink, Ticket, TicketResult, TicketState
from service.tiling import TilePlan

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Instance:
    index: int
    healthy: bool = True
    failures: int = 0
    busy_since: float | None = None
    batches: int = 0
    meter: BusyMeter = field(default_factory=BusyMeter)
    thread: threading.Thread | None = None


_Entry = tuple[Ticket, list[int]]


class TileBatcher:
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
    ) -> None:
        info = backend.info
        self.backend = backend
        self.model = model
        self.metrics = metrics
        self._max_batch_setting = max_batch
        self._use_batch_sizes(info.batch_sizes)  # provisional: start() reads the loaded engine's
        self.max_queue_delay_s = max_queue_delay_s
        # Admitted work ends by its deadline at the latest: a longer Retry-After is never true.
        self.max_retry_after_s = max_retry_after_s
        self.retry_after_s = retry_after_s  # 503s with no estimate (draining, no healthy instance)
        self.capacity_tiles = capacity_tiles
        self.unhealthy_after = unhealthy_after
        self.stuck_after_s = stuck_after_s
        self.tile = backend.manifest.tile.tile
        self.out_tile = backend.manifest.tile.out_tile
        self._instances = [_Instance(i) for i in range(info.instances)]
        if completion_threads is None:
            completion_threads = 1 if info.instances == 1 else 2
        n_completion = completion_threads
        self._completion_threads: list[threading.Thread] = []
        self._n_completion = n_completion
        # bounded: a slow stitcher holds the engines back instead of piling up output tiles in memory
        self._completions: queue.Queue[tuple[list[_Entry], np.ndarray, float, int] | None] = queue.Queue(
            maxsize=2 * info.instances
        )
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # workers wait here for tiles
        self._idle = threading.Condition(self._lock)  # drain waits here for reservations to end
        self._queue: deque[Ticket] = deque()
        self._active: set[Ticket] = set()
        self._queued_tiles = 0
        self._reserved_tiles = 0
        self._reservations = 0
        self._next_id = 0
        self._draining = False
        self._closing = False
        self._started = False
        self._rate_per_instance: float | None = None  # tiles/s, EWMA over batches
        self._bufs: dict[int, np.ndarray] = {}
        if metrics is not None:
            for inst in self._instances:
                metrics.instance_busy.labels(model, str(inst.index)).set_function(inst.meter.ratio)

    # ------------------------------------------------------------------ lifecycle

    def _use_batch_sizes(self, offered: tuple[int, ...]) -> None:
        if not offered:
            raise ValueError(f"{self.model}: the backend offers no batch size")
        self.batch_sizes = tuple(sorted(b for b in offered if b <= self._max_batch_setting)) or (
            min(offered),
        )
        self.max_batch = self.batch_sizes[-1]

    def start(self, warmup_timings: dict[int, float] | None = None) -> None:
        """Start one worker thread per instance (+ completion threads). Timings seed the tiles/s estimate.

        Call after the backend's load(): the batch sizes are read again here, because an engine's
        real sizes (a TensorRT plan's profiles) are only known once it is loaded; padding to a size
        the engine refuses would fail every such batch.
        """
        if self._started:
            return
        self._use_batch_sizes(self.backend.info.batch_sizes)
        if warmup_timings:
            b = max(warmup_timings)
            self._rate_per_instance = b / max(warmup_timings[b], 1e-6)
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
        with self._lock:
            return self._idle.wait_for(lambda: self._reservations == 0, timeout_s)

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

    # ------------------------------------------------------------------ admission

    def reserve(self, tiles: int) -> Reservation:
        if tiles < 1:
            raise ValueError("a request has at least one tile")
        self._admit(tiles, new_request=True)
        return Reservation(self, tiles)

    def admit_more(self, tiles: int) -> None:
        """A reserved request needs more tiles than its header promised (Reservation.grow)."""
        self._admit(tiles, new_request=False)

    def give_back(self, tiles: int) -> None:
        """A request's reservation ends (Reservation.release, exactly once)."""
        self._release(tiles)

    def _admit(self, tiles: int, *, new_request: bool) -> None:
        with self._lock:
            if self._closing:
                raise Draining("the service is shutting down", retry_after_s=self.retry_after_s)
            if self._draining and new_request:
                raise Draining(
                    "the service is draining; retry on another replica", retry_after_s=self.retry_after_s
                )
            if not any(i.healthy for i in self._instances):
                raise NotReady("no healthy engine instance", retry_after_s=self.retry_after_s)
            # A request bigger than the whole capacity is admitted only into an empty queue.
            if self._reserved_tiles and self._reserved_tiles + tiles > self.capacity_tiles:
                need = (
                    (self._reserved_tiles + tiles - self.capacity_tiles)
                    if tiles <= self.capacity_tiles
                    else self._reserved_tiles
                )
                retry = min(self.max_retry_after_s, max(0.05, need / self._rate()))
                raise Overloaded(
                    f"queue full: {self._reserved_tiles}/{self.capacity_tiles} tiles in use, {tiles} asked",
                    retry_after_s=retry,
                )
            self._reserved_tiles += tiles
            if new_request:
                self._reservations += 1
            self._update_gauges()

    def _release(self, tiles: int) -> None:
        with self._lock:
            self._reserved_tiles -= tiles
            self._reservations -= 1
            self._update_gauges()
            if self._reservations == 0:
                self._idle.notify_all()

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_tiles.labels(self.model).set(self._reserved_tiles)
            self.metrics.queue_requests.labels(self.model).set(self._reservations)

    def _rate(self) -> float:
        """Measured tiles/s of all healthy instances (per-instance EWMA × healthy instances)."""
        per = self._rate_per_instance or 1.0
        return max(1e-3, per * max(1, sum(i.healthy for i in self._instances)))

    @property
    def tiles_per_s(self) -> float:
        with self._lock:
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
        if plan.tile != self.tile:
            raise ValueError(f"plan tile {plan.tile} but this queue serves {self.tile}")
        positions = tuple((y, x) for _, y, x in plan.positions())
        now = time.monotonic()
        with self._lock:
            if self._closing:
                raise Draining("the service is shutting down")
            self._next_id += 1
            t = Ticket(self._next_id, source, positions, plan.tile, deadline, admitted or now, sink)
            self._queue.append(t)
            self._active.add(t)
            self._queued_tiles += t.n_tiles
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
            self._queued_tiles -= t.unqueued
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
                "queued_tiles": self._queued_tiles,
                "queued_requests": len(self._queue),
                "active_requests": len(self._active),
                "reserved_tiles": self._reserved_tiles,
                "reservations": self._reservations,
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

    # ------------------------------------------------------------------ batch formation (lock held)

    def _next_batch(self, inst: _Instance) -> tuple[list[_Entry], int] | None:
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
                if self._queued_tiles == 0:
                    self._work.wait()
                    continue
                if self._queued_tiles < self.max_batch and not self._draining and self.max_queue_delay_s > 0:
                    oldest = min(t.submitted for t in self._queue)
                    wait = oldest + self.max_queue_delay_s - now
                    if wait > 0:
                        self._work.wait(wait)
                        continue
                return self._form(now)

    def _expire(self, now: float) -> list[Ticket]:
        dead = [t for t in self._queue if t.deadline <= now]
        for t in dead:
            t.state = TicketState.FAILED
            self._unlink(t)
        return dead

    def _form(self, now: float) -> tuple[list[_Entry], int]:
        entries: list[_Entry] = []
        n = 0
        while n < self.max_batch and self._queue:
            t = self._queue.popleft()
            k = min(self.max_batch - n, t.unqueued)
            entries.append((t, list(range(t.next, t.next + k))))
            t.next += k
            self._queued_tiles -= k
            n += k
            if t.started is None:
                t.started = now
                if self.metrics is not None:
                    self.metrics.queue_seconds.labels(self.model).observe(now - t.admitted)
            if t.unqueued:
                self._queue.append(t)  # round-robin: back of the queue after one quantum
        if self._queued_tiles and len(self._queue):
            self._work.notify()  # another free worker can take the rest
        return entries, n

    # ------------------------------------------------------------------ workers

    def _buffer(self, inst: _Instance, bs: int) -> np.ndarray:
        own = self.backend.input_buffer(inst.index, bs)
        if own is not None:
            return own
        buf = self._bufs.get(inst.index)
        if buf is None:
            buf = self._bufs[inst.index] = np.empty((self.max_batch, self.tile, self.tile, 3), np.uint8)
        return buf[:bs]

    def _worker(self, inst: _Instance) -> None:
        t_ = self.tile
        while True:
            job = self._next_batch(inst)
            if job is None:
                return
            entries, n = job
            bs = next(b for b in self.batch_sizes if b >= n)
            try:
                x = self._buffer(inst, bs)
                k = 0
                for t, idx in entries:
                    src = t.source
                    for i in idx:
                        y0, x0 = t.positions[i]
                        x[k] = src[y0 : y0 + t_, x0 : x0 + t_]
                        k += 1
                if bs > n:
                    x[n:] = 0
            except Exception as e:  # a malformed request: fail it, not the instance
                log.exception("%s: could not gather a batch", self.model)
                msg = f"could not prepare tiles: {type(e).__name__}"
                self._fail([t for t, _ in entries], functools.partial(EngineFailure, msg))
                continue
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
            dt = t1 - t0
            with self._lock:
                inst.failures = 0
                r = n / max(dt, 1e-6)
                self._rate_per_instance = (
                    r if self._rate_per_instance is None else 0.8 * self._rate_per_instance + 0.2 * r
                )
            if self.metrics is not None:
                self.metrics.batch_size.labels(self.model).observe(n)
                self.metrics.compute_seconds.labels(self.model).observe(dt)
                self.metrics.tiles.labels(self.model).inc(n)
            if self._n_completion:
                self._completions.put((entries, y, dt, n))
            else:  # inline: CPU engines already use every core, a hand-off would only add switches
                self._complete(entries, y, dt, n)

    def _on_failure(self, inst: _Instance, entries: list[_Entry], err: BaseException) -> None:
        with self._lock:
            inst.failures += 1
            broken = inst.failures >= self.unhealthy_after
            if broken:
                inst.healthy = False
            none_left = not any(i.healthy for i in self._instances)
            rest = list(self._active) if none_left else []
        log.error(
            "%s: batch of %d tile(s) failed on instance %d (%d in a row): %s: %s",
            self.model,
            sum(len(i) for _, i in entries),
            inst.index,
            inst.failures,
            type(err).__name__,
            err,
        )
        if broken:
            log.error(
                "%s: instance %d marked unhealthy after %d consecutive failures",
                self.model,
                inst.index,
                inst.failures,
            )
        self._fail(
            [t for t, _ in entries],
            lambda: EngineFailure("inference failed for a batch holding this request"),
        )
        if rest:
            self._fail(rest, lambda: EngineFailure("no healthy engine instance left"))

    def _completion_loop(self) -> None:
        while True:
            item = self._completions.get()
            if item is None:
                return
            self._complete(*item)

    def _complete(self, entries: list[_Entry], y: np.ndarray, dt: float, n: int) -> None:
        k = 0
        for t, idx in entries:
            self._deliver(t, idx, y[k : k + len(idx)], dt * len(idx) / n)
            k += len(idx)

    def _deliver(self, t: Ticket, idx: list[int], tiles: np.ndarray, compute_s: float) -> None:
        with t.sink_lock:
            if t.state is not TicketState.ACTIVE:
                return  # cancelled, expired or failed meanwhile: discard
            try:
                t.sink(idx, tiles)
            except Exception as e:
                log.exception("%s: request sink failed", self.model)
                name = type(e).__name__
                self._fail([t], lambda: EngineFailure(f"could not assemble the result: {name}"))
                return
        finished = False
        with self._lock:
            t.done += len(idx)
            t.compute_s += compute_s
            if t.done == t.n_tiles and t.state is TicketState.ACTIVE:
                t.state = TicketState.DONE
                self._active.discard(t)
                finished = True
        if finished:
            assert t.started is not None
            t.future.set_result(TicketResult(t.n_tiles, t.started, t.compute_s))
