"""One TensorRT engine instance: an execution context per tile plan over ONE device-memory block.

- An instance runs one call at a time (the batcher's contract), so its contexts — one per tile plan,
  each on its own optimisation profile — share one CUDA stream, one device input/output pair sized for
  the largest tile, and one activation memory block (`USER_MANAGED` allocation) sized for the largest
  need over its tiles and the batch sizes served (`update_device_memory_size_for_shapes`), not for the
  profiles' maximum. Instances have their own, so the copies and kernels of different instances overlap.
- Pinned host input/output buffers per tile: the batcher gathers tiles straight into the input one.
- Optional CUDA graphs, one per (tile, batch size), captured after an uncaptured enqueue at that shape
  (TensorRT defers shape-dependent work to the first enqueue after a shape change). A failed capture
  is ended, logged, and that shape runs without a graph.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from service.backends.base import BackendUnavailable
from service.backends.cuda_rt import CudaRuntime, pinned_view
from service.backends.trt_plans import TilePlan

if TYPE_CHECKING:  # typed by tensorrt-stubs in scripts/typecheck_trt.sh; imported for real at load
    import tensorrt

log = logging.getLogger(__name__)


class TileContext:
    """The execution context of one tile plan in an instance, its pinned buffers and CUDA graphs."""

    def __init__(self, plan: TilePlan) -> None:
        self.plan = plan
        self.ctx: Any = None
        self.profile = 0
        self.shape_bs = 0  # batch size of the last set_input_shape
        self.h_in_ptr = self.h_out_ptr = 0
        self.h_in: np.ndarray = np.empty(0, np.uint8)
        self.h_out: np.ndarray = np.empty(0, np.uint8)
        self.graphs: dict[int, Any] = {}  # batch size → cudaGraphExec_t
        self.graph_objs: list[Any] = []


class Instance:
    """Stream, shared device buffers and memory, and a TileContext per tile served."""

    def __init__(self, cuda: CudaRuntime, index: int, model: str) -> None:
        self.cuda, self.index, self.model = cuda, index, model
        self.stream: Any = None
        self.d_in = self.d_out = self.d_mem = 0
        self.memory_size = 0  # bytes of the shared activation memory (0: TensorRT allocates per context)
        self.tiles: dict[int, TileContext] = {}

    # ------------------------------------------------------------------ setup

    def setup(self, plans: dict[int, TilePlan], sizes: tuple[int, ...], scale: int) -> None:
        """Contexts, buffers and the shared memory; what was allocated is freed by close() on failure."""
        import tensorrt as trt

        cuda = self.cuda
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        bmax, big = sizes[-1], max(plans)
        self.stream = cuda("cudaStreamCreateWithFlags", cuda.rt.cudaStreamNonBlocking)
        self.d_in = int(cuda("cudaMalloc", bmax * big * big * 3))
        self.d_out = int(cuda("cudaMalloc", bmax * (big * scale) ** 2 * 3))
        for t, plan in plans.items():
            c = self.tiles[t] = TileContext(plan)
            eng: tensorrt.ICudaEngine = plan.engine
            ctx: tensorrt.IExecutionContext | None = (
                eng.create_execution_context(strategy)
                if strategy is not None
                else eng.create_execution_context()
            )
            if ctx is None:
                raise BackendUnavailable(
                    f"could not create an execution context for {t}-px tiles (GPU memory?)"
                )
            c.ctx = ctx
            c.profile = self.index % eng.num_optimization_profiles
            if not ctx.set_optimization_profile_async(c.profile, int(self.stream)):
                raise BackendUnavailable(f"could not select optimisation profile {c.profile} ({t}-px tiles)")
            ot = t * scale
            c.h_in_ptr = int(cuda("cudaMallocHost", bmax * t * t * 3))
            c.h_out_ptr = int(cuda("cudaMallocHost", bmax * ot * ot * 3))
            c.h_in = pinned_view(c.h_in_ptr, (bmax, t, t, 3))
            c.h_out = pinned_view(c.h_out_ptr, (bmax, ot, ot, 3))
            ctx.set_tensor_address(plan.in_name, self.d_in)
            ctx.set_tensor_address(plan.out_name, self.d_out)
        if strategy is not None:
            self.memory_size = max(self._memory_need(c, sizes) for c in self.tiles.values())
            self.d_mem = int(cuda("cudaMalloc", max(self.memory_size, 1)))
            for c in self.tiles.values():
                ctx = c.ctx
                assert ctx is not None
                ctx.set_device_memory(self.d_mem, self.memory_size)

    def _memory_need(self, c: TileContext, sizes: tuple[int, ...]) -> int:
        """Activation memory of one context for the largest batch served (not the profile's maximum)."""
        ctx: tensorrt.IExecutionContext = c.ctx
        if not hasattr(ctx, "update_device_memory_size_for_shapes"):
            eng: tensorrt.ICudaEngine = c.plan.engine
            return int(eng.get_device_memory_size_for_profile_v2(c.profile))
        need = 0
        for bs in sizes:
            self._set_shape(c, bs)
            need = max(need, int(ctx.update_device_memory_size_for_shapes()))
        return need

    # ------------------------------------------------------------------ running

    def _set_shape(self, c: TileContext, bs: int) -> None:
        if c.shape_bs != bs:
            t = c.plan.tile
            ctx: tensorrt.IExecutionContext = c.ctx
            if not ctx.set_input_shape(c.plan.in_name, (bs, t, t, 3)):
                raise RuntimeError(f"TensorRT rejected input shape {(bs, t, t, 3)}")
            c.shape_bs = bs

    def _enqueue(self, c: TileContext, bs: int) -> None:
        cuda, s = self.cuda, self.stream
        kind = cuda.rt.cudaMemcpyKind
        cuda("cudaMemcpyAsync", self.d_in, c.h_in_ptr, c.h_in[:bs].nbytes, kind.cudaMemcpyHostToDevice, s)
        ctx: tensorrt.IExecutionContext = c.ctx
        if not ctx.execute_async_v3(int(s)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        cuda("cudaMemcpyAsync", c.h_out_ptr, self.d_out, c.h_out[:bs].nbytes, kind.cudaMemcpyDeviceToHost, s)

    def context(self, h: int, w: int) -> TileContext:
        c = self.tiles.get(h) if h == w else None
        if c is None:
            raise ValueError(f"{h}×{w} input tiles are not served; tiles: {sorted(self.tiles)}")
        return c

    def run(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [B, t, t, 3] on the tile's context; the result is a copy (the buffer is reused)."""
        cuda = self.cuda
        c = self.context(batch.shape[1], batch.shape[2])
        bs = batch.shape[0]
        if batch.ctypes.data != c.h_in_ptr:
            c.h_in[:bs] = batch
        g = c.graphs.get(bs)
        if g is not None:
            cuda("cudaGraphLaunch", g, self.stream)
        else:
            self._set_shape(c, bs)
            self._enqueue(c, bs)
        cuda("cudaStreamSynchronize", self.stream)
        return c.h_out[:bs].copy()

    def capture(self, tile: int, bs: int) -> bool:
        """Capture one graph for (tile, bs); False (and it runs without a graph) when capture fails."""
        cuda, c = self.cuda, self.tiles[tile]
        self._set_shape(c, bs)
        self._enqueue(c, bs)  # uncaptured: flushes the deferred work of the shape change
        cuda("cudaStreamSynchronize", self.stream)
        mode = cuda.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        error: BaseException | None = None
        graph = None
        try:
            cuda("cudaStreamBeginCapture", self.stream, mode)
        except RuntimeError as e:
            log.warning("%s: CUDA graph capture for %d×%d unavailable: %s", self.model, bs, tile, e)
            return False
        try:
            self._enqueue(c, bs)
        except Exception as e:
            error = e
        finally:
            try:
                graph = cuda("cudaStreamEndCapture", self.stream)  # always end it: the stream stays usable
            except RuntimeError as e:
                error = error or e
        if error is not None or graph is None:
            log.warning(
                "%s: CUDA graph capture for %d×%d px failed, running it without: %s",
                self.model,
                bs,
                tile,
                error,
            )
            if graph is not None:
                cuda("cudaGraphDestroy", graph)
            cuda.rt.cudaGetLastError()  # clear the error state the failed capture left
            return False
        c.graph_objs.append(graph)
        c.graphs[bs] = cuda("cudaGraphInstantiate", graph, 0)
        return True

    def close(self) -> None:
        """Free everything; the contexts go before the memory they run in. Best effort (shutdown)."""
        for c in self.tiles.values():
            c.ctx = None
        frees: list[tuple[str, Any]] = []
        for c in self.tiles.values():
            frees += [("cudaGraphExecDestroy", g) for g in c.graphs.values()]
            frees += [("cudaGraphDestroy", g) for g in c.graph_objs]
            frees += [("cudaFreeHost", p) for p in (c.h_in_ptr, c.h_out_ptr)]
        frees += [("cudaFree", p) for p in (self.d_in, self.d_out, self.d_mem)]
        frees.append(("cudaStreamDestroy", self.stream))
        for fn, h in frees:
            try:
                if h:
                    self.cuda(fn, h)
            except Exception as e:
                log.debug("%s: %s", fn, e)
        self.tiles = {}
        self.stream, self.d_in, self.d_out, self.d_mem = None, 0, 0, 0
