"""One TensorRT engine instance: an execution context per (tile plan, batch size) over ONE memory block.

- An instance runs one call at a time (the batcher's contract), so its contexts — one per tile plan and
  batch size served, each on its instance's optimisation profile — share one CUDA stream, one device
  input/output pair sized for the largest tile, and one activation memory block (`USER_MANAGED`
  allocation) sized for the largest need over them (`update_device_memory_size_for_shapes`), not for
  the profiles' maximum. Instances have their own, so the copies and kernels of different instances
  overlap.
- A context per batch size, its input shape set once at setup and never changed: a CUDA graph is valid
  only for the shape its context had when it was captured (NVIDIA's guide: recapture after a shape
  change; trtexec captures one graph per context). One context moved between sizes would replay a
  graph recorded for another shape. It also spares the shape inference a shape change costs.
- Pinned host input/output buffers per tile: the batcher gathers tiles straight into the input one.
- Optional CUDA graphs, one per (tile, batch size) context, captured after an uncaptured enqueue (TensorRT
  defers shape-dependent work to the first enqueue after a shape change), then each checked against an
  uncaptured run on the same tiles; a failed capture or a graph that disagrees is dropped (logged) and
  that shape runs without a graph.
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

#: Largest |graph − uncaptured| in a uint8 output that still counts as the same result (a kernel whose
#: reduction order varies may round one grey level apart; a stale graph is garbage).
GRAPH_TOLERANCE = 1


class TileContext:
    """One tile plan in an instance: a context per batch size, pinned buffers, CUDA graphs."""

    def __init__(self, plan: TilePlan) -> None:
        self.plan = plan
        self.ctxs: dict[int, Any] = {}  # batch size → IExecutionContext, its input shape fixed
        self.profile = 0
        self.h_in_ptr = self.h_out_ptr = 0
        self.h_in: np.ndarray = np.empty(0, np.uint8)
        self.h_out: np.ndarray = np.empty(0, np.uint8)
        self.graphs: dict[int, Any] = {}  # batch size → cudaGraphExec_t
        self.graph_objs: dict[int, Any] = {}  # batch size → cudaGraph_t
        self.graph_diff: dict[int, int] = {}  # batch size → max |graph − uncaptured| at warm-up


class Instance:
    """Stream, shared device buffers and memory, and a TileContext per tile served."""

    def __init__(self, cuda: CudaRuntime, index: int, model: str) -> None:
        self.cuda, self.index, self.model = cuda, index, model
        self.stream: Any = None
        self.d_in = self.d_out = self.d_mem = 0
        self.memory_size = 0  # bytes of the shared activation memory
        self.tiles: dict[int, TileContext] = {}

    # ------------------------------------------------------------------ setup

    def setup(self, plans: dict[int, TilePlan], sizes: tuple[int, ...], scale: int) -> None:
        """Contexts, buffers and the shared memory; what was allocated is freed by close() on failure."""
        import tensorrt as trt

        cuda = self.cuda
        bmax, big = sizes[-1], max(plans)
        self.stream = cuda("cudaStreamCreateWithFlags", cuda.rt.cudaStreamNonBlocking)
        self.d_in = int(cuda("cudaMalloc", bmax * big * big * 3))
        self.d_out = int(cuda("cudaMalloc", bmax * (big * scale) ** 2 * 3))
        need = 0
        for t, plan in plans.items():
            c = self.tiles[t] = TileContext(plan)
            eng: tensorrt.ICudaEngine = plan.engine
            c.profile = self.index % eng.num_optimization_profiles
            ot = t * scale
            c.h_in_ptr = int(cuda("cudaMallocHost", bmax * t * t * 3))
            c.h_out_ptr = int(cuda("cudaMallocHost", bmax * ot * ot * 3))
            c.h_in = pinned_view(c.h_in_ptr, (bmax, t, t, 3))
            c.h_out = pinned_view(c.h_out_ptr, (bmax, ot, ot, 3))
            for bs in sizes:
                ctx = c.ctxs[bs] = self._context(c, bs, trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                if hasattr(ctx, "update_device_memory_size_for_shapes"):
                    need = max(need, int(ctx.update_device_memory_size_for_shapes()))
                else:
                    need = max(need, int(eng.get_device_memory_size_for_profile_v2(c.profile)))
        self.memory_size = need
        self.d_mem = int(cuda("cudaMalloc", max(need, 1)))
        for c in self.tiles.values():
            for ctx in c.ctxs.values():
                ctx.set_device_memory(self.d_mem, self.memory_size)

    def _context(self, c: TileContext, bs: int, strategy: Any) -> Any:
        """A context of the tile's plan on this instance's profile, its addresses and input shape set."""
        t, plan = c.plan.tile, c.plan
        eng: tensorrt.ICudaEngine = plan.engine
        ctx: tensorrt.IExecutionContext | None = eng.create_execution_context(strategy)
        if ctx is None:
            raise BackendUnavailable(
                f"could not create an execution context for {bs}×{t}-px tiles (GPU memory?)"
            )
        if not ctx.set_optimization_profile_async(c.profile, int(self.stream)):
            raise BackendUnavailable(f"could not select optimisation profile {c.profile} ({t}-px tiles)")
        ctx.set_tensor_address(plan.in_name, self.d_in)
        ctx.set_tensor_address(plan.out_name, self.d_out)
        if not ctx.set_input_shape(plan.in_name, (bs, t, t, 3)):
            raise BackendUnavailable(f"TensorRT rejected input shape {(bs, t, t, 3)}")
        return ctx

    # ------------------------------------------------------------------ running

    def _enqueue(self, c: TileContext, bs: int) -> None:
        cuda, s = self.cuda, self.stream
        kind = cuda.rt.cudaMemcpyKind
        cuda("cudaMemcpyAsync", self.d_in, c.h_in_ptr, c.h_in[:bs].nbytes, kind.cudaMemcpyHostToDevice, s)
        ctx: tensorrt.IExecutionContext = c.ctxs[bs]
        if not ctx.execute_async_v3(int(s)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        cuda("cudaMemcpyAsync", c.h_out_ptr, self.d_out, c.h_out[:bs].nbytes, kind.cudaMemcpyDeviceToHost, s)

    def context(self, h: int, w: int) -> TileContext:
        c = self.tiles.get(h) if h == w else None
        if c is None:
            raise ValueError(f"{h}×{w} input tiles are not served; tiles: {sorted(self.tiles)}")
        return c

    def run(self, batch: np.ndarray, graph: bool = True) -> np.ndarray:
        """uint8 [B, t, t, 3] on the (tile, B) context, replaying its graph unless `graph` is False; the
        result is a copy (the buffer is reused)."""
        cuda = self.cuda
        c = self.context(batch.shape[1], batch.shape[2])
        bs = batch.shape[0]
        if bs not in c.ctxs:
            raise ValueError(f"batch of {bs} not served; sizes {sorted(c.ctxs)}")
        if batch.ctypes.data != c.h_in_ptr:
            c.h_in[:bs] = batch
        g = c.graphs.get(bs) if graph else None
        if g is not None:
            cuda("cudaGraphLaunch", g, self.stream)
        else:
            self._enqueue(c, bs)
        cuda("cudaStreamSynchronize", self.stream)
        return c.h_out[:bs].copy()

    def capture(self, tile: int, bs: int) -> bool:
        """Capture one graph on the (tile, bs) context; False (it runs without) when capture fails."""
        cuda, c = self.cuda, self.tiles[tile]
        self._enqueue(c, bs)  # uncaptured: flushes the deferred work of the context's shape
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
        c.graph_objs[bs] = graph
        c.graphs[bs] = cuda("cudaGraphInstantiate", graph, 0)
        return True

    def check_graphs(self, seed: int = 0) -> None:
        """Replay every captured graph and run the same tiles uncaptured (after all captures, in the order
        a mixed load would): a graph that disagrees is dropped with an ERROR and its shape runs plain."""
        rng = np.random.default_rng(seed)
        for t, c in self.tiles.items():
            for bs in sorted(c.graphs):
                x = rng.integers(0, 256, (bs, t, t, 3), dtype=np.uint8)
                got = self.run(x).astype(np.int16)
                diff = int(np.abs(got - self.run(x, graph=False)).max(initial=0))
                c.graph_diff[bs] = diff
                if diff > GRAPH_TOLERANCE:
                    log.error(
                        "%s: instance %d: the CUDA graph for %d×%d-px tiles differs from the uncaptured run "
                        "by %d grey levels; dropped, that shape runs without a graph",
                        self.model,
                        self.index,
                        bs,
                        t,
                        diff,
                    )
                    self._drop_graph(c, bs)

    def _drop_graph(self, c: TileContext, bs: int) -> None:
        self.cuda("cudaGraphExecDestroy", c.graphs.pop(bs))
        self.cuda("cudaGraphDestroy", c.graph_objs.pop(bs))

    def close(self) -> None:
        """Free everything; the contexts go before the memory they run in. Best effort (shutdown)."""
        for c in self.tiles.values():
            c.ctxs = {}
        frees: list[tuple[str, Any]] = []
        for c in self.tiles.values():
            frees += [("cudaGraphExecDestroy", g) for g in c.graphs.values()]
            frees += [("cudaGraphDestroy", g) for g in c.graph_objs.values()]
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
