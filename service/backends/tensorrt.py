"""TensorRT runtime backend (TensorRT 10/11 API): the fastest path on NVIDIA GPUs.

- The engine (plan) is chosen from manifest.engines for this GPU's compute capability, verified
  against its sha256 and TensorRT version, and deserialised once.
- Each instance is one IExecutionContext (the weights are shared by all contexts) with its own CUDA
  stream, its own device buffers and its own pinned host buffers, so the H2D copy, the kernels and
  the D2H copy of different instances overlap. The batcher gathers tiles straight into the pinned
  input buffer (`input_buffer`), saving a host copy.
- Tile shapes are static; only the batch axis varies, within the engine's optimisation profile.
  Contexts get distinct profiles when the engine has enough of them (concurrent contexts must not
  share one on older TensorRT), else all use profile 0.
- Optional CUDA graphs: one captured graph per batch size (copy in, enqueue, copy out) per instance.

`tensorrt` and the CUDA bindings (`cuda-python`) are imported in load(): on a machine without them
this module still imports, and load() raises BackendUnavailable with the reason.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from service.backends.base import BackendInfo, BackendUnavailable, tile_shapes, timed_warmup
from service.manifest import Engine, Manifest, verify_artifact

log = logging.getLogger(__name__)


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python ≥ 12.6

        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # older cuda-python

        return cudart
    except ImportError as e:
        raise BackendUnavailable(
            "the TensorRT backend needs cuda-python (pip install 'gendr-serve[trt]')"
        ) from e


class _Cuda:
    """Thin checked wrapper over cuda-python's runtime API (which returns (err, *values) tuples)."""

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart

    def __call__(self, fn: str, *args: Any) -> Any:
        res = getattr(self.rt, fn)(*args)
        err, rest = (res[0], res[1:]) if isinstance(res, tuple) else (res, ())
        if int(err) != 0:
            name = self.rt.cudaGetErrorName(err)[1]
            raise RuntimeError(f"{fn} failed: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else rest


class _Context:
    """One engine instance: execution context, stream, buffers, graphs."""

    def __init__(self) -> None:
        self.ctx: Any = None
        self.stream: Any = None
        self.d_in = 0
        self.d_out = 0
        self.h_in_ptr = 0
        self.h_out_ptr = 0
        self.h_in: np.ndarray = np.empty(0, np.uint8)
        self.h_out: np.ndarray = np.empty(0, np.uint8)
        self.graphs: dict[int, Any] = {}  # batch size → cudaGraphExec_t
        self.graph_objs: list[Any] = []


def _pinned_view(ptr: int, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(int(ptr))).reshape(shape)


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
        self._cuda: _Cuda | None = None
        self._in_name = self._out_name = ""
        self._tls = threading.local()
        self._healthy = False

    # ------------------------------------------------------------------ description

    def _planned_sizes(self) -> tuple[int, ...]:
        if self._batch_sizes:
            return self._batch_sizes
        if self.engine_entry is not None:
            return tuple(b for b in sorted(self.engine_entry.profile.batch_sizes) if b <= self.max_batch) or (
                1,
            )
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

    def load(self) -> None:
        try:
            import tensorrt as trt
        except ImportError as e:
            raise BackendUnavailable("tensorrt is not installed (pip install 'gendr-serve[trt]')") from e
        from service.backends.select import find_engine, gpu_info

        cuda = self._cuda = _Cuda(_import_cudart())
        gpu = gpu_info(self.device_id)
        if gpu is None:
            raise BackendUnavailable(f"no NVIDIA GPU at index {self.device_id}")
        self._gpu_desc = f"cuda:{self.device_id} ({gpu.name}, {gpu.sm})"
        if self.engine_entry is None:
            self.engine_entry = find_engine(self.manifest, gpu, self.precision)
        e = self.engine_entry
        if e is None:
            built = (
                ", ".join(f"{x.precision}@{x.compute_capability}" for x in self.manifest.engines) or "none"
            )
            raise BackendUnavailable(
                f"{self.manifest.name}: no TensorRT engine for {gpu.sm} ({gpu.name}) at precision "
                f"{self.precision}; built: {built}. "
                f"Run `gendr-build engine --model models/{self.manifest.name}` on this GPU type"
            )
        if e.compute_capability != gpu.compute_capability:
            raise BackendUnavailable(
                f"engine built for {e.compute_capability}, GPU is {gpu.compute_capability}"
            )
        if e.tensorrt_version.split(".")[:2] != trt.__version__.split(".")[:2]:
            raise BackendUnavailable(
                f"engine built with TensorRT {e.tensorrt_version}, runtime is {trt.__version__}: "
                "rebuild the engine"
            )
        plan = verify_artifact(self.model_dir, e.plan)
        cuda("cudaSetDevice", self.device_id)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self._engine is None:
            raise BackendUnavailable(f"{plan}: TensorRT could not deserialise the engine (see its log above)")
        self._bind_io(trt)
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

    def _bind_io(self, trt: Any) -> None:
        eng = self._engine
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
        t, ot = tile_shapes(self.manifest)
        lo, hi = 1 << 30, 0
        for p in range(eng.num_optimization_profiles):
            mn, _, mx = eng.get_tensor_profile_shape(self._in_name, p)
            if tuple(mn[1:]) != (t, t, 3) or tuple(mx[1:]) != (t, t, 3):
                raise BackendUnavailable(
                    f"engine profile {p} has tile shape {tuple(mn)}..{tuple(mx)}, manifest says {t}"
                )
            lo, hi = min(lo, mn[0]), max(hi, mx[0])
        wanted = (
            self.engine_entry.profile.batch_sizes if self.engine_entry else list(range(1, self.max_batch + 1))
        )
        sizes = tuple(sorted(b for b in wanted if lo <= b <= min(hi, self.max_batch)))
        if not sizes:
            raise BackendUnavailable(
                f"engine runs batch {lo}..{hi}; none of {wanted} fits max_batch {self.max_batch}"
            )
        self._batch_sizes = sizes
        self._ot = ot

    def _make_contexts(self) -> None:
        cuda = self._cuda
        assert cuda is not None
        t, ot = tile_shapes(self.manifest)
        bmax = self._batch_sizes[-1]
        n_prof = self._engine.num_optimization_profiles
        for i in range(self.instances):
            c = _Context()
            c.ctx = self._engine.create_execution_context()
            if c.ctx is None:
                raise BackendUnavailable("could not create an execution context (GPU memory?)")
            c.stream = cuda("cudaStreamCreateWithFlags", self.rt.cudaStreamNonBlocking)
            profile = i if n_prof >= self.instances else 0
            if profile and not c.ctx.set_optimization_profile_async(profile, int(c.stream)):
                raise BackendUnavailable(f"could not select optimisation profile {profile} for context {i}")
            in_bytes, out_bytes = bmax * t * t * 3, bmax * ot * ot * 3
            c.d_in = int(cuda("cudaMalloc", in_bytes))
            c.d_out = int(cuda("cudaMalloc", out_bytes))
            c.h_in_ptr = int(cuda("cudaMallocHost", in_bytes))
            c.h_out_ptr = int(cuda("cudaMallocHost", out_bytes))
            c.h_in = _pinned_view(c.h_in_ptr, (bmax, t, t, 3))
            c.h_out = _pinned_view(c.h_out_ptr, (bmax, ot, ot, 3))
            c.ctx.set_tensor_address(self._in_name, c.d_in)
            c.ctx.set_tensor_address(self._out_name, c.d_out)
            self._contexts.append(c)

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

    def _enqueue(self, c: _Context, bs: int) -> None:
        cuda = self._cuda
        assert cuda is not None
        t, ot = tile_shapes(self.manifest)
        rt = self.rt
        cuda(
            "cudaMemcpyAsync",
            c.d_in,
            c.h_in_ptr,
            bs * t * t * 3,
            rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
            c.stream,
        )
        if not c.ctx.execute_async_v3(int(c.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        cuda(
            "cudaMemcpyAsync",
            c.h_out_ptr,
            c.d_out,
            bs * ot * ot * 3,
            rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
            c.stream,
        )

    def _capture(self, c: _Context, bs: int) -> None:
        cuda = self._cuda
        assert cuda is not None
        rt = self.rt
        cuda("cudaStreamBeginCapture", c.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        try:
            self._enqueue(c, bs)
        finally:
            graph = cuda("cudaStreamEndCapture", c.stream)
        c.graph_objs.append(graph)
        c.graphs[bs] = cuda("cudaGraphInstantiate", graph, 0)

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
        if not c.ctx.set_input_shape(self._in_name, batch.shape):
            raise RuntimeError(f"TensorRT rejected input shape {batch.shape}")
        g = c.graphs.get(bs)
        if g is not None:
            cuda("cudaGraphLaunch", g, c.stream)
        else:
            self._enqueue(c, bs)
        cuda("cudaStreamSynchronize", c.stream)
        return c.h_out[:bs].copy()  # the pinned buffer is reused by the next call

    def warmup(self) -> dict[int, float]:
        timings = timed_warmup(self, self.instances, self._batch_sizes)  # also triggers lazy allocations
        if self.cuda_graphs:
            self._ensure_device()
            for c in self._contexts:
                for bs in self._batch_sizes:
                    t = self.manifest.tile.tile
                    c.ctx.set_input_shape(self._in_name, (bs, t, t, 3))
                    self._capture(c, bs)
            timings = timed_warmup(self, self.instances, self._batch_sizes)
        return timings

    def healthy(self) -> bool:
        return self._healthy

    def close(self) -> None:
        self._healthy = False
        cuda = self._cuda
        if cuda is None:
            return
        for c in self._contexts:
            for fn, h in (
                [("cudaGraphExecDestroy", g) for g in c.graphs.values()]
                + [("cudaGraphDestroy", g) for g in c.graph_objs]
                + [
                    ("cudaFree", c.d_in),
                    ("cudaFree", c.d_out),
                    ("cudaFreeHost", c.h_in_ptr),
                    ("cudaFreeHost", c.h_out_ptr),
                    ("cudaStreamDestroy", c.stream),
                ]
            ):
                try:
                    if h:
                        cuda(fn, h)
                except Exception as e:  # best effort at shutdown
                    log.debug("%s: %s", fn, e)
            c.ctx = None
        self._contexts = []
        self._engine = None
        self._runtime = None
