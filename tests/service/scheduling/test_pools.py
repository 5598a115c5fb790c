"""Pixel work by size class: small work runs while every large-class thread is busy."""

from __future__ import annotations

import threading

from service.scheduling.pools import SMALL_PIXELS, SizeClassPool, pool_for


def test_small_work_does_not_queue_behind_large_work() -> None:
    pool = SizeClassPool(2, "t")
    release = threading.Event()
    started = threading.Semaphore(0)

    def large() -> str:
        started.release()
        release.wait(30)
        return "large"

    big = [pool_for(pool, 16_000_000).submit(large) for _ in range(3)]  # 2 running, 1 queued
    for _ in range(2):
        assert started.acquire(timeout=30)
    small = pool_for(pool, 256 * 256).submit(lambda: "small")
    assert small.result(timeout=30) == "small"  # done while both large threads are still blocked
    assert not any(f.done() for f in big)
    release.set()
    assert [f.result(timeout=30) for f in big] == ["large"] * 3
    assert pool.for_pixels(SMALL_PIXELS) is pool.small and pool.for_pixels(SMALL_PIXELS + 1) is pool.large
    assert pool.submit(lambda: 1).result(timeout=30) == 1  # unknown size: the large class
    pool.shutdown()
