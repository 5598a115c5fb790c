"""The TensorRT/CUDA test double behaves like the real runtime where the backend depends on it, and the
production TensorRT backend runs on it end to end (load, every batch size, CUDA graphs, memory)."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from cuda_double import CallLog, cudaError_t
from trt_double import EngineSpec, TrtDouble, install
from trt_repo import nearest_up, write_engine_repo

from service.hardware import gpu_info, tensorrt_module
from service.manifest import read_manifest


@pytest.fixture
def dbl(monkeypatch: pytest.MonkeyPatch) -> TrtDouble:
    return install(monkeypatch)


def _tiles(n: int, t: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, t, t, 3), dtype=np.uint8)


def test_service_detection_sees_the_double_and_refuses_a_stub(
    dbl: TrtDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tensorrt_module() is dbl.trt
    g = gpu_info(0)
    assert g is not None and (g.name, g.compute_capability, g.pci_bus_id) == (
        "NVIDIA H100 80GB HBM3",
        "9.0",
        "0000:17:00.0",
    )
    stub = types.ModuleType("tensorrt")  # what tensorrt-stubs installs: importable, no runtime classes
    stub.__spec__ = dbl.trt.__spec__
    stub.__version__ = "10.13.0.35"  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", stub)
    assert tensorrt_module() is None


def _context(dbl: TrtDouble, spec: EngineSpec) -> tuple[object, object, int, int]:
    """A context of a fake engine with device buffers and a stream (the way the backend sets one up)."""
    rt, trt = dbl.cudart, dbl.trt
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(spec.plan())
    ctx = engine.create_execution_context()
    _, stream = rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)
    n_in, n_out = 8 * 16 * 16 * 3, 8 * 32 * 32 * 3
    _, d_in = rt.cudaMalloc(n_in)
    _, d_out = rt.cudaMalloc(n_out)
    assert ctx.set_tensor_address("lr_tile", d_in) and ctx.set_tensor_address("sr_tile", d_out)
    return ctx, stream, d_in, d_out


def test_capture_right_after_a_shape_change_is_invalidated(dbl: TrtDouble) -> None:
    """TensorRT's deferred work of a shape change cannot be captured: enqueue once first."""
    rt = dbl.cudart
    ctx, stream, *_ = _context(dbl, EngineSpec())
    assert ctx.set_input_shape("lr_tile", (2, 16, 16, 3))
    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    assert rt.cudaStreamBeginCapture(stream, mode) == (cudaError_t.cudaSuccess,)
    assert not ctx.execute_async_v3(int(stream))
    assert rt.cudaStreamEndCapture(stream) == (cudaError_t.cudaErrorStreamCaptureInvalidated, None)
    assert ctx.execute_async_v3(int(stream))  # the uncaptured enqueue flushes the shape change …
    assert rt.cudaStreamBeginCapture(stream, mode)[0] == 0
    assert ctx.execute_async_v3(int(stream))  # … and the next enqueue captures
    err, graph = rt.cudaStreamEndCapture(stream)
    assert err == 0 and graph is not None


def test_graph_replays_the_captured_copies_and_kernel(dbl: TrtDouble) -> None:
    rt = dbl.cudart
    ctx, stream, d_in, d_out = _context(dbl, EngineSpec())
    _, h_in = rt.cudaMallocHost(2 * 16 * 16 * 3)
    _, h_out = rt.cudaMallocHost(2 * 32 * 32 * 3)
    host_in = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * (2 * 16 * 16 * 3)).from_address(h_in))
    host_out = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * (2 * 32 * 32 * 3)).from_address(h_out))
    kind = rt.cudaMemcpyKind

    def enqueue() -> None:
        assert rt.cudaMemcpyAsync(d_in, h_in, host_in.size, kind.cudaMemcpyHostToDevice, stream)[0] == 0
        assert ctx.execute_async_v3(int(stream))
        assert rt.cudaMemcpyAsync(h_out, d_out, host_out.size, kind.cudaMemcpyDeviceToHost, stream)[0] == 0

    ctx.set_input_shape("lr_tile", (2, 16, 16, 3))
    enqueue()
    rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    host_in[:] = 0
    enqueue()  # recorded, not run
    assert not host_out.any()
    _, graph = rt.cudaStreamEndCapture(stream)
    _, exe = rt.cudaGraphInstantiate(graph, 0)
    x = _tiles(2)
    host_in[:] = x.reshape(-1)
    assert rt.cudaGraphLaunch(exe, stream)[0] == 0
    np.testing.assert_array_equal(host_out.reshape(2, 32, 32, 3), nearest_up(x, 2))


def test_shapes_outside_the_profile_and_small_memory_are_refused(dbl: TrtDouble) -> None:
    trt, rt = dbl.trt, dbl.cudart
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(EngineSpec(profiles=[(1, 2, 4)]).plan())
    ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    assert dbl.cuda.allocated() == 0  # user-managed: TensorRT reserved nothing
    assert not ctx.set_input_shape("lr_tile", (8, 16, 16, 3))  # outside profile 0's 1..4
    assert ctx.set_input_shape("lr_tile", (2, 16, 16, 3))
    need = ctx.update_device_memory_size_for_shapes()
    assert need == EngineSpec().memory(2) < engine.get_device_memory_size_for_profile_v2(0)
    for name, size in (("lr_tile", 2 * 16 * 16 * 3), ("sr_tile", 2 * 32 * 32 * 3)):
        ctx.set_tensor_address(name, rt.cudaMalloc(size)[1])
    _, stream = rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)
    _, mem = rt.cudaMalloc(need)
    ctx.set_device_memory(mem, need - 1)
    assert not ctx.execute_async_v3(int(stream))
    ctx.set_device_memory(mem, need)
    assert ctx.execute_async_v3(int(stream))


def test_plan_from_another_tensorrt_version_does_not_deserialise(dbl: TrtDouble) -> None:
    trt = dbl.trt
    logger = trt.Logger()
    assert trt.Runtime(logger).deserialize_cuda_engine(EngineSpec(tensorrt_version="11.3.0.1").plan()) is None
    assert "not compatible with this version" in logger._messages[-1][1]


# ---------------------------------------------------------------- the production backend on the double


def _backend(tmp_path: Path, spec: EngineSpec, **kw: object):
    from service.backends.tensorrt import TensorRTBackend

    model_dir = write_engine_repo(tmp_path, spec, batch_sizes=[1, 2, 4, 8])
    return TensorRTBackend(read_manifest(model_dir), model_dir, **kw)  # type: ignore[arg-type]


def test_backend_serves_every_size_on_every_instance(dbl: TrtDouble, tmp_path: Path) -> None:
    b = _backend(tmp_path, EngineSpec(profiles=[(1, 4, 8)]), instances=2, max_batch=4)
    b.load()
    try:
        assert b.info.batch_sizes == (1, 2, 4)  # the engine's sizes up to max_batch, not 1..4
        for inst in (0, 1):
            for bs in b.info.batch_sizes:
                x = _tiles(bs, seed=bs + 10 * inst)
                np.testing.assert_array_equal(b.infer(inst, x), nearest_up(x, 2))
        assert {c.fn for c in dbl.calls if c.api == "cuda"} >= {"cudaSetDevice", "cudaMemcpyAsync"}
    finally:
        b.close()
    assert dbl.cuda.allocated() == 0 and not dbl.cuda.host_mem  # close() frees what load() took


def test_backend_captures_graphs_after_an_uncaptured_enqueue(dbl: TrtDouble, tmp_path: Path) -> None:
    b = _backend(tmp_path, EngineSpec(profiles=[(1, 4, 8)]), max_batch=4, cuda_graphs=True)
    b.load()
    try:
        b.warmup()
        assert b.graph_sizes(0) == (1, 2, 4)
        calls: CallLog = dbl.calls
        for begin in (i for i, c in enumerate(calls) if c.fn == "cudaStreamBeginCapture"):
            # the execute before this capture ran uncaptured, with the shape the capture uses
            before = [c for c in calls[:begin] if c.fn == "execute_async_v3"]
            after = calls[calls.index("execute_async_v3", begin)]
            assert before and before[-1].args[3] is False and before[-1].args[1] == after.args[1]
        x = _tiles(2)
        np.testing.assert_array_equal(b.infer(0, x), nearest_up(x, 2))
        assert calls[-2].fn == "cudaGraphLaunch"
    finally:
        b.close()


def test_failed_capture_falls_back_to_plain_enqueue(dbl: TrtDouble, tmp_path: Path) -> None:
    b = _backend(tmp_path, EngineSpec(profiles=[(1, 4, 8)]), max_batch=2, cuda_graphs=True)
    b.load()
    try:
        dbl.cuda.fail("cudaStreamBeginCapture", cudaError_t.cudaErrorStreamCaptureUnsupported)
        b.warmup()
        assert b.graph_sizes(0) == (2,)  # batch 1 runs without a graph
        x = _tiles(1)
        np.testing.assert_array_equal(b.infer(0, x), nearest_up(x, 2))
        assert b.healthy()
    finally:
        b.close()
