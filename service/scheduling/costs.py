"""The measured cost table: seconds per engine call by input shape and batch size.

Warm-up times every (tile, batch) a backend serves (and a few whole-image sizes on a dynamic graph);
each real batch then updates its entry (EWMA), so the table follows the device as it warms, throttles
or shares. The planner picks tile shapes by it, the batcher picks batch sizes by it, and admission
turns it into a Retry-After. Shapes nobody measured are estimated from a line a + b·pixels fitted to
the batch-1 entries (a CNN's cost is about linear in pixels; for static tiles it is only a fallback).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

Shape = tuple[int, int]  # (height, width) of one engine input

#: Weight of a new measurement in an entry (the rest is the entry's history).
EWMA = 0.2
#: Entries at most: whole-image shapes are the client's sizes, so new ones stop being added here (the
#: line through the batch-1 entries keeps estimating them).
MAX_ENTRIES = 256


class CostTable:
    def __init__(self, timings: Mapping[tuple[int, int, int], float], batch_sizes: tuple[int, ...]) -> None:
        if not batch_sizes:
            raise ValueError("a cost table needs the batch sizes the engine runs")
        self.batch_sizes = tuple(sorted(batch_sizes))
        self._lock = threading.Lock()
        self._calls: dict[tuple[int, int, int], float] = {k: max(float(v), 1e-6) for k, v in timings.items()}
        self._fit = self._fit_line()

    # ------------------------------------------------------------------ measurements

    def observe(self, h: int, w: int, batch: int, seconds: float) -> None:
        """One real call: fold it into its entry (a new shape gets an entry of its own)."""
        key = (h, w, batch)
        with self._lock:
            old = self._calls.get(key)
            if old is None and len(self._calls) >= MAX_ENTRIES:
                return
            self._calls[key] = seconds if old is None else (1 - EWMA) * old + EWMA * seconds
            if batch == 1 and old is None:
                self._fit = self._fit_line()

    def _fit_line(self) -> tuple[float, float]:
        """Least-squares a + b·pixels over the batch-1 entries (a, b ≥ 0); one point: all in b."""
        pts = [(h * w, s) for (h, w, b), s in self._calls.items() if b == 1]
        if not pts:
            pts = [(h * w * b, s) for (h, w, b), s in self._calls.items()]
        if not pts:
            return 0.0, 1e-6
        if len({p for p, _ in pts}) < 2:
            p, s = max(pts)
            return 0.0, s / max(p, 1)
        n = len(pts)
        mx = sum(p for p, _ in pts) / n
        my = sum(s for _, s in pts) / n
        var = sum((p - mx) ** 2 for p, _ in pts)
        b = max(0.0, sum((p - mx) * (s - my) for p, s in pts) / var)
        a = max(0.0, my - b * mx)
        return a, max(b, 1e-12)

    # ------------------------------------------------------------------ estimates

    def call_s(self, h: int, w: int, batch: int) -> float:
        """Seconds of one call: the measured entry, else the line's estimate."""
        with self._lock:
            s = self._calls.get((h, w, batch))
            if s is not None:
                return s
            a, b = self._fit
        return a + b * h * w * batch

    def batch_for(self, h: int, w: int, n: int) -> tuple[int, int]:
        """(tiles to take, batch size to run) for `n` waiting tiles of one shape (n ≤ the largest size).

        Either all `n`, padded up to the next size the engine runs, or the largest size without
        padding (the rest waits for the next call, maybe with company): the second only when it is
        clearly cheaper per useful tile (5 % and half a millisecond in all) — 5 tiles on sizes 1,2,4,8
        of a + b·n with a = 15 ms, b = 4 ms run as 4 (7.8 ms/tile), not as a padded 8 (9.4 ms/tile).
        """
        up = next((b for b in self.batch_sizes if b >= n), self.batch_sizes[-1])
        k_up = min(n, up)
        down = max((b for b in self.batch_sizes if b <= n), default=None)
        if down is None or down >= k_up:
            return k_up, up
        per_up = self.call_s(h, w, up) / k_up
        per_down = self.call_s(h, w, down) / down
        if per_down < 0.95 * per_up and (per_up - per_down) * down > 5e-4:
            return down, down
        return k_up, up

    def request_s(self, h: int, w: int, n: int, max_batch: int | None = None) -> float:
        """Engine seconds for `n` tiles of one shape run alone: full batches, then the remainder."""
        sizes = [b for b in self.batch_sizes if max_batch is None or b <= max_batch] or [self.batch_sizes[0]]
        top = sizes[-1]
        full, rest = divmod(n, top)
        total = full * self.call_s(h, w, top)
        if rest:
            total += min(self.call_s(h, w, b) * math.ceil(rest / b) for b in sizes if b >= rest or b == top)
        return total

    def per_tile_s(self, h: int, w: int) -> float:
        """Engine seconds per tile at the most efficient batch size (the throughput view)."""
        return min(self.call_s(h, w, b) / b for b in self.batch_sizes)

    def entries(self) -> list[tuple[int, int, int]]:
        """The measured (height, width, batch) entries."""
        with self._lock:
            return sorted(self._calls)

    def rows(self) -> list[dict[str, float | int]]:
        """The table as rows (for /v1/models and the metrics)."""
        with self._lock:
            items = sorted(self._calls.items())
        return [{"height": h, "width": w, "batch": b, "seconds": round(s, 6)} for (h, w, b), s in items]
