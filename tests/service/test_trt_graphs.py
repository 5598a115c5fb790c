"""CUDA graphs in the TensorRT backend (issue 24, item 2): a graph is valid only for the shape its
context had when it was captured, so every captured batch size has a context of its own (sharing the
instance's memory block) and every graph is checked against an uncaptured run at warm-up."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from trt_double import EngineSpec, TrtDouble, install
from trt_repo import nearest_up, write_engine_repo

from service.backends.tensorrt import TensorRTBackend
from service.backends.trt_instances import Instance
from service.manifest import read_manifest


@pytest.fixture
def dbl(monkeypatch: pytest.MonkeyPatch) -> TrtDouble:
    return install(monkeypatch)


def _tiles(n: int, t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, t, t, 3), dtype=np.uint8)


def _backend(tmp_path: Path, **kw: object) -> TensorRTBackend:
    bucket = EngineSpec(tile=32, profiles=[(1, 4, 8)])
    model_dir = write_engine_repo(
        tmp_path, EngineSpec(tile=64, profiles=[(1, 4, 8)]), batch_sizes=[1, 2, 4], buckets=[bucket]
    )
    return TensorRTBackend(read_manifest(model_dir), model_dir, max_batch=4, cuda_graphs=True, **kw)  # type: ignore[arg-type]


def test_the_double_sees_a_graph_replayed_after_its_context_changed_shape(dbl: TrtDouble) -> None:
    """Captured at batch 2, the context then moved to batch 4: the replay runs stale kernels."""
    rt, trt = dbl.cudart, dbl.trt
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(EngineSpec().plan())
    ctx = engine.create_execution_context()
    _, stream = rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)
    _, d_in = rt.cudaMalloc(8 * 16 * 16 * 3)
    _, d_out = rt.cudaMalloc(8 * 32 * 32 * 3)
    ctx.set_tensor_address("lr_tile", d_in)
    ctx.set_tensor_address("sr_tile", d_out)
    ctx.set_input_shape("lr_tile", (2, 16, 16, 3))
    assert ctx.execute_async_v3(int(stream))
    rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
    assert ctx.execute_async_v3(int(stream))
    _, graph = rt.cudaStreamEndCapture(stream)
    _, exe = rt.cudaGraphInstantiate(graph, 0)
    x = _tiles(2, 16)
    dbl.cuda.device_view(d_in, x.size)[:] = x.reshape(-1)  # type: ignore[index]
    assert rt.cudaGraphLaunch(exe, stream)[0] == 0 and not dbl.faults  # same shape: fine
    out = dbl.cuda.device_view(d_out, 2 * 32 * 32 * 3)
    assert out is not None
    np.testing.assert_array_equal(out.reshape(2, 32, 32, 3), nearest_up(x, 2))
    ctx.set_input_shape("lr_tile", (4, 16, 16, 3))
    assert ctx.execute_async_v3(int(stream))
    assert rt.cudaGraphLaunch(exe, stream)[0] == 0  # CUDA does not object …
    assert len(dbl.faults) == 1 and "replayed after a shape change" in dbl.faults[0]  # … the result is wrong
    assert not np.array_equal(out.reshape(2, 32, 32, 3), nearest_up(x, 2))


def test_every_captured_batch_size_replays_its_own_graph_correctly(dbl: TrtDouble, tmp_path: Path) -> None:
    """Mixed sizes and tiles in any order each replay a graph, never a shape change on a context."""
    be = _backend(tmp_path, instances=2)
    be.load()
    try:
        be.warmup()
        assert not dbl.faults, dbl.faults
        for inst in (0, 1):
            assert be.graph_sizes(inst, 32) == be.graph_sizes(inst, 64) == (1, 2, 4)
        # a context per (instance, tile, batch size), each given its shape once, all on one block per instance
        assert [len(e._contexts) for e in dbl.engines] == [2 * 3, 2 * 3]
        assert len(dbl.calls.of("set_input_shape")) == 2 * 2 * 3
        mem = {c.args[1] for c in dbl.calls.of("set_device_memory")}
        assert len(mem) == 2
        order = [(64, 1), (64, 4), (32, 2), (64, 2), (32, 1), (64, 1), (32, 4), (64, 4), (32, 2)]
        for i, (t, bs) in enumerate(order):
            start = len(dbl.calls)
            x = _tiles(bs, t, seed=i)
            np.testing.assert_array_equal(be.infer(i % 2, x), nearest_up(x, 2))
            names = dbl.calls.names()[start:]
            assert "cudaGraphLaunch" in names and "execute_async_v3" not in names
            assert "set_input_shape" not in names
        assert not dbl.faults, dbl.faults
        report = be.graph_check()
        assert set(report) == {(i, t, bs) for i in (0, 1) for t in (32, 64) for bs in (1, 2, 4)}
        assert set(report.values()) == {0}
    finally:
        be.close()
    assert dbl.cuda.allocated() == 0 and not dbl.cuda.host_mem


def test_a_graph_that_disagrees_with_the_uncaptured_run_is_dropped(
    dbl: TrtDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Warm-up replays every graph against an uncaptured run: a stale one (here its context is moved to
    another shape after the capture, behind the backend's back) is dropped and that size runs plain."""
    capture = Instance.capture

    def capture_then_move(self: Instance, tile: int, bs: int) -> bool:
        ok = capture(self, tile, bs)
        if (tile, bs) == (64, 2):
            c = self.tiles[tile]
            ctx = c.ctxs[bs]
            ctx.set_input_shape(c.plan.in_name, (4, 64, 64, 3))
            ctx.set_input_shape(c.plan.in_name, (2, 64, 64, 3))  # back, but the graph is stale
            self._enqueue(c, bs)
            self.cuda("cudaStreamSynchronize", self.stream)
        return ok

    monkeypatch.setattr(Instance, "capture", capture_then_move)
    be = _backend(tmp_path)
    be.load()
    try:
        with caplog.at_level(logging.ERROR, logger="service.backends.trt_instances"):
            be.warmup()
        assert be.graph_sizes(0, 64) == (1, 4) and be.graph_sizes(0, 32) == (1, 2, 4)
        assert "CUDA graph for 2×64-px tiles differs from the uncaptured run" in caplog.text
        assert be.graph_check()[(0, 64, 2)] > 1
        dbl.faults.clear()
        x = _tiles(2, 64, seed=3)
        np.testing.assert_array_equal(be.infer(0, x), nearest_up(x, 2))  # runs plain, right
        assert not dbl.faults
    finally:
        be.close()
    assert dbl.cuda.allocated() == 0


def test_the_gpu_check_compares_every_captured_batch_size(dbl: TrtDouble, tmp_path: Path) -> None:
    """benchmarks/gpu_check_batcher.py's TensorRT row, on the double: one entry per (instance, tile, size)."""
    import importlib.util

    path = Path(__file__).parents[2] / "benchmarks" / "gpu_check_batcher.py"
    spec = importlib.util.spec_from_file_location("gpu_check_batcher", path)
    assert spec is not None and spec.loader is not None
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    repo = _backend(tmp_path).model_dir
    row = check.trt_graph_row(repo, instances=2, max_batch=4)
    assert row["ok"] and row["max_diff"] == 0 and row["without_graph"] == []
    assert set(row["trt_graphs"]) == {f"i{i}/t{t}/b{b}" for i in (0, 1) for t in (32, 64) for b in (1, 2, 4)}
    assert check.trt_graph_row(None, 1, 4) == {
        "trt_graphs": "skipped",
        "why": "no --trt-repo given",
        "ok": True,
    }
    assert dbl.cuda.allocated() == 0
