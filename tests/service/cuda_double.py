"""A test double of cuda-bindings' runtime module (`cuda.bindings.runtime`) for CPU tests.

Like the real module, every function returns a tuple `(cudaError_t, *values)`. Device memory is numpy
buffers at fake addresses; pinned host memory (cudaMallocHost) is real host memory at its real address,
so `np.ctypeslib` views of it work; cudaMemcpyAsync really copies, so outputs can be checked. Streams
run their work at once unless they are capturing: then the work is recorded into the graph that
cudaStreamEndCapture returns and runs on cudaGraphLaunch (synchronising a capturing stream invalidates
the capture, as CUDA does). Every call goes into the shared CallLog; `fail(fn, err)` makes the next call
of `fn` return `err`. Names and parameter names are checked against the real module by
tests/service/test_trt_double_matches_stubs.py.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cuda_types import (
    cudaDeviceProp,
    cudaError_t,
    cudaGraph_t,
    cudaGraphExec_t,
    cudaMemcpyKind,
    cudaStream_t,
    cudaStreamCaptureMode,
    cudaStreamCaptureStatus,
)


@dataclass(frozen=True)
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int] = (9, 0)
    memory: int = 80 << 30
    pci_bus_id: str = "0000:17:00.0"  # domain:bus:device.function, as cudaDeviceGetPCIBusId writes it


@dataclass
class Call:
    api: str  # "cuda" or "trt"
    fn: str
    args: tuple[Any, ...]
    thread: str = field(default_factory=lambda: threading.current_thread().name)


class CallLog(list[Call]):
    """Every call into the doubles, in order (both APIs share one log, so order can be asserted)."""

    def names(self, api: str | None = None) -> list[str]:
        return [c.fn for c in self if api is None or c.api == api]

    def of(self, fn: str) -> list[Call]:
        return [c for c in self if c.fn == fn]

    def index(self, fn: str, start: int = 0, where: Callable[[Call], bool] = lambda c: True) -> int:  # type: ignore[override]
        """Position of the first call of `fn` at or after `start` that satisfies `where` (ValueError)."""
        for i in range(start, len(self)):
            if self[i].fn == fn and where(self[i]):
                return i
        raise ValueError(f"no call of {fn} after #{start}: {self.names()[start:]}")


@dataclass
class _Capture:
    ops: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    invalidated: str = ""


def _api(fn: Callable[..., tuple[Any, ...]]) -> Callable[..., tuple[Any, ...]]:
    """Log the call, honour an injected failure, remember the error for cudaGetLastError."""

    @functools.wraps(fn)
    def wrapper(self: CudaDouble, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        self.calls.append(Call("cuda", fn.__name__, args + tuple(kwargs.values())))
        failure = self._failures.pop(fn.__name__, None)
        res = (failure,) if failure is not None else fn(self, *args, **kwargs)
        if res[0] != cudaError_t.cudaSuccess:
            self._last_error = res[0]
        return res

    return wrapper


OK = cudaError_t.cudaSuccess
_DEVICE_BASE = 0x7F00_0000_0000


class CudaDouble:
    """The state behind the fake module: GPUs, memory, streams, graphs, the call log."""

    def __init__(self, gpus: tuple[FakeGpu, ...] = (FakeGpu(),), calls: CallLog | None = None) -> None:
        self.gpus = gpus
        self.calls = calls if calls is not None else CallLog()
        self.device_mem: dict[int, np.ndarray] = {}
        self.host_mem: dict[int, np.ndarray] = {}
        self._next_dev = _DEVICE_BASE
        self._streams: dict[int, _Capture | None] = {}
        self._graphs: dict[int, list[tuple[str, Callable[[], None]]]] = {}
        self._execs: dict[int, list[tuple[str, Callable[[], None]]]] = {}
        self._next_handle = 0x1000
        self._failures: dict[str, cudaError_t] = {}
        self._last_error = OK
        self._tls = threading.local()

    # ---- test controls (not part of the cudart API)

    def fail(self, fn: str, err: cudaError_t) -> None:
        """The next call of `fn` returns `err` (and does nothing)."""
        self._failures[fn] = err

    def allocated(self) -> int:
        """Device bytes currently allocated (all devices)."""
        return sum(a.nbytes for a in self.device_mem.values())

    def submit(self, stream: Any, label: str, op: Callable[[], None]) -> None:
        """Work a fake kernel enqueues on `stream`: run now, or record it when the stream is capturing."""
        cap = self._streams.get(int(stream))
        if cap is not None:
            cap.ops.append((label, op))
        else:
            op()

    def capturing(self, stream: Any) -> bool:
        return self._streams.get(int(stream)) is not None

    def invalidate_capture(self, stream: Any, why: str) -> None:
        cap = self._streams.get(int(stream))
        if cap is not None and not cap.invalidated:
            cap.invalidated = why

    def device_view(self, ptr: int, count: int) -> np.ndarray | None:
        return _view(self.device_mem, ptr, count)

    def module(self) -> Any:
        """The fake `cuda.bindings.runtime` module object (see install in trt_double.py)."""
        import types

        m = types.ModuleType("cuda.bindings.runtime")
        for name in dir(self):
            if name.startswith("cuda"):
                setattr(m, name, getattr(self, name))
        for t in (cudaError_t, cudaMemcpyKind, cudaStreamCaptureMode, cudaStreamCaptureStatus):
            setattr(m, t.__name__, t)
        for t in (cudaStream_t, cudaGraph_t, cudaGraphExec_t, cudaDeviceProp):  # type: ignore[assignment]
            setattr(m, t.__name__, t)
        m.cudaStreamDefault = 0  # type: ignore[attr-defined]
        m.cudaStreamNonBlocking = 1  # type: ignore[attr-defined]
        return m

    def _handle(self) -> int:
        self._next_handle += 0x10
        return self._next_handle

    @property
    def _device(self) -> int:
        return getattr(self._tls, "device", 0)

    # ---- devices

    @_api
    def cudaGetDeviceCount(self) -> tuple[Any, ...]:
        return (OK, len(self.gpus)) if self.gpus else (cudaError_t.cudaErrorNoDevice, 0)

    @_api
    def cudaSetDevice(self, device: int) -> tuple[Any, ...]:
        if not 0 <= int(device) < len(self.gpus):
            return (cudaError_t.cudaErrorInvalidDevice,)
        self._tls.device = int(device)
        return (OK,)

    @_api
    def cudaGetDevice(self) -> tuple[Any, ...]:
        return (OK, self._device)

    @_api
    def cudaGetDeviceProperties(self, device: int) -> tuple[Any, ...]:
        if not 0 <= int(device) < len(self.gpus):
            return (cudaError_t.cudaErrorInvalidDevice, None)
        g, p = self.gpus[int(device)], cudaDeviceProp()
        p.name, (p.major, p.minor), p.totalGlobalMem = g.name.encode(), g.compute_capability, g.memory
        p.multiProcessorCount = 132
        dom, bus, dev = g.pci_bus_id.split(":")
        p.pciDomainID, p.pciBusID, p.pciDeviceID = int(dom, 16), int(bus, 16), int(dev.split(".")[0], 16)
        return (OK, p)

    @_api
    def cudaDeviceGetPCIBusId(self, length: int, device: int) -> tuple[Any, ...]:
        if not 0 <= int(device) < len(self.gpus):
            return (cudaError_t.cudaErrorInvalidDevice, None)
        return (OK, self.gpus[int(device)].pci_bus_id.encode()[: int(length) - 1])

    @_api
    def cudaMemGetInfo(self) -> tuple[Any, ...]:
        total = self.gpus[self._device].memory if self.gpus else 0
        return (OK, total - self.allocated(), total)

    # ---- errors

    @_api
    def cudaGetErrorName(self, error: cudaError_t) -> tuple[Any, ...]:
        return (OK, cudaError_t(int(error)).name.encode())

    @_api
    def cudaGetErrorString(self, error: cudaError_t) -> tuple[Any, ...]:
        return (OK, f"fake {cudaError_t(int(error)).name}".encode())

    @_api
    def cudaGetLastError(self) -> tuple[Any, ...]:
        err, self._last_error = self._last_error, OK
        return (err,)

    # ---- memory

    @_api
    def cudaMalloc(self, size: int) -> tuple[Any, ...]:
        total = self.gpus[self._device].memory if self.gpus else 0
        if int(size) <= 0 or self.allocated() + int(size) > total:
            return (cudaError_t.cudaErrorMemoryAllocation, 0)
        ptr = self._next_dev
        self._next_dev += (int(size) + 0xFFFF) & ~0xFFF  # aligned, with a gap between allocations
        self.device_mem[ptr] = np.zeros(int(size), np.uint8)
        return (OK, ptr)

    @_api
    def cudaFree(self, devPtr: int) -> tuple[Any, ...]:
        return (
            (OK,)
            if self.device_mem.pop(int(devPtr), None) is not None
            else (cudaError_t.cudaErrorInvalidValue,)
        )

    @_api
    def cudaMallocHost(self, size: int) -> tuple[Any, ...]:
        buf = np.zeros(int(size), np.uint8)
        self.host_mem[buf.ctypes.data] = buf
        return (OK, buf.ctypes.data)

    @_api
    def cudaFreeHost(self, ptr: int) -> tuple[Any, ...]:
        return (
            (OK,) if self.host_mem.pop(int(ptr), None) is not None else (cudaError_t.cudaErrorInvalidValue,)
        )

    @_api
    def cudaMemcpyAsync(
        self, dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: Any
    ) -> tuple[Any, ...]:
        if not isinstance(kind, cudaMemcpyKind) or int(stream) not in self._streams:
            return (cudaError_t.cudaErrorInvalidValue,)
        pools = {
            cudaMemcpyKind.cudaMemcpyHostToDevice: (self.device_mem, self.host_mem),
            cudaMemcpyKind.cudaMemcpyDeviceToHost: (self.host_mem, self.device_mem),
            cudaMemcpyKind.cudaMemcpyDeviceToDevice: (self.device_mem, self.device_mem),
        }.get(kind)
        if pools is None:
            return (cudaError_t.cudaErrorInvalidValue,)
        d, s = _view(pools[0], int(dst), int(count)), _view(pools[1], int(src), int(count))
        if d is None or s is None:
            return (cudaError_t.cudaErrorInvalidValue,)

        def copy() -> None:
            d[:] = s

        self.submit(stream, f"memcpy {kind.name}", copy)
        return (OK,)

    # ---- streams and graphs

    @_api
    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[Any, ...]:
        h = self._handle()
        self._streams[h] = None
        return (OK, cudaStream_t(h))

    @_api
    def cudaStreamDestroy(self, stream: Any) -> tuple[Any, ...]:
        if int(stream) not in self._streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        del self._streams[int(stream)]
        return (OK,)

    @_api
    def cudaStreamSynchronize(self, stream: Any) -> tuple[Any, ...]:
        if int(stream) not in self._streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if self.capturing(stream):  # illegal while capturing: CUDA invalidates the capture
            self.invalidate_capture(stream, "cudaStreamSynchronize during capture")
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        return (OK,)

    @_api
    def cudaStreamIsCapturing(self, stream: Any) -> tuple[Any, ...]:
        cap = self._streams.get(int(stream))
        if cap is None:
            return (OK, cudaStreamCaptureStatus.cudaStreamCaptureStatusNone)
        status = "Invalidated" if cap.invalidated else "Active"
        return (OK, cudaStreamCaptureStatus[f"cudaStreamCaptureStatus{status}"])

    @_api
    def cudaStreamBeginCapture(self, stream: Any, mode: cudaStreamCaptureMode) -> tuple[Any, ...]:
        if int(stream) not in self._streams or not isinstance(mode, cudaStreamCaptureMode):
            return (cudaError_t.cudaErrorInvalidValue,)
        if self.capturing(stream):
            return (cudaError_t.cudaErrorIllegalState,)
        self._streams[int(stream)] = _Capture()
        return (OK,)

    @_api
    def cudaStreamEndCapture(self, stream: Any) -> tuple[Any, ...]:
        cap = self._streams.get(int(stream))
        if cap is None:
            return (cudaError_t.cudaErrorIllegalState, None)
        self._streams[int(stream)] = None
        if cap.invalidated:
            return (cudaError_t.cudaErrorStreamCaptureInvalidated, None)
        h = self._handle()
        self._graphs[h] = cap.ops
        return (OK, cudaGraph_t(h))

    @_api
    def cudaGraphInstantiate(self, graph: Any, flags: int) -> tuple[Any, ...]:
        ops = self._graphs.get(int(graph))
        if ops is None:
            return (cudaError_t.cudaErrorInvalidValue, None)
        h = self._handle()
        self._execs[h] = list(ops)
        return (OK, cudaGraphExec_t(h))

    @_api
    def cudaGraphLaunch(self, graphExec: Any, stream: Any) -> tuple[Any, ...]:
        ops = self._execs.get(int(graphExec))
        if ops is None or int(stream) not in self._streams:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        for label, op in ops:
            self.submit(stream, label, op)
        return (OK,)

    @_api
    def cudaGraphDestroy(self, graph: Any) -> tuple[Any, ...]:
        ok = self._graphs.pop(int(graph), None) is not None
        return (OK,) if ok else (cudaError_t.cudaErrorInvalidValue,)

    @_api
    def cudaGraphExecDestroy(self, graphExec: Any) -> tuple[Any, ...]:
        ok = self._execs.pop(int(graphExec), None) is not None
        return (OK,) if ok else (cudaError_t.cudaErrorInvalidValue,)


def _view(pool: dict[int, np.ndarray], ptr: int, count: int) -> np.ndarray | None:
    """The bytes [ptr, ptr+count) of the allocation in `pool` that holds them, or None."""
    for base, buf in pool.items():
        if base <= ptr and ptr + count <= base + buf.nbytes:
            return buf[ptr - base : ptr - base + count]
    return None
