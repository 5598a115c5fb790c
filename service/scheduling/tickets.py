"""A request's life in the batcher: its ticket (tiles, deadline, sink, future) and its reservation
(the tile units it was admitted for, bound to its plan, given back exactly once)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from service.pixels.pipeline import RequestPlan

Sink = Callable[[Sequence[int], np.ndarray], None]


class TicketState(Enum):
    ACTIVE = "active"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class TicketResult:
    tiles: int
    started: float  # monotonic time the first tile's batch was formed
    compute_s: float  # this request's share of the engine time of the batches it was in


@dataclass(eq=False)
class Ticket:
    """One request's tiles in the queue. The runtime awaits `future` and cancels through the batcher."""

    id: int
    source: np.ndarray  # reflect-padded input, HWC uint8
    positions: tuple[tuple[int, int], ...]  # (y, x) of each tile in `source`
    shape: tuple[int, int]  # (height, width) of every tile: the engine input shape (its queue lane)
    deadline: float
    admitted: float
    sink: Sink
    submitted: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future[TicketResult] = field(default_factory=concurrent.futures.Future)
    state: TicketState = TicketState.ACTIVE
    next: int = 0  # first tile not yet handed to a batch
    done: int = 0
    started: float | None = None
    compute_s: float = 0.0
    tile_cost_s: float = 0.0  # estimated engine seconds per tile at its shape (scheduling)
    sink_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def n_tiles(self) -> int:
        return len(self.positions)

    @property
    def unqueued(self) -> int:
        return self.n_tiles - self.next

    @property
    def whole(self) -> bool:
        """One tile covering the whole padded source: the engine can read the source itself."""
        return self.n_tiles == 1 and self.source.shape[:2] == self.shape


class Admission(Protocol):
    """What a reservation draws on: the batcher's tile account (admit more, give back)."""

    def admit_more(self, tiles: int) -> None: ...

    def give_back(self, tiles: int) -> None: ...


class Reservation:
    """Admitted tile units of one request, bound to the plan they were computed from (so the plan is
    computed once). release() is idempotent and thread-safe; as a context manager it releases on exit
    unless `hand_over()` passed it to a new owner (a background job), which then releases it."""

    def __init__(self, batcher: Admission, tiles: int, plan: RequestPlan | None = None) -> None:
        self._batcher = batcher
        self.tiles = tiles
        self.plan = plan
        self.created = time.monotonic()
        self._released = False
        self._handed = False
        self._lock = threading.Lock()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._handed:
            self.release()

    def hand_over(self) -> Reservation:
        """The caller's `with` block no longer releases it; the new owner must."""
        self._handed = True
        return self

    @property
    def released(self) -> bool:
        return self._released

    @property
    def owner(self) -> Admission:
        return self._batcher

    def grow(self, extra: int) -> None:
        """Admit `extra` more units (the decoded image needed more than its header promised)."""
        if extra <= 0:
            return
        with self._lock:
            if self._released:
                raise RuntimeError("reservation already released")
            self._batcher.admit_more(extra)
            self.tiles += extra

    def rebind(self, plan: RequestPlan) -> None:
        """The decoded image's plan replaces the header's (admitting the difference first)."""
        self.grow(plan.units - self.tiles)
        self.plan = plan

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._batcher.give_back(self.tiles)
