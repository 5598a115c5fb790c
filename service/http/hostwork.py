"""Host work of /upscale around the engine: each stage's CPU time counted, encodes fanned out to the
band pool, and the refusal a request gets before its body is read.

Why: on a GPU node the host's pixel work, not the engine, sets how many CPUs a pod needs per GPU;
`gendr_host_cpu_seconds_total{stage}` says where that CPU goes (benchmarks/host_pipeline.py reads it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from service.errors import ServiceError
from service.hardware import available_cpus
from service.http import images
from service.metrics import Metrics
from service.runtime_api import RuntimeClient
from service.scheduling.pools import band_pool
from service.settings import Settings

T = TypeVar("T")


def timed(metrics: Metrics, stage: str, fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` whose thread CPU time is added to the host-work metric under `stage`."""

    def run(*args: Any, **kw: Any) -> T:
        c0 = time.thread_time()
        try:
            return fn(*args, **kw)
        finally:
            metrics.host_cpu(stage, time.thread_time() - c0)

    return run


def refused_unread(runtime: RuntimeClient, model: str | None, shared_store: bool) -> ServiceError | None:
    """The refusal a request gets whatever its body holds (a full backlog, loading, draining), asked
    before reading it. Only when the model is known without the body (named in the query, or the only
    one served: a form field could name another), and not for the shared job store (its own backlog)."""
    if shared_store or (model is None and len(runtime.models) != 1):
        return None
    check: Callable[[], ServiceError | None] | None = getattr(runtime.get(model), "refusal", None)
    return check() if check is not None else None


def encode_timed(
    metrics: Metrics,
    s: Settings,
    image: Any,
    decoded: images.Decoded,
    fmt: str,
    quality: int,
    png_level: int,
    metadata: str,
) -> bytes:
    """images.encode with a PNG's bands compressed in parallel on the band pool (sized from the
    container's CPUs), and the CPU time of every thread it used counted as `encode`."""
    threads = s.encode_threads or available_cpus()
    extra: list[float] = []
    c0 = time.thread_time()
    try:
        return images.encode(
            image, decoded, fmt, quality, png_level, metadata, band_pool(threads), threads, extra.append
        )
    finally:
        metrics.host_cpu("encode", time.thread_time() - c0 + sum(extra))
