"""Thread pools for pixel work, split by size class, so small work never queues behind large work.

Decoding, encoding, padding and colour correction run off the event loop in threads. With one FIFO
pool of `cores` threads, a thumbnail's 3 ms PNG encode waited behind two 16-megapixel encodes of a
second or more each (measured in the peer benchmark: tiny-image p95 1.3–1.6 s where a hand-written
app, whose 40 threads the OS time-slices, answered in 0.1–0.2 s). Two pools of `workers` threads each
— work on at most `small_pixels` pixels, and the rest — let the OS share the cores between the two
classes: small work starts at once and runs at about half speed at worst, large work loses a little.
Within a class the order stays FIFO (the engine queue does the cost-aware scheduling).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: Work on up to this many pixels (output pixels for an encode) counts as small: every tiny and most
#: medium requests of the mixed traffic (≤ 2048² out), not the 5–16 MP large ones.
SMALL_PIXELS = 2048 * 2048


class SizeClassPool(Executor):
    def __init__(self, workers: int, prefix: str, small_pixels: int = SMALL_PIXELS) -> None:
        self.small_pixels = small_pixels
        self.small = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{prefix}-small")
        self.large = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{prefix}-large")

    def for_pixels(self, pixels: int) -> Executor:
        """The pool for work that touches `pixels` pixels."""
        return self.small if pixels <= self.small_pixels else self.large

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Work of unknown size goes with the large class (it may be large)."""
        return self.large.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for p in (self.small, self.large):
            p.shutdown(wait=wait, cancel_futures=cancel_futures)


def pool_for(pool: Executor, pixels: int) -> Executor:
    """`pool.for_pixels(pixels)` for a size-class pool, else the pool itself."""
    choose: Any = getattr(pool, "for_pixels", None)
    return choose(pixels) if choose is not None else pool


_band_pools: dict[int, ThreadPoolExecutor] = {}
_band_lock = threading.Lock()


def band_pool(threads: int) -> ThreadPoolExecutor:
    """The process-wide pool of `threads` threads for leaf work: the bands of one image, compressed in
    parallel (the GIL is released). Leaf tasks never wait on other tasks, so sharing it cannot deadlock;
    sized from the cores the container really has, it never runs more threads than there are cores."""
    with _band_lock:
        pool = _band_pools.get(threads)
        if pool is None:
            pool = _band_pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="gendr-band")
        return pool
