"""Peak memory of whole-image engine calls, measured at warm-up, and the memory left for them.

Why: a dynamic-shape graph runs a whole image in one call, and its activations grow with the image. The
cap on pixels per call (`GENDR_WHOLE_IMAGE_MAX_PIXELS=auto`) must follow the hardware the model runs on,
not a constant: a backend times a whole-image call at two sizes anyway, so it measures the peak memory
of those calls too (CPU: the process's resident set, GPU: the device's used memory via NVML) and fits
bytes = fixed + per_pixel × pixels. With the memory still free after the weights and buffers were
loaded, the runtime turns that into the cap (service/scheduling/whole_image.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryFit:
    """Peak bytes of one whole-image call ≈ fixed_bytes + bytes_per_pixel × input pixels."""

    bytes_per_pixel: float
    fixed_bytes: float
    available_bytes: int  # free for whole-image calls after weights and buffers (device or host)
    source: str  # "rss" (host), "nvml" (device), "model" (the fake backend's memory model)
    samples: tuple[tuple[int, int], ...] = ()  # (input pixels, peak bytes) measured


class MemoryProbe(Protocol):
    source: str

    def available(self) -> int:
        """Bytes free now for the engine's work (after what is loaded)."""

    def peak(self, run: Callable[[], object]) -> int:
        """Peak growth in bytes while `run()` runs."""


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _read_int(path: str) -> int | None:
    try:
        raw = Path(path).read_text().strip()
    except OSError:
        return None
    return None if raw == "max" else int(raw)


class HostMemory:
    """The process's resident set: the container's memory limit (cgroup v2) or MemAvailable."""

    source = "rss"

    def available(self) -> int:
        limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
        free = None
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
        if limit is not None and used is not None:
            free = min(free, limit - used) if free is not None else limit - used
        return max(0, free or 0)

    def peak(self, run: Callable[[], object]) -> int:
        """VmHWM after resetting it (clear_refs 5); where that is not allowed, RSS sampled every 2 ms."""
        try:
            Path("/proc/self/clear_refs").write_text("5")
            base = _status_kb("VmRSS")
            run()
            return max(0, _status_kb("VmHWM") - base)
        except OSError:
            pass
        base = _status_kb("VmRSS")
        top = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                top[0] = max(top[0], _status_kb("VmRSS"))
                time.sleep(0.002)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            run()
        finally:
            done.set()
            t.join()
        return max(0, max(top[0], _status_kb("VmRSS")) - base)


class DeviceMemory:
    """Used memory of one GPU as NVML reports it (device-wide; an engine's memory arena keeps what a
    call grew it by, so the growth over a call is that call's need beyond what was already held)."""

    source = "nvml"

    def __init__(self, cuda_index: int) -> None:
        import pynvml  # nvidia-ml-py, the `gpu` extra

        from service.hardware import gpu_info

        pynvml.nvmlInit()
        self._nv = pynvml
        gpu = gpu_info(cuda_index)  # CUDA and NVML number GPUs differently: match by PCI bus id
        if gpu is not None and gpu.pci_bus_id:
            self._handle = pynvml.nvmlDeviceGetHandleByPciBusId(gpu.pci_bus_id)
        else:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(cuda_index)

    def _info(self) -> tuple[int, int]:
        m = self._nv.nvmlDeviceGetMemoryInfo(self._handle)
        return int(m.used), int(m.free)

    def available(self) -> int:
        return self._info()[1]

    def peak(self, run: Callable[[], object]) -> int:
        before = self._info()[0]
        run()
        return max(0, self._info()[0] - before)


def fit_line(samples: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """(per pixel, fixed) through the first and last sample (two sizes are what warm-up runs)."""
    (p0, b0), (p1, b1) = samples[0], samples[-1]
    if p1 == p0:
        return b1 / max(p1, 1), 0.0
    slope = max(0.0, (b1 - b0) / (p1 - p0))
    return slope, max(0.0, b0 - slope * p0)


def measure(
    probe: MemoryProbe,
    run_at: Callable[[int, int], object],
    shapes: Sequence[tuple[int, int]],
    cumulative: bool = False,
) -> MemoryFit | None:
    """Peak memory of one call per (h, w) in `shapes` (smallest first), fitted; None when it fails.

    `cumulative`: the engine keeps what a call allocated (a memory arena), so the first call of the next
    size grows it only by the difference; a size's need is then the growth of every call up to it."""
    shapes = sorted(shapes, key=lambda s: s[0] * s[1])
    if len(shapes) < 2:
        return None
    try:
        available = probe.available()
        grown = [probe.peak(lambda h=h, w=w: run_at(h, w)) for h, w in shapes]
    except Exception as e:  # never let a memory reading fail a model's start: the cap falls back
        log.warning("whole-image memory not measured (%s): the cap falls back to its default", e)
        return None
    if cumulative:
        grown = [sum(grown[: i + 1]) for i in range(len(grown))]
    samples = tuple((h * w, g) for (h, w), g in zip(shapes, grown, strict=True))
    per_pixel, fixed = fit_line(samples)
    return MemoryFit(per_pixel, fixed, available, probe.source, samples)
