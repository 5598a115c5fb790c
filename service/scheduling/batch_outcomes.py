"""What happens to a batch after its engine call: outputs to their requests' sinks (stitchers), a
failure to the requests in that batch only, an instance marked unhealthy after repeated failures."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.errors import EngineFailure, ServiceError
from service.metrics import BusyMeter, Metrics
from service.scheduling.costs import CostTable
from service.scheduling.lanes import Entry
from service.scheduling.tickets import Ticket, TicketResult, TicketState

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Instance:
    index: int
    healthy: bool = True
    failures: int = 0
    busy_since: float | None = None
    batches: int = 0
    meter: BusyMeter = field(default_factory=BusyMeter)
    thread: threading.Thread | None = None


class BatchOutcomes:
    """The batcher's delivery half (a mixin: it shares the batcher's lock and books)."""

    model: str
    tile: int
    tiles: tuple[int, ...]
    costs: CostTable | None
    metrics: Metrics | None
    _rate_per_instance: float | None
    unhealthy_after: int
    _lock: threading.Lock
    _active: set[Ticket]
    _instances: list[Instance]
    _completions: queue.Queue[tuple[list[Entry], np.ndarray, float, int] | None]

    def _fail(self, tickets: Sequence[Ticket], error: Callable[[], ServiceError]) -> None:
        raise NotImplementedError

    def _measured(self, inst: Instance, shape: tuple[int, ...], n: int, dt: float) -> None:
        bs, th, tw = shape[0], shape[1], shape[2]
        if self.costs is not None:
            self.costs.observe(th, tw, bs, dt)  # the gauge reads the table at scrape time
        units = n * th * tw / (self.tile * self.tile)
        with self._lock:
            inst.failures = 0
            r = units / max(dt, 1e-6)
            self._rate_per_instance = (
                r if self._rate_per_instance is None else 0.8 * self._rate_per_instance + 0.2 * r
            )
        if self.metrics is not None:
            self.metrics.batch_size.labels(self.model).observe(n)
            self.metrics.compute_seconds.labels(self.model).observe(dt)
            self.metrics.tiles.labels(self.model).inc(n)

    def _on_failure(self, inst: Instance, entries: list[Entry], err: BaseException) -> None:
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

    def _complete(self, entries: list[Entry], y: np.ndarray, dt: float, n: int) -> None:
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
