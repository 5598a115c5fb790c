"""What this machine has: usable CPUs, NVIDIA GPUs (by CUDA index), a real TensorRT runtime.

GPU indices: `GENDR_DEVICE_ID` and `gendr-build engine --device` are CUDA indices (what
`cudaSetDevice` takes). NVML numbers GPUs in PCI bus order while CUDA, unless
`CUDA_DEVICE_ORDER=PCI_BUS_ID`, puts the fastest first, so on a mixed machine "GPU 1" differs between
the two. A CUDA index is therefore mapped to its NVML handle through the PCI bus id; NVML alone is used
only where the orders agree (one GPU, or PCI_BUS_ID order).

TensorRT: a type-stub package (`tensorrt-stubs`) makes `import tensorrt` succeed without any runtime.
`tensorrt_version()` accepts a module only when it has the runtime's classes, so a stub never passes
for an installed TensorRT. The oldest version served or built with is `TENSORRT_MIN`
(`tensorrt_too_old` says why an older one is refused, in one line).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int  # CUDA device index
    name: str
    compute_capability: str  # "8.6"
    memory_total: int = 0
    pci_bus_id: str = ""

    @property
    def sm(self) -> str:
        return "sm_" + self.compute_capability.replace(".", "")


def available_cpus() -> int:
    """CPUs this process may use: affinity mask, capped by a cgroup v2 CPU quota (Kubernetes limits)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def has_package(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def import_cudart() -> Any | None:
    """cuda-bindings' runtime module (cuda-python ≥ 12.6 layout, else the older one), or None."""
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(mod)
        except ImportError:
            continue
    return None


def _ok(res: Any) -> tuple[bool, tuple[Any, ...]]:
    err, rest = (res[0], tuple(res[1:])) if isinstance(res, tuple) else (res, ())
    return int(err) == 0, rest


def _decode(v: Any) -> str:
    return v.decode(errors="replace").rstrip("\0") if isinstance(v, bytes) else str(v)


def _cuda_pci_bus_id(cudart: Any, index: int) -> str:
    ok, rest = _ok(cudart.cudaDeviceGetPCIBusId(32, index))
    return _decode(rest[0]).lower() if ok and rest else ""


def _cuda_gpu(cudart: Any, index: int) -> GpuInfo | None:
    ok, rest = _ok(cudart.cudaGetDeviceCount())
    if not ok or index >= int(rest[0]):
        return None
    ok, rest = _ok(cudart.cudaGetDeviceProperties(index))
    if not ok:
        return None
    prop = rest[0]
    return GpuInfo(
        index,
        _decode(prop.name),
        f"{prop.major}.{prop.minor}",
        int(prop.totalGlobalMem),
        _cuda_pci_bus_id(cudart, index),
    )


def _nvml_gpu(index: int, pci_bus_id: str) -> GpuInfo | None:
    """NVML's view of the CUDA device `index` (by PCI bus id when known), or None."""
    import pynvml

    pynvml.nvmlInit()
    try:
        if pci_bus_id:
            h = pynvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id)
        else:
            n = pynvml.nvmlDeviceGetCount()
            same_order = n == 1 or os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
            if index >= n or not same_order:
                return None
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
        bus = _decode(pynvml.nvmlDeviceGetPciInfo(h).busId).lower()
        mem = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
        return GpuInfo(index, _decode(pynvml.nvmlDeviceGetName(h)), f"{major}.{minor}", mem, bus)
    finally:
        pynvml.nvmlShutdown()


def gpu_info(index: int = 0) -> GpuInfo | None:
    """The GPU at CUDA index `index`; None if there is none (or no way to see one)."""
    cudart = import_cudart() if has_package("cuda") else None
    cuda_view: GpuInfo | None = None
    if cudart is not None:
        try:
            cuda_view = _cuda_gpu(cudart, index)
        except Exception as e:  # no driver
            log.debug("CUDA runtime: %s", e)
        if cuda_view is None:
            return None  # the CUDA runtime is authoritative for what cudaSetDevice(index) reaches
    if has_package("pynvml"):
        try:
            g = _nvml_gpu(index, cuda_view.pci_bus_id if cuda_view else "")
            if g is not None:
                return g
        except Exception as e:  # no driver, no device
            log.debug("NVML: %s", e)
    return cuda_view


def set_cuda_device(index: int) -> None:
    """Make CUDA device `index` current for this thread (TensorRT builds and runs on the current one)."""
    cudart = import_cudart()
    if cudart is None:
        raise RuntimeError("cuda-python is not installed: cannot select a CUDA device")
    ok, _ = _ok(cudart.cudaSetDevice(index))
    if not ok:
        raise RuntimeError(f"cudaSetDevice({index}) failed")


def tensorrt_module() -> Any | None:
    """The TensorRT runtime module, or None when absent or only a stub (no Runtime/Builder classes)."""
    if not has_package("tensorrt"):
        return None
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as e:  # a broken install: missing libnvinfer, wrong CUDA
        log.debug("tensorrt: %s", e)
        return None
    if not all(hasattr(trt, a) for a in ("Logger", "Runtime", "__version__")):
        return None  # tensorrt-stubs or a namespace leftover
    return trt


#: The oldest TensorRT accepted (pyproject's `trt` extra says the same): the backend calls
#: `IExecutionContext.set_device_memory(ptr, size)` and `get_device_memory_size_for_profile_v2`, which
#: TensorRT 10.0 does not have (they came in 10.1).
TENSORRT_MIN = (10, 1)


def tensorrt_too_old(version: str) -> str | None:
    """One line saying why this TensorRT version is refused, or None when it is at least TENSORRT_MIN."""
    m = re.match(r"(\d+)\.(\d+)", version)
    floor = ".".join(map(str, TENSORRT_MIN))
    if m is None:
        return f"cannot read the TensorRT version {version!r}; TensorRT >= {floor} is required"
    if (int(m[1]), int(m[2])) < TENSORRT_MIN:
        return (
            f"TensorRT {version} is older than {floor}, the oldest supported (set_device_memory with "
            f"a size and get_device_memory_size_for_profile_v2 came in {floor}): "
            f"pip install 'tensorrt>={floor}'"
        )
    return None


def tensorrt_version() -> str | None:
    trt = tensorrt_module()
    return str(trt.__version__) if trt is not None else None


class NvmlReader:
    """GPU memory per NVML device (index = NVML's PCI-ordered index), for the metrics at scrape time.

    Lazy: NVML is initialised on first use and disabled for good after the first failure (no
    nvidia-ml-py, no driver), so a CPU machine pays one failed import, once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mod: Any = None
        self._state = "new"  # new | ok | off

    def memory(self) -> list[tuple[int, int, int]]:
        """[(index, used bytes, total bytes)] for every GPU; [] without NVML."""
        with self._lock:
            if self._state == "new":
                self._state = "off"
                try:
                    import pynvml  # provided by nvidia-ml-py (the `gpu` extra)

                    pynvml.nvmlInit()
                    self._mod, self._state = pynvml, "ok"
                except Exception as e:  # ImportError, NVMLError (no driver), ...
                    log.debug("NVML unavailable, no GPU memory metrics: %s", e)
            if self._state != "ok":
                return []
            nv = self._mod
            try:
                out = []
                for i in range(nv.nvmlDeviceGetCount()):
                    mem = nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(i))
                    out.append((i, int(mem.used), int(mem.total)))
                return out
            except Exception as e:
                log.warning("NVML query failed, GPU memory metrics disabled: %s", e)
                self._state = "off"
                return []
