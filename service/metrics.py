"""Prometheus metrics (names are a contract: the Grafana dashboard, HPA rule and alerts use them).

Each app gets its own CollectorRegistry so tests can build many apps in one process.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.hardware import NvmlReader

log = logging.getLogger(__name__)

# Latency buckets from 5 ms to 10 min: tiles on CPU take seconds, on an H100 milliseconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Jobs wait and run from 10 ms (a GPU, empty queue) to hours (a CPU behind a long shared backlog).
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "gendr_requests", "Finished /upscale requests.", ["model", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "gendr_request_duration_seconds",
            "Whole request time.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "gendr_queue_duration_seconds",
            "Time tiles waited before their first batch ran.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "gendr_compute_duration_seconds",
            "Engine time per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "gendr_decode_duration_seconds", "Image decode time.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.encode_seconds = Histogram(
            "gendr_encode_duration_seconds", "Image encode time.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "gendr_batch_size", "Tiles per engine call.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.tile_occupancy = Histogram(
            "gendr_tile_occupancy_ratio",
            "Share of a tile's pixels that are image, not padding.",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.queue_tiles = Gauge(
            "gendr_queue_depth_tiles", "Admitted, unfinished tiles.", ["model"], registry=r
        )
        self.queue_requests = Gauge(
            "gendr_queue_depth_requests", "Admitted, unfinished requests.", ["model"], registry=r
        )
        self.output_megapixels = Counter(
            "gendr_output_megapixels", "Output megapixels produced (rate() = MP/s).", ["model"], registry=r
        )
        self.tiles = Counter("gendr_tiles", "Tiles computed.", ["model"], registry=r)
        self.call_cost = Gauge(
            "gendr_engine_call_seconds",
            "Measured seconds per engine call by input shape and batch size (the planner's cost table).",
            ["model", "shape", "batch"],
            registry=r,
        )
        self.plan_shape = Counter(
            "gendr_plan_shape",
            "Requests by the engine input shape the planner chose (HxW; 'dynamic' for whole images).",
            ["model", "shape"],
            registry=r,
        )
        self.key_megapixels = Counter(
            "gendr_key_output_megapixels",
            "Output megapixels asked for, by API key name (the name from the keys file, never the token).",
            ["key"],
            registry=r,
        )
        self.key_rate_limited = Counter(
            "gendr_key_rate_limited",
            "Requests refused 429 by the key's quota, by key name.",
            ["key"],
            registry=r,
        )
        self.jobs_backlog_tiles = Gauge(
            "gendr_jobs_backlog_tiles",
            "Shared job store: remaining tiles of queued and running jobs (every replica reports the same).",
            ["model"],
            registry=r,
        )
        self.jobs_backlog_jobs = Gauge(
            "gendr_jobs_backlog_jobs",
            "Shared job store: entries in the model's stream (not yet read + pending), as KEDA counts them.",
            ["model"],
            registry=r,
        )
        # Jobs (/v1/jobs, both stores): each recorded by the replica where it happens (docs/jobs.md).
        self.jobs_created = Counter(
            "gendr_jobs_created",
            "Jobs admitted by POST /v1/jobs (not idempotent repeats).",
            ["model"],
            registry=r,
        )
        self.jobs_finished = Counter(
            "gendr_jobs_finished",
            "Jobs that reached a final state (succeeded, failed, cancelled).",
            ["model", "state"],
            registry=r,
        )
        self.job_queue_seconds = Histogram(
            "gendr_job_queue_seconds",
            "Job admission to its first tile done (jobs that never started are not observed).",
            ["model"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.job_run_seconds = Histogram(
            "gendr_job_run_seconds",
            "Job first tile done to its final state (result stored or failed).",
            ["model"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.instance_busy = Gauge(
            "gendr_instance_busy_ratio",
            "Share of the last window an engine instance was computing.",
            ["model", "instance"],
            registry=r,
        )
        self.gpu_memory_used = Gauge(
            "gendr_gpu_memory_used_bytes", "GPU memory in use (NVML).", ["gpu"], registry=r
        )
        self.gpu_memory_total = Gauge(
            "gendr_gpu_memory_total_bytes", "GPU memory size (NVML).", ["gpu"], registry=r
        )
        self.build_info = Gauge(
            "gendr_build_info",
            "Always 1; labels say version, backend, precision and engine of each model.",
            ["model", "version", "backend", "precision", "engine_key"],
            registry=r,
        )
        self.ready = Gauge("gendr_ready", "1 when every model is warmed up and not draining.", registry=r)
        # --- added by the HTTP layer (new names only; the ones above are the dashboard contract) ---
        self.request_errors = Counter(
            "gendr_request_errors",
            "Failed /upscale requests by stable error code.",
            ["model", "code"],
            registry=r,
        )
        self.inflight_requests = Gauge(
            "gendr_http_inflight_requests",
            "/upscale requests being read, decoded, computed or encoded.",
            registry=r,
        )
        self.request_bytes = Counter(
            "gendr_request_body_bytes", "Request body bytes read by /upscale.", registry=r
        )
        self.response_bytes = Counter(
            "gendr_response_body_bytes", "Image bytes returned by /upscale.", registry=r
        )
        # --- added by the runtime's load (issue 24): a model served below what was expected, or refused ---
        self.backend_fallback = Gauge(
            "gendr_backend_fallback",
            "1 while a model runs on the CPU although a GPU backend was expected (a GPU is visible under "
            "auto); labels: the backend expected first and the one serving.",
            ["model", "expected", "backend"],
            registry=r,
        )
        self.model_refused = Gauge(
            "gendr_model_refused",
            "1 when a model was refused at start-up because an artifact failed an integrity check "
            "(sha256, size, path, missing, open, io), never fallen back from.",
            ["model", "file", "check"],
            registry=r,
        )
        self.host_cpu_seconds = Counter(
            "gendr_host_cpu_seconds",
            "CPU seconds of the host's pixel and HTTP work around the engine, by stage: read, probe, decode, "
            "resize, pad, gather, stitch, colour_fix, encode, write (what sizes a GPU pod's CPU request).",
            ["stage"],
            registry=r,
        )
        self._nvml = NvmlReader()

    def host_cpu(self, stage: str, seconds: float) -> None:
        """Add CPU seconds of one host stage (thread CPU time, so waiting is never counted)."""
        self.host_cpu_seconds.labels(stage).inc(max(0.0, seconds))

    def refresh_gpu_memory(self) -> None:
        """Update the GPU memory gauges from NVML at scrape time (no-op without `pynvml` or a GPU)."""
        for index, used, total in self._nvml.memory():
            self.gpu_memory_used.labels(gpu=str(index)).set(used)
            self.gpu_memory_total.labels(gpu=str(index)).set(total)


class BusyMeter:
    """Seconds an instance spent in engine calls, per wall-clock second, over a sliding window."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window = int(window_s)
        self._buckets: dict[int, float] = {}
        self._since: float | None = None
        self._lock = threading.Lock()

    def start(self, t: float) -> None:
        with self._lock:
            self._since = t

    def stop(self, t: float) -> None:
        with self._lock:
            if self._since is not None:
                self._add(self._since, t)
            self._since = None

    def _add(self, a: float, b: float) -> None:
        a = max(a, b - self.window - 1)
        while a < b:
            sec = math.floor(a)
            end = min(b, sec + 1)
            self._buckets[sec] = self._buckets.get(sec, 0.0) + (end - a)
            a = end
        lo = math.floor(b) - self.window - 1
        for k in [k for k in self._buckets if k < lo]:
            del self._buckets[k]

    def ratio(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        lo = now - self.window
        with self._lock:
            busy = sum(v for k, v in self._buckets.items() if k >= math.floor(lo))
            # the oldest bucket may start before the window: count only its share inside it
            first = self._buckets.get(math.floor(lo), 0.0)
            busy -= first * (lo - math.floor(lo))
            if self._since is not None:
                busy += now - max(self._since, lo)
        return max(0.0, min(1.0, busy / self.window))
