"""A request's life in the batcher: its ticket (tiles, deadline, sink, future) and its reservation
(the tiles it was admitted for, given back exactly once)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import numpy as np

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
    tile: int
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
    sink_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def n_tiles(self) -> int:
        return len(self.positions)

    @property
    def unqueued(self) -> int:
        return self.n_tiles - self.next


class Admission(Protocol):
    """What a reservation draws on: the batcher's tile account (admit more, give back)."""

    def admit_more(self, tiles: int) -> None: ...

    def give_back(self, tiles: int) -> None: ...


class Reservation:
    """Admitted tiles of one request. release() is idempotent and thread-safe."""

    def __init__(self, batcher: Admission, tiles: int) -> None:
        self._batcher = batcher
        self.tiles = tiles
        self.created = time.monotonic()
        self._released = False
        self._lock = threading.Lock()

    @property
    def released(self) -> bool:
        return self._released

    @property
    def owner(self) -> Admission:
        return self._batcher

    def grow(self, extra: int) -> None:
        """Admit `extra` more tiles (the decoded image needed more than its header promised)."""
        if extra <= 0:
            return
        with self._lock:
            if self._released:
                raise RuntimeError("reservation already released")
            self._batcher.admit_more(extra)
            self.tiles += extra

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._batcher.give_back(self.tiles)
