"""TensorRT runtime backend (TensorRT 10/11 API): the fastest path on NVIDIA GPUs.

- The engine (plan) is chosen from manifest.engines for this GPU's compute capability and this exact
  TensorRT version (a plan deserialises only in the version that built it), verified against its
  sha256 and deserialised once.
- Each instance is one IExecutionContext (the weights are shared by all contexts) with its own CUDA
  stream, device buffers and pinned host buffers, so the H2D copy, the kernels and the D2H copy of
  different instances overlap. The batcher gathers tiles straight into the pinned input buffer.
- Tile shapes are static; only the batch axis varies inside the engine's optimisation profile.
  TensorRT 10/11 let several contexts use one profile, so the default engine has one profile and
  every context uses it (extra identical profiles, if built, are spread over the contexts).
  `per-batch` engines (one min = max profile per batch size) would need a context per profile and
  are refused at build and load time.
- Context memory is sized for the batch sizes served (`USER_MANAGED` allocation sized by
  `update_device_memory_size_for_shapes`), not for the profile's maximum.
- The batch sizes reported before load() are the manifest entry's; after load() they are the sizes
  the plan really serves (the batcher reads them again when it starts).
- Optional CUDA graphs: one graph per batch size per instance, captured after an uncaptured enqueue
  at that shape (TensorRT defers shape-dependent work to the first enqueue after a shape change). A
  failed capture is ended, logged, and that size runs without a graph.

`tensorrt` and the CUDA bindings (cuda-python) are imported in load(): without them this module still
imports, and load() raises BackendUnavailable with the reason.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.backends.base import BackendInfo, BackendUnavailable, tile_shapes, timed_warmup
from service.backends.cuda_rt import CudaRuntime, pinned_view
from service.hardware import gpu_info, import_cudart, tensorrt_module
from service.manifest import Engine, Manifest, verify_artifact
from service.settings import Settings

if TYPE_CHECKING:  # typed by tensorrt-stubs in scripts/typecheck_trt.sh; imported for real in load()
    import tensorrt

log = logging.getLogger(__name__)


class _Context:
    """One engine instance: execution context, stream, buffers, graphs."""

    def __init__(self) -> None:
        self.ctx: Any = None
        self.stream: Any = None
        self.profile = 0
        self.shape_bs = 0  # batch size of the last set_input_shape
        self.d_in = self.d_out = self.d_mem = 0
        self.h_in_ptr = self.h_out_ptr = 0
        self.h_in: np.ndarray = np.empty(0, np.uint8)
        self.h_out: np.ndarray = np.empty(0, np.uint8)
        self.graphs: dict[int, Any] = {}  # batch size → cudaGraphExec_t
        self.graph_objs: list[Any] = []


class TensorRTBackend:
    def __init__(
        self,
        manifest: Manifest,
        model_dir: Path | str,
        *,
        precision: str = "auto",
        device_id: int = 0,
        instances: int = 1,
        max_batch: int = 4,
        cuda_graphs: bool = False,
        selection_reason: str = "",
        engine: Engine | None = None,
    ) -> None:
        self.manifest = manifest
        self.model_dir = Path(model_dir)
        self.precision = precision
        self.device_id = device_id
        self.instances = instances
        self.max_batch = max_batch
        self.cuda_graphs = cuda_graphs
        self._reason = selection_reason
        self.engine_entry = engine
        self._gpu_desc = f"cuda:{device_id}"
        self._batch_sizes: tuple[int, ...] = ()
        self._contexts: list[_Context] = []
        self._engine: Any = None
        self._runtime: Any = None
        self._cuda: CudaRuntime | None = None
        self._in_name = self._out_name = ""
        self._tls = threading.local()
        self._healthy = False

    @classmethod
    def from_settings(
        cls, name: str, manifest: Manifest, model_dir: Path, settings: Settings, reason: str = ""
    ) -> TensorRTBackend:
        return cls(
            manifest,
            model_dir,
            precision=settings.precision,
            device_id=settings.device_id,
            instances=settings.instances_per_device,
            max_batch=settings.max_batch,
            cuda_graphs=settings.cuda_graphs,
            selection_reason=reason,
        )

    # ------------------------------------------------------------------ description

    def _planned_sizes(self) -> tuple[int, ...]:
        if self._batch_sizes:
            return self._batch_sizes
        if self.engine_entry is not None:
            sizes = sorted(self.engine_entry.profile.batch_sizes)
            return tuple(b for b in sizes if b <= self.max_batch) or (sizes[0],)
        return tuple(range(1, self.max_batch + 1))

    @property
    def info(self) -> BackendInfo:
        e = self.engine_entry
        return BackendInfo(
            name="tensorrt",
            device=self._gpu_desc,
            precision=e.precision if e else self.precision,
            engine_key=(e.plan.sha256[:16] if e else ""),
            batch_sizes=self._planned_sizes(),
            instances=self.instances,
            selection_reason=self._reason,
            extra={"cuda_graphs": str(self.cuda_graphs), "tensorrt_version": e.tensorrt_version if e else ""},
        )

    # ------------------------------------------------------------------ loading

    def _choose_engine(self, trt_version: str) -> Engine:
        from service.backends.select import engines_for

        gpu = gpu_info(self.device_id)
        if gpu is None:
            raise BackendUnavailable(f"no NVIDIA GPU at CUDA index {self.device_id}")
        self._gpu_desc = f"cuda:{self.device_id} ({gpu.name}, {gpu.sm})"
        ok, _ = engines_for(self.manifest, gpu, self.precision, trt_version)
        e = self.engine_entry
        if e is None:
            if not ok:
                built = ", ".join(
                    f"{x.precision}@{x.compute_capability} (TensorRT {x.tensorrt_version})"
                    for x in self.manifest.engines
                )
                raise BackendUnavailable(
                    f"{self.manifest.name}: no TensorRT engine for {gpu.sm} ({gpu.name}), TensorRT "
                    f"{trt_version}, precision {self.precision}; built: {built or 'none'}. "
                    f"Run `gendr-build engine --model models/{self.manifest.name}` on this GPU type"
                )
            e = ok[0]
        elif e.compute_capability != gpu.compute_capability:
            raise BackendUnavailable(
                f"engine built for {e.compute_capability}, GPU is {gpu.compute_capability}"
            )
        elif e.tensorrt_version != trt_version:
            raise BackendUnavailable(
                f"engine built with TensorRT {e.tensorrt_version}, runtime is {trt_version}: a plan only "
                "loads in the exact version that built it; rebuild the engine"
            )
        if e.profile.mode == "per-batch":
            raise BackendUnavailable(
                f"{e.plan.path}: per-batch profile engines are not served (a context is pinned to one "
                "profile but offered every batch size); rebuild with --profile-mode shared"
            )
        return e

    def load(self) -> None:
        if tensorrt_module() is None:
            raise BackendUnavailable(
                "tensorrt is not installed (or only its type stubs are): pip install 'gendr-serve[trt]'"
            )
        import tensorrt as trt

        cudart = import_cudart()
        if cudart is None:
            raise BackendUnavailable(
                "the TensorRT backend needs cuda-python (pip install 'gendr-serve[trt]')"
            )
        cuda = self._cuda = CudaRuntime(cudart)
        e = self.engine_entry = self._choose_engine(str(trt.__version__))
        plan = verify_artifact(self.model_dir, e.plan)
        cuda("cudaSetDevice", self.device_id)
        self._tls.device = self.device_id
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self._engine is None:
            raise BackendUnavailable(f"{plan}: TensorRT could not deserialise the engine (see its log above)")
        self._bind_io()
        self._make_contexts()
        self._healthy = True
        log.info(
            "%s: TensorRT %s engine %s on %s, %d context(s), batch sizes %s, CUDA graphs %s",
            self.manifest.name,
            e.precision,
            plan.name,
            self._gpu_desc,
            self.instances,
            self._batch_sizes,
            self.cuda_graphs,
        )

    def _bind_io(self) -> None:
        import tensorrt as trt

        eng: tensorrt.ICudaEngine = self._engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        ins = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise BackendUnavailable(f"engine must have one input and one output tensor, has {ins} → {outs}")
        self._in_name, self._out_name = ins[0], outs[0]
        for n in (ins[0], outs[0]):
            if eng.get_tensor_dtype(n) != trt.DataType.UINT8:
                raise BackendUnavailable(
                    f"engine tensor {n} is {eng.get_tensor_dtype(n)}, expected UINT8 tiles"
                )
        t, _ = tile_shapes(self.manifest)
        assert self.engine_entry is not None
        wanted = sorted(b for b in self.engine_entry.profile.batch_sizes if b <= self.max_batch)
        wanted = wanted or sorted(self.engine_entry.profile.batch_sizes)[:1]
        # every profile must run every served size: a context stays on its profile
        lo, hi = 0, 1 << 30
        for p in range(eng.num_optimization_profiles):
            mn, _, mx = eng.get_tensor_profile_shape(self._in_name, p)
            if tuple(mn[1:]) != (t, t, 3) or tuple(mx[1:]) != (t, t, 3):
                raise BackendUnavailable(
                    f"engine profile {p} has tile shape {tuple(mn[:])}..{tuple(mx[:])}, manifest says {t}"
                )
            lo, hi = max(lo, int(mn[0])), min(hi, int(mx[0]))
        sizes = tuple(b for b in wanted if lo <= b <= hi)
        if not sizes:
            raise BackendUnavailable(
                f"engine profiles run batch {lo}..{hi} in common; none of {wanted} "
                f"(max_batch {self.max_batch}) fits"
            )
        self._batch_sizes = sizes

    def _make_contexts(self) -> None:
        import tensorrt as trt

        eng: tensorrt.ICudaEngine = self._engine
        cuda = self._cuda
        assert cuda is not None
        t, ot = tile_shapes(self.manifest)
        bmax = self._batch_sizes[-1]
        n_prof = eng.num_optimization_profiles
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        for i in range(self.instances):
            c = _Context()
            self._contexts.append(c)  # close() frees what was allocated even if this loop fails
            ctx: tensorrt.IExecutionContext | None = (
                eng.create_execution_context(strategy)
                if strategy is not None
                else eng.create_execution_context()
            )
            if ctx is None:
                raise BackendUnavailable("could not create an execution context (GPU memory?)")
            c.stream = cuda("cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking)
            c.ctx = ctx
            c.profile = i % n_prof
            if not ctx.set_optimization_profile_async(c.profile, int(c.stream)):
                raise BackendUnavailable(f"could not select optimisation profile {c.profile} for context {i}")
            in_bytes, out_bytes = bmax * t * t * 3, bmax * ot * ot * 3
            c.d_in = int(cuda("cudaMalloc", in_bytes))
            c.d_out = int(cuda("cudaMalloc", out_bytes))
            c.h_in_ptr = int(cuda("cudaMallocHost", in_bytes))
            c.h_out_ptr = int(cuda("cudaMallocHost", out_bytes))
            c.h_in = pinned_view(c.h_in_ptr, (bmax, t, t, 3))
            c.h_out = pinned_view(c.h_out_ptr, (bmax, ot, ot, 3))
            if strategy is not None:
                size = self._context_memory(c)
                c.d_mem = int(cuda("cudaMalloc", max(size, 1)))
                ctx.set_device_memory(c.d_mem, size)
            ctx.set_tensor_address(self._in_name, c.d_in)
            ctx.set_tensor_address(self._out_name, c.d_out)

    def _context_memory(self, c: _Context) -> int:
        """Activation memory for the largest batch served (not the profile's maximum)."""
        t = self.manifest.tile.tile
        ctx: tensorrt.IExecutionContext = c.ctx
        if not hasattr(ctx, "update_device_memory_size_for_shapes"):
            eng: tensorrt.ICudaEngine = self._engine
            return int(eng.get_device_memory_size_for_profile_v2(c.profile))
        size = 0
        for bs in self._batch_sizes:
            self._set_shape(c, bs, t)
            size = max(size, int(ctx.update_device_memory_size_for_shapes()))
        return size

    @property
    def rt(self) -> Any:
        assert self._cuda is not None
        return self._cuda.rt

    # ------------------------------------------------------------------ running

    def _ensure_device(self) -> None:
        if getattr(self._tls, "device", None) != self.device_id:
            assert self._cuda is not None
            self._cuda("cudaSetDevice", self.device_id)
            self._tls.device = self.device_id

    def input_buffer(self, instance: int, n: int) -> np.ndarray:
        return self._contexts[instance].h_in[:n]

    def _set_shape(self, c: _Context, bs: int, t: int) -> None:
        if c.shape_bs != bs:
            ctx: tensorrt.IExecutionContext = c.ctx
            if not ctx.set_input_shape(self._in_name, (bs, t, t, 3)):
                raise RuntimeError(f"TensorRT rejected input shape {(bs, t, t, 3)}")
            c.shape_bs = bs

    def _enqueue(self, c: _Context, bs: int) -> None:
        cuda = self._cuda
        assert cuda is not None
        t, ot = tile_shapes(self.manifest)
        kind = self.rt.cudaMemcpyKind
        cuda("cudaMemcpyAsync", c.d_in, c.h_in_ptr, bs * t * t * 3, kind.cudaMemcpyHostToDevice, c.stream)
        ctx: tensorrt.IExecutionContext = c.ctx
        if not ctx.execute_async_v3(int(c.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        cuda("cudaMemcpyAsync", c.h_out_ptr, c.d_out, bs * ot * ot * 3, kind.cudaMemcpyDeviceToHost, c.stream)

    def _capture(self, c: _Context, bs: int) -> bool:
        """Capture one graph for `bs`; False (and the size runs without a graph) when capture fails."""
        cuda = self._cuda
        assert cuda is not None
        self._set_shape(c, bs, self.manifest.tile.tile)
        self._enqueue(c, bs)  # uncaptured: flushes the deferred work of the shape change
        cuda("cudaStreamSynchronize", c.stream)
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        error: BaseException | None = None
        graph = None
        try:
            cuda("cudaStreamBeginCapture", c.stream, mode)
        except RuntimeError as e:
            log.warning("%s: CUDA graph capture for batch %d unavailable: %s", self.manifest.name, bs, e)
            return False
        try:
            self._enqueue(c, bs)
        except Exception as e:
            error = e
        finally:
            try:
                graph = cuda("cudaStreamEndCapture", c.stream)  # always end it: the stream stays usable
            except RuntimeError as e:
                error = error or e
        if error is not None or graph is None:
            log.warning(
                "%s: CUDA graph capture for batch %d failed, running it without: %s",
                self.manifest.name,
                bs,
                error,
            )
            if graph is not None:
                cuda("cudaGraphDestroy", graph)
            self.rt.cudaGetLastError()  # clear the error state the failed capture left
            return False
        c.graph_objs.append(graph)
        c.graphs[bs] = cuda("cudaGraphInstantiate", graph, 0)
        return True

    def infer(self, instance: int, batch: np.ndarray) -> np.ndarray:
        cuda = self._cuda
        assert cuda is not None
        self._ensure_device()
        c = self._contexts[instance]
        bs = batch.shape[0]
        if bs not in self._batch_sizes:
            raise ValueError(f"batch of {bs} not in the engine's sizes {self._batch_sizes}")
        if batch.ctypes.data != c.h_in_ptr:
            c.h_in[:bs] = batch
        g = c.graphs.get(bs)
        if g is not None:
            cuda("cudaGraphLaunch", g, c.stream)
        else:
            self._set_shape(c, bs, batch.shape[1])
            self._enqueue(c, bs)
        cuda("cudaStreamSynchronize", c.stream)
        return c.h_out[:bs].copy()  # the pinned buffer is reused by the next call

    def warmup(self) -> dict[int, float]:
        timings = timed_warmup(self, self.instances, self._batch_sizes)  # also triggers lazy allocations
        if self.cuda_graphs:
            self._ensure_device()
            for c in self._contexts:
                for bs in self._batch_sizes:
                    self._capture(c, bs)
            timings = timed_warmup(self, self.instances, self._batch_sizes)
        return timings

    def graph_sizes(self, instance: int = 0) -> tuple[int, ...]:
        """Batch sizes that run as a CUDA graph on `instance` (the GPU check records them)."""
        return tuple(sorted(self._contexts[instance].graphs)) if self._contexts else ()

    def healthy(self) -> bool:
        return self._healthy

    def close(self) -> None:
        self._healthy = False
        cuda = self._cuda
        if cuda is None:
            return
        for c in self._contexts:
            c.ctx = None  # the context goes before the memory it runs in
            for fn, h in (
                [("cudaGraphExecDestroy", g) for g in c.graphs.values()]
                + [("cudaGraphDestroy", g) for g in c.graph_objs]
                + [("cudaFree", p) for p in (c.d_in, c.d_out, c.d_mem)]
                + [("cudaFreeHost", p) for p in (c.h_in_ptr, c.h_out_ptr)]
                + [("cudaStreamDestroy", c.stream)]
            ):
                try:
                    if h:
                        cuda(fn, h)
                except Exception as e:  # best effort at shutdown
                    log.debug("%s: %s", fn, e)
        self._contexts = []
        self._engine = None
        self._runtime = None
