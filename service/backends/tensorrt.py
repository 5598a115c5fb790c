"""TensorRT runtime backend (TensorRT 10.1+ / 11 API): the fastest path on NVIDIA GPUs.

- Plans: one per static tile the model serves (the primary tile and its shape buckets), chosen for this
  GPU's compute capability and this exact TensorRT version, verified and deserialised once
  (service/backends/trt_plans.py). The primary tile's plan is required; a bucket without a usable plan
  is left out (logged) and `info.tiles` lists the tiles really served. Engine calls are static-shape
  (`info.dynamic` is False); only the batch axis varies inside a plan's optimisation profile.
- Instances: each is an execution context per tile plan and batch size (weights are shared by all
  contexts of a plan; a context's input shape never changes, so its CUDA graph stays valid) with its own
  CUDA stream, device buffers, pinned host buffers and ONE activation memory block the contexts of the
  instance share, since an instance runs one call at a time (service/backends/trt_instances.py).
  `infer` picks the context by the batch's tile and size.
- TensorRT 10/11 let several contexts use one profile, so the default engine has one profile and every
  context uses it (extra identical profiles, if built, are spread over the instances). `per-batch`
  engines (one min = max profile per batch size) would need a context per profile and are refused.
- The batch sizes reported before load() are the manifest entry's; after load() they are the sizes the
  plans really serve (the batcher reads them again when it starts).
- Optional CUDA graphs, one per (tile, batch size) context per instance, captured in warmup() and each
  checked against an uncaptured run there (`graph_check()`; a graph that disagrees is dropped).

`tensorrt` and the CUDA bindings (cuda-python) are imported in load(): without them this module still
imports, and load() raises BackendUnavailable with the reason.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.backends.base import BackendInfo, BackendUnavailable, Timings, timed_warmup
from service.backends.cuda_rt import CudaRuntime
from service.backends.trt_instances import Instance
from service.backends.trt_memory import fit_instances, free_memory
from service.backends.trt_plans import TilePlan, choose_primary, load_plans, served_tiles_before_load
from service.hardware import gpu_info, import_cudart, tensorrt_module, tensorrt_too_old
from service.manifest import Engine, Manifest
from service.settings import Settings

log = logging.getLogger(__name__)


class TensorRTBackend:
    def __init__(
        self,
        manifest: Manifest,
        model_dir: Path | str,
        *,
        precision: str = "auto",
        device_id: int = 0,
        instances: int | Literal["auto"] = 1,
        max_batch: int = 4,
        cuda_graphs: bool = False,
        engine: Engine | None = None,
    ) -> None:
        self.manifest = manifest
        self.model_dir = Path(model_dir)
        self.precision = precision
        self.device_id = device_id
        self.auto_instances = instances == "auto"  # as many as the free memory holds, measured at load
        self.instances = 1 if instances == "auto" else int(instances)
        self.placement = ""  # how the plan fits this GPU (in selection_reason via info.extra)
        self.max_batch = max_batch
        self.cuda_graphs = cuda_graphs
        self.engine_entry = engine  # the primary tile's plan (chosen in load() when None)
        self._gpu_desc = f"cuda:{device_id}"
        self._batch_sizes: tuple[int, ...] = ()
        self._plans: dict[int, TilePlan] = {}
        self._instances: list[Instance] = []
        self._runtime: Any = None
        self._cuda: CudaRuntime | None = None
        self._tls = threading.local()
        self._healthy = False

    @classmethod
    def from_settings(
        cls, name: str, manifest: Manifest, model_dir: Path, settings: Settings
    ) -> TensorRTBackend:
        return cls(
            manifest,
            model_dir,
            precision=settings.precision,
            device_id=settings.device_id,
            instances=settings.instances_per_device,
            max_batch=settings.max_batch,
            cuda_graphs=settings.cuda_graphs,
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
            tiles=tuple(self._plans) or served_tiles_before_load(self.manifest, e),
            dynamic=False,
            extra={
                "cuda_graphs": str(self.cuda_graphs),
                "tensorrt_version": e.tensorrt_version if e else "",
                **({"placement": self.placement} if self.placement else {}),
            },
        )

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        if tensorrt_module() is None:
            raise BackendUnavailable(
                "tensorrt is not installed (or only its type stubs are): pip install 'gendr-serve[trt]'"
            )
        import tensorrt as trt

        too_old = tensorrt_too_old(str(trt.__version__))
        if too_old is not None:
            raise BackendUnavailable(too_old)
        cudart = import_cudart()
        if cudart is None:
            raise BackendUnavailable(
                "the TensorRT backend needs cuda-python (pip install 'gendr-serve[trt]')"
            )
        cuda = self._cuda = CudaRuntime(cudart)
        gpu = gpu_info(self.device_id)
        if gpu is None:
            raise BackendUnavailable(f"no NVIDIA GPU at CUDA index {self.device_id}")
        self._gpu_desc = f"cuda:{self.device_id} ({gpu.name}, {gpu.sm})"
        e = choose_primary(self.manifest, gpu, self.precision, str(trt.__version__), self.engine_entry)
        self.engine_entry = e
        cuda("cudaSetDevice", self.device_id)
        self._tls.device = self.device_id
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        free_at_start = free_memory(cuda)
        plans, self._batch_sizes = load_plans(self._runtime, self.manifest, self.model_dir, e, self.max_batch)
        self._plans = plans
        free_with_plans = free_memory(cuda)
        self._add_instance(cuda, 0)
        fit = fit_instances(
            free_at_start, free_with_plans, free_memory(cuda), self.instances, self.auto_instances
        )  # BackendUnavailable when the asked instances do not fit: environmental, fall back
        for i in range(len(self._instances), fit.instances):
            self._add_instance(cuda, i)
        self.instances = fit.instances
        if e.gpu_name != gpu.name:  # another product of the same architecture: served because it fits
            self.placement = f"plan built on {e.gpu_name}, served on {gpu.name} (same {gpu.sm}): {fit.note}"
            log.info("%s: %s", self.manifest.name, self.placement)
        elif self.auto_instances:
            self.placement = f"instances auto: {fit.note}"
        self._healthy = True
        log.info(
            "%s: TensorRT %s plans for tiles %s on %s, %d instance(s), batch sizes %s, "
            "%.1f MB shared context memory per instance, CUDA graphs %s",
            self.manifest.name,
            e.precision,
            list(plans),
            self._gpu_desc,
            self.instances,
            self._batch_sizes,
            self._instances[0].memory_size / 1e6 if self._instances else 0.0,
            self.cuda_graphs,
        )

    def _add_instance(self, cuda: CudaRuntime, i: int) -> None:
        inst = Instance(cuda, i, self.manifest.name)
        self._instances.append(inst)  # close() frees what was allocated even if setup fails
        inst.setup(self._plans, self._batch_sizes, self.manifest.tile.graph_scale)

    # ------------------------------------------------------------------ running

    def _ensure_device(self) -> None:
        if getattr(self._tls, "device", None) != self.device_id:
            assert self._cuda is not None
            self._cuda("cudaSetDevice", self.device_id)
            self._tls.device = self.device_id

    def input_buffer(self, instance: int, n: int, tile: int) -> np.ndarray:
        return self._instances[instance].context(tile, tile).h_in[:n]

    def infer(self, instance: int, batch: np.ndarray) -> np.ndarray:
        self._ensure_device()
        bs = batch.shape[0]
        if bs not in self._batch_sizes:
            raise ValueError(f"batch of {bs} not in the engine's sizes {self._batch_sizes}")
        return self._instances[instance].run(batch)

    def warmup(self) -> Timings:
        tiles = tuple(self._plans)
        timings = timed_warmup(self, self.instances, self._batch_sizes, tiles=tiles)  # lazy allocations
        if self.cuda_graphs:
            self._ensure_device()
            for inst in self._instances:
                for t in tiles:
                    for bs in self._batch_sizes:
                        inst.capture(t, bs)
                inst.check_graphs()  # every graph against an uncaptured run, after all captures
            timings = timed_warmup(self, self.instances, self._batch_sizes, tiles=tiles)
        return timings

    def graph_check(self) -> dict[tuple[int, int, int], int]:
        """(instance, tile, batch size) → max |graph − uncaptured| of that graph's output at warm-up (> 1:
        dropped). The GPU checks record it: every captured size compared, not only the last."""
        return {
            (inst.index, t, bs): d
            for inst in self._instances
            for t, c in inst.tiles.items()
            for bs, d in c.graph_diff.items()
        }

    def graph_sizes(self, instance: int = 0, tile: int | None = None) -> tuple[int, ...]:
        """Batch sizes that run as a CUDA graph on `instance` at `tile` (default: the primary tile)."""
        if not self._instances:
            return ()
        c = self._instances[instance].tiles.get(tile or self.manifest.tile.tile)
        return tuple(sorted(c.graphs)) if c is not None else ()

    def healthy(self) -> bool:
        return self._healthy

    def close(self) -> None:
        self._healthy = False
        for inst in self._instances:
            inst.close()
        self._instances = []
        self._plans = {}
        self._runtime = None
