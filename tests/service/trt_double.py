"""A test double of TensorRT's runtime objects (and, with cuda_double.py, the CUDA runtime) for CPU tests
of service/backends/tensorrt.py.

`install(monkeypatch)` puts a fake `tensorrt` and a fake `cuda.bindings.runtime` into sys.modules, with
import specs, so `service.hardware.tensorrt_module()` and `import_cudart()` find them as they would the
real ones (and pynvml is hidden, so the GPU is seen through the fake CUDA runtime only). A plan is
`EngineSpec.plan()` bytes: the fake Runtime deserialises it (None, with a logged error, when it was built
by another TensorRT version, as the real one does). The fake engine's execute_async_v3 computes a
nearest-neighbour upscale of the uint8 input tiles, so outputs can be checked, and refuses what TensorRT
refuses: a batch outside the context's profile, unset shapes or addresses, too little user-managed device
memory, and — like TensorRT — the deferred work of a shape change inside a CUDA-graph capture (the
capture is invalidated). A CUDA graph replayed after its context moved to another shape (or profile)
runs kernels recorded for a state the context no longer has: the double writes garbage into the output
and records the fault (`TrtDouble.faults`), as NVIDIA's guide says to recapture after a shape change.
Every call is logged in order (`TrtDouble.calls`), TensorRT and CUDA together.

Class, method, attribute and parameter names are checked against tensorrt-stubs, and the CUDA names
against the real cuda.bindings.runtime, by tests/service/test_trt_double_matches_stubs.py.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from dataclasses import asdict, dataclass, field
from typing import Any

import pytest
from cuda_double import Call, CallLog, CudaDouble, FakeGpu
from trt_types import (
    DataType,
    Dims,
    ExecutionContextAllocationStrategy,
    ILogger,
    Logger,
    TensorIOMode,
)

VERSION = "11.4.0.106"  # the Dockerfile's TENSORRT_VERSION
H100 = FakeGpu()  # the default fake GPU (sm_90)
_MAGIC = b"TRT-DOUBLE-PLAN\n"


@dataclass
class EngineSpec:
    """What a fake plan was "built" with; `plan()` serialises it as the bytes a plan file holds."""

    tile: int = 16
    scale: int = 2
    channels: int = 3
    input_name: str = "lr_tile"
    output_name: str = "sr_tile"
    input_dtype: str = "UINT8"
    output_dtype: str = "UINT8"
    profiles: list[tuple[int, int, int]] = field(default_factory=lambda: [(1, 4, 8)])  # (min, opt, max)
    tensorrt_version: str = VERSION
    memory_base: int = 1 << 16  # activation memory: base + per_sample × batch
    memory_per_sample: int = 1 << 20

    def plan(self) -> bytes:
        return _MAGIC + json.dumps(asdict(self)).encode()

    @classmethod
    def from_plan(cls, data: bytes) -> EngineSpec | None:
        if not data.startswith(_MAGIC):
            return None
        d = json.loads(data[len(_MAGIC) :])
        d["profiles"] = [tuple(p) for p in d["profiles"]]
        return cls(**d)

    def memory(self, batch: int) -> int:
        return self.memory_base + self.memory_per_sample * batch


@dataclass
class _State:
    cuda: CudaDouble
    calls: CallLog
    version: str
    engines: list[ICudaEngine] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)  # misuse the real GPU would not report (stale graphs)


class Runtime:
    _state: _State  # set by install()

    def __init__(self, logger: ILogger) -> None:
        self._logger = logger
        self._state.calls.append(Call("trt", "Runtime", ()))

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        self._state.calls.append(Call("trt", "deserialize_cuda_engine", (len(serialized_engine),)))
        spec = EngineSpec.from_plan(bytes(serialized_engine))
        if spec is None:
            self._logger.log(Logger.ERROR, "IRuntime::deserializeCudaEngine: not a plan file")
            return None
        if spec.tensorrt_version != self._state.version:
            self._logger.log(
                Logger.ERROR,
                f"The engine plan file is not compatible with this version of TensorRT, expecting "
                f"library version {self._state.version} got {spec.tensorrt_version}",
            )
            return None
        engine = ICudaEngine(spec, self._state, self._logger)
        self._state.engines.append(engine)
        return engine


class ICudaEngine:
    def __init__(self, spec: EngineSpec, state: _State, logger: ILogger) -> None:
        self._spec, self._state, self._logger = spec, state, logger
        self._contexts: list[IExecutionContext] = []

    def _io(self, name: str) -> tuple[TensorIOMode, DataType, tuple[int, ...]]:
        s = self._spec
        if name == s.input_name:
            return TensorIOMode.INPUT, DataType[s.input_dtype], (-1, s.tile, s.tile, s.channels)
        if name == s.output_name:
            t = s.tile * s.scale
            return TensorIOMode.OUTPUT, DataType[s.output_dtype], (-1, t, t, s.channels)
        raise KeyError(name)

    @property
    def num_io_tensors(self) -> int:
        return 2

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._spec.profiles)

    @property
    def device_memory_size(self) -> int:
        return self._spec.memory(max(p[2] for p in self._spec.profiles))

    @property
    def device_memory_size_v2(self) -> int:
        return self.device_memory_size

    def get_tensor_name(self, index: int) -> str:
        return (self._spec.input_name, self._spec.output_name)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return (
            self._io(name)[0]
            if name in (self._spec.input_name, self._spec.output_name)
            else TensorIOMode.NONE
        )

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._io(name)[1]

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(self._io(name)[2])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        if name != self._spec.input_name or not 0 <= profile_index < len(self._spec.profiles):
            return []
        s = self._spec
        return [Dims((b, s.tile, s.tile, s.channels)) for b in s.profiles[profile_index]]

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        return self._spec.memory(self._spec.profiles[profile_index][2])

    def create_execution_context(
        self, strategy: ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy.STATIC
    ) -> IExecutionContext | None:
        self._state.calls.append(Call("trt", "create_execution_context", (strategy,)))
        ctx = IExecutionContext(self, len(self._contexts), strategy)
        if strategy != ExecutionContextAllocationStrategy.USER_MANAGED:
            need = (
                self.device_memory_size_v2 if strategy == 0 else self.get_device_memory_size_for_profile_v2(0)
            )
            err, ptr = self._state.cuda.cudaMalloc(need)
            if err != 0:
                self._logger.log(Logger.ERROR, "createExecutionContext: out of device memory")
                return None
            ctx._memory = (ptr, need)
        self._contexts.append(ctx)
        return ctx

    def create_execution_context_without_device_memory(self) -> IExecutionContext | None:
        return self.create_execution_context(ExecutionContextAllocationStrategy.USER_MANAGED)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, index: int, strategy: ExecutionContextAllocationStrategy) -> None:
        self._engine, self._index, self._strategy = engine, index, strategy
        self._profile = 0
        self._shape: tuple[int, ...] | None = None
        self._shape_dirty = False  # a shape change not yet flushed by an (uncaptured) enqueue
        self._shape_epoch = 0  # bumped by every shape or profile change: a graph is valid for one epoch
        self._addresses: dict[str, int] = {}
        self._memory: tuple[int, int] | None = None  # (ptr, size)

    def _log(self, fn: str, *args: Any) -> None:
        self._engine._state.calls.append(Call("trt", fn, (self._index, *args)))

    def _error(self, msg: str) -> bool:
        self._engine._logger.log(Logger.ERROR, f"IExecutionContext: {msg}")
        return False

    @property
    def engine(self) -> ICudaEngine:
        return self._engine

    @property
    def active_optimization_profile(self) -> int:
        return self._profile

    @property
    def all_binding_shapes_specified(self) -> bool:
        return self._shape is not None

    @property
    def all_shape_inputs_specified(self) -> bool:
        return True  # the tile graph has no shape-tensor inputs

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        self._log("set_optimization_profile_async", profile_index, stream_handle)
        if not 0 <= profile_index < self._engine.num_optimization_profiles:
            return self._error(f"profile {profile_index} out of range")
        if profile_index != self._profile:
            self._profile, self._shape, self._shape_dirty = profile_index, None, True
            self._shape_epoch += 1
        return True

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(int(x) for x in shape)
        self._log("set_input_shape", name, shape)
        s = self._engine._spec
        if name != s.input_name:
            return self._error(f"{name} is not an input")
        lo, _, hi = s.profiles[self._profile]
        if len(shape) != 4 or shape[1:] != (s.tile, s.tile, s.channels) or not lo <= shape[0] <= hi:
            return self._error(f"shape {shape} outside profile {self._profile} [{lo}..{hi}]")
        if shape != self._shape:
            self._shape, self._shape_dirty = shape, True
            self._shape_epoch += 1
        return True

    def get_tensor_shape(self, name: str) -> Dims:
        s = self._engine._spec
        bs = self._shape[0] if self._shape else -1
        if name == s.input_name:
            return Dims(self._shape or (-1, s.tile, s.tile, s.channels))
        t = s.tile * s.scale
        return Dims((bs, t, t, s.channels))

    def infer_shapes(self) -> list[str]:
        return [] if self._shape else [self._engine._spec.input_name]

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self._log("set_tensor_address", name, memory)
        if name not in (self._engine._spec.input_name, self._engine._spec.output_name):
            return self._error(f"no tensor {name}")
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def set_device_memory(self, memory: int, size: int) -> None:
        self._log("set_device_memory", memory, size)
        self._memory = (int(memory), int(size))

    def update_device_memory_size_for_shapes(self) -> int:
        return self._engine._spec.memory(self._shape[0]) if self._shape else 0

    def execute_async_v3(self, stream_handle: int) -> bool:
        cuda, s = self._engine._state.cuda, self._engine._spec
        capturing = cuda.capturing(stream_handle)
        self._log("execute_async_v3", self._shape, self._profile, capturing)
        if self._shape is None:
            return self._error("input shape not set")
        if set(self._addresses) != {s.input_name, s.output_name}:
            return self._error("tensor address not set")
        need = s.memory(self._shape[0])
        if self._memory is None or self._memory[1] < need:
            return self._error(f"device memory {self._memory} too small for {need} bytes")
        if capturing and self._shape_dirty:  # TensorRT's deferred shape work is illegal in a capture
            cuda.invalidate_capture(stream_handle, "enqueue after a shape change during capture")
            return self._error("operation not permitted when stream is capturing")
        bs, t, ot = self._shape[0], s.tile, s.tile * s.scale
        src = cuda.device_view(self._addresses[s.input_name], bs * t * t * s.channels)
        dst = cuda.device_view(self._addresses[s.output_name], bs * ot * ot * s.channels)
        if src is None or dst is None:
            return self._error("tensor address outside device memory")
        epoch, faults = self._shape_epoch, self._engine._state.faults

        def kernel() -> None:
            if self._shape_epoch != epoch:  # a graph recorded at another shape of this context
                faults.append(
                    f"context {self._index}: CUDA graph captured at input {(bs, t, t, s.channels)} replayed "
                    f"after a shape change (context now at {self._shape})"
                )
                dst[:] = 0xA5  # undefined results: garbage, not the right answer
                return
            x = src.reshape(bs, t, t, s.channels)
            dst[:] = x.repeat(s.scale, axis=1).repeat(s.scale, axis=2).reshape(-1)

        cuda.submit(stream_handle, "execute_async_v3", kernel)
        if not capturing:
            self._shape_dirty = False
        return True


@dataclass
class TrtDouble:
    trt: types.ModuleType
    cudart: types.ModuleType
    cuda: CudaDouble
    calls: CallLog
    _state: _State

    @property
    def engines(self) -> list[ICudaEngine]:
        """Engines deserialised so far."""
        return self._state.engines

    @property
    def faults(self) -> list[str]:
        """Misuse a real GPU would not report (a CUDA graph replayed after its context changed shape)."""
        return self._state.faults

    def contexts(self) -> list[IExecutionContext]:
        """The execution contexts created so far (all engines)."""
        return [c for e in self._state.engines for c in e._contexts]


_TRT_NAMES = (
    "ILogger Logger Runtime ICudaEngine IExecutionContext DataType TensorIOMode "
    "ExecutionContextAllocationStrategy Dims"
).split()


def _module(name: str, attrs: dict[str, Any]) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def install(
    monkeypatch: pytest.MonkeyPatch, *, version: str = VERSION, gpus: tuple[FakeGpu, ...] = (H100,)
) -> TrtDouble:
    """Put the fake `tensorrt` and `cuda.bindings.runtime` into sys.modules for this test."""
    calls = CallLog()
    cuda = CudaDouble(gpus, calls)
    state = _State(cuda, calls, version)
    monkeypatch.setattr(Runtime, "_state", state, raising=False)
    trt = _module("tensorrt", {n: globals()[n] for n in _TRT_NAMES} | {"__version__": version})
    runtime = cuda.module()
    runtime.__spec__ = importlib.machinery.ModuleSpec("cuda.bindings.runtime", None)
    bindings = _module("cuda.bindings", {"runtime": runtime, "__version__": "13.5.0"})
    cuda_pkg = _module("cuda", {"bindings": bindings})
    for name, mod in {
        "tensorrt": trt,
        "cuda": cuda_pkg,
        "cuda.bindings": bindings,
        "cuda.bindings.runtime": runtime,
        "cuda.cudart": None,
        "pynvml": None,  # hidden: the fake GPU is seen through the CUDA runtime
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return TrtDouble(trt, runtime, cuda, calls, state)


@pytest.fixture
def trt_double(monkeypatch: pytest.MonkeyPatch) -> TrtDouble:
    return install(monkeypatch)
