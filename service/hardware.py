"""What this machine has: usable CPUs and their matrix units, NVIDIA GPUs (by CUDA index), a real TensorRT.

CPU families: `auto` picks the CPU path (ONNX Runtime fp32, OpenVINO bf16 or int8) by the unit that makes
each fast, and the units differ between CPU generations far more than the core counts do (an AMX tile does
16× the int8 work per cycle of an AVX2 register). `cpu_family` names the one that decides, from the flags
Linux reports in /proc/cpuinfo (a VM shows only the flags its hypervisor exposes).

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


#: /proc/cpuinfo flags per unit that makes a precision fast.
CPU_UNIT_FLAGS: dict[str, tuple[str, ...]] = {
    "amx": ("amx_tile", "amx_int8", "amx_bf16"),  # Intel Xeon 4th gen (Sapphire Rapids) and later
    "bf16": ("amx_bf16", "avx512_bf16"),  # bf16 dot products: AMX, or AVX-512 BF16 (AMD Zen 4/5, Cooper Lake)
    "vnni": ("amx_int8", "avx512_vnni", "avx_vnni"),  # int8 dot products into int32 without saturation
    "avx512": ("avx512f",),
    "avx2": ("avx2", "fma"),
}
#: The families `auto` tells apart, best first (service/backends/select.py: CPU_FIGURES, docs/runtime.md).
CPU_FAMILIES = ("amx", "avx512_bf16", "vnni", "avx2", "baseline")


def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (empty when unknown, e.g. not Linux)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model_name(path: Path = Path("/proc/cpuinfo")) -> str:
    """`model name` from /proc/cpuinfo ("unknown" elsewhere): which CPU a measured figure came from."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_units(flags: set[str]) -> dict[str, list[str]]:
    """For each unit of CPU_UNIT_FLAGS, the flags of it this CPU has (a unit missing: no flag)."""
    return {
        u: [f for f in fs if f in flags] for u, fs in CPU_UNIT_FLAGS.items() if any(f in flags for f in fs)
    }


def cpu_family(flags: set[str]) -> str:
    """The CPU family whose unit decides the fastest precision: `amx` (AMX tiles: bf16 and int8),
    `avx512_bf16` (bf16 dot products, no AMX: AMD Zen 4/5), `vnni` (int8 dot products only), `avx2`
    (neither: int8 multiplies saturate at int16 without VNNI), or `baseline` (no AVX2)."""
    if "amx_bf16" in flags or "amx_int8" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if any(f in flags for f in ("avx512_vnni", "avx_vnni")):
        return "vnni"
    return "avx2" if "avx2" in flags else "baseline"


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
