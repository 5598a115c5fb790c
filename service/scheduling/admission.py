"""Admission: the tile-unit account every request draws on before its image is decoded.

A unit is one primary tile's worth of computed pixels (overlap and padding included), so a tiny
image on a small bucket costs one unit and a large one what it computes. Policy, on purpose:
**equal-chance shedding** — a request is admitted when the backlog it finds is under the capacity,
whatever its own size (it may overshoot by itself; the per-request limit bounds that). So at overload
every size class sees the same share of 503s, instead of large requests being refused first because
they need more room (the accidental policy of "admit if it fits", measured at 9 % / 14 % / 34 % 503s
for tiny / medium / large at 150 % load). Memory stays bounded by capacity + one largest request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from service.errors import Overloaded, ServiceError
from service.metrics import Metrics
from service.scheduling.tickets import Reservation


class TileAccount:
    def __init__(
        self,
        model: str,
        *,
        capacity_tiles: int,
        rate: Callable[[], float],
        refuse: Callable[[bool], ServiceError | None],
        metrics: Metrics | None = None,
        max_retry_after_s: float = 600.0,
    ) -> None:
        self.model = model
        self.capacity_tiles = capacity_tiles
        self.max_retry_after_s = max_retry_after_s
        self._rate = rate  # measured units/s of all healthy instances
        self._refuse = refuse  # (new request?) → why no request can be admitted now (draining, …) or None
        self._metrics = metrics
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.reserved = 0
        self.reservations = 0

    def reserve(self, tiles: int, plan: object = None) -> Reservation:
        if tiles < 1:
            raise ValueError("a request has at least one tile")
        self._admit(tiles, new_request=True)
        return Reservation(self, tiles, plan)  # type: ignore[arg-type]

    def admit_more(self, tiles: int) -> None:
        """A reserved request needs more units than its header promised (Reservation.grow)."""
        self._admit(tiles, new_request=False)

    def give_back(self, tiles: int) -> None:
        """A request's reservation ends (Reservation.release, exactly once)."""
        with self._lock:
            self.reserved -= tiles
            self.reservations -= 1
            self._gauges()
            if self.reservations == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float | None) -> bool:
        """True once no reservation is held (every admitted request has finished)."""
        with self._lock:
            return self._idle.wait_for(lambda: self.reservations == 0, timeout_s)

    def refusal(self) -> ServiceError | None:
        """Why a new request would be refused now whatever its size, or None. Shedding is size-blind,
        so this is the answer before its body is read (a refused request then costs almost nothing)."""
        why = self._refuse(True)
        if why is not None:
            return why
        with self._lock:
            return self._full(1) if self.reserved >= self.capacity_tiles else None

    def _full(self, tiles: int) -> Overloaded:
        over = self.reserved - self.capacity_tiles + min(tiles, self.capacity_tiles)
        retry = min(self.max_retry_after_s, max(0.05, over / self._rate()))
        return Overloaded(
            f"queue full: {self.reserved}/{self.capacity_tiles} tile units in use, {tiles} asked",
            retry_after_s=retry,
        )

    def _admit(self, tiles: int, *, new_request: bool) -> None:
        why = self._refuse(new_request)
        if why is not None:
            raise why
        with self._lock:
            if self.reserved >= self.capacity_tiles:
                raise self._full(tiles)
            self.reserved += tiles
            if new_request:
                self.reservations += 1
            self._gauges()

    def _gauges(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_tiles.labels(self.model).set(self.reserved)
            self._metrics.queue_requests.labels(self.model).set(self.reservations)
