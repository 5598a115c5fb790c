"""TensorRT engine build (TensorRT 10/11 Python API) into the model repository.

- Strongly typed network (`NetworkDefinitionCreationFlag.STRONGLY_TYPED` where the flag exists; TRT
  11 networks are strongly typed anyway): no FP16/INT8 builder flags, precision comes from the ONNX
  variant (fp16 graph → fp16 engine, Q/DQ graph → int8/fp8 engine).
- Static tile shape (the graph's), dynamic batch inside optimisation profiles. Default `shared`:
  `profiles` identical profiles [min batch … max batch], one per engine instance, so concurrent
  execution contexts never share a profile (what service/backends/tensorrt.py expects).
  `per-batch`: one profile per batch size with min = opt = max (fastest kernels per size; a context
  must switch profile to change batch size).
- Persistent timing cache (per GPU architecture and TensorRT version) reused across builds.
- Build progress through `IProgressMonitor` as nested tqdm bars.
- The plan and its manifest entry are written atomically; the entry records everything the plan was
  built from (ONNX sha256, TensorRT version, compute capability, GPU, precision, profiles) and the
  step is skipped when an engine with the same key is present.

Engines only run on the compute capability they were built on: build on a node of each pool
(`--target-gpu a10|l20|h100` refuses to build on the wrong GPU). Without the tensorrt package or a
GPU, `build_engine` raises TrtBuildError with a one-line reason (the CLI exits 2).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.manifest import (
    Engine,
    EngineProfile,
    Manifest,
    ManifestError,
    atomic_write_bytes,
    hash_inputs,
    make_artifact,
    read_manifest,
    verify_artifact,
    write_manifest,
)

log = logging.getLogger(__name__)

#: target → (compute capability, GPU name). Engines are specific to the compute capability.
TARGET_GPUS: dict[str, tuple[str, str]] = {
    "a10": ("8.6", "NVIDIA A10"),
    "l20": ("8.9", "NVIDIA L20"),
    "h100": ("9.0", "NVIDIA H100"),
}
#: The minimum compute capability per precision (fp8 tensor cores: Ada 8.9 and Hopper 9.0).
PRECISION_MIN_CC: dict[str, tuple[int, int]] = {"fp32": (7, 0), "fp16": (7, 0), "int8": (7, 5), "fp8": (8, 9)}
#: The precision matrix we build and test per node pool (docs/export.md).
SUPPORTED: dict[str, tuple[str, ...]] = {
    "a10": ("fp16", "int8"),
    "l20": ("fp16", "int8", "fp8"),
    "h100": ("fp16", "int8", "fp8"),
}
ENGINES_DIR = "engines"
TIMING_CACHE_FILE = "timing.cache"
BUILD_FORMAT = 1
DEFAULT_BATCH_SIZES = (1, 2, 4, 8)


class TrtBuildError(RuntimeError):
    """A build that cannot run here (no TensorRT, no GPU, wrong GPU) or failed; one-line message."""


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_capability: str  # "8.6"
    memory_total: int = 0


def parse_cc(cc: str) -> tuple[int, int]:
    major, _, minor = cc.partition(".")
    return int(major), int(minor or 0)


def describe_gpu(gpu: Gpu) -> str:
    return f"{gpu.name} (sm_{gpu.compute_capability.replace('.', '')})"


def detect_gpu(device_id: int = 0) -> Gpu | None:
    """The GPU at `device_id` (NVML / CUDA runtime via the service's probe, else nvidia-smi), or None."""
    try:
        from service.backends.select import gpu_info

        g = gpu_info(device_id)
        if g is not None:
            return Gpu(g.index, g.name, g.compute_capability, g.memory_total)
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                [
                    "nvidia-smi",
                    f"--id={device_id}",
                    "--query-gpu=name,compute_cap,memory.total",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            if out.returncode == 0 and out.stdout.strip():
                name, cc, mem = (s.strip() for s in out.stdout.strip().splitlines()[0].split(","))
                return Gpu(device_id, name, cc, int(float(mem)) * 1024 * 1024)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            pass
    return None


def check_target(target_gpu: str, gpu: Gpu, precision: str) -> None:
    """The GPU present must be the one the engine is meant for, and support the precision."""
    cc = parse_cc(gpu.compute_capability)
    if target_gpu != "auto":
        if target_gpu not in TARGET_GPUS:
            raise TrtBuildError(
                f"unknown target GPU {target_gpu!r}; choose auto or one of {sorted(TARGET_GPUS)}"
            )
        want_cc, want_name = TARGET_GPUS[target_gpu]
        if parse_cc(want_cc) != cc:
            raise TrtBuildError(
                f"target {target_gpu} ({want_name}, sm_{want_cc.replace('.', '')}) but this machine has "
                f"{describe_gpu(gpu)}; engines only run on the GPU architecture they are built on — "
                "build on a "
                f"{want_name} node"
            )
        if want_name.split()[-1].lower() not in gpu.name.lower():
            log.warning(
                "target %s but the GPU is %s (same compute capability: the engine runs, tuned for this GPU)",
                want_name,
                gpu.name,
            )
    need = PRECISION_MIN_CC.get(precision)
    if need is None:
        raise TrtBuildError(f"unknown precision {precision!r}")
    if cc < need:
        extra = " (Ada: L20/L40/L4, Hopper: H100); use int8 or fp16 on A10" if precision == "fp8" else ""
        raise TrtBuildError(
            f"{precision} engines need compute capability ≥ {need[0]}.{need[1]}{extra}; "
            f"this GPU is {describe_gpu(gpu)}"
        )


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TrtBuildError(
            f"TensorRT is not installed ({e.name or e}); install it on a GPU machine: "
            "pip install 'gendr-serve[trt]'"
        ) from e
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise TrtBuildError(f"TensorRT {trt.__version__} is too old: the build uses the TensorRT 10/11 API")
    return trt


def make_progress_monitor(trt: Any, enabled: bool = True) -> Any:
    """An IProgressMonitor that shows each builder phase as a (nested) tqdm bar."""
    from tqdm import tqdm

    class TqdmProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._bars: dict[str, Any] = {}
            self._depth: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = 0 if not parent_phase else self._depth.get(parent_phase, 0) + 1
                self._depth[phase_name] = depth
                self._bars[phase_name] = tqdm(
                    total=num_steps,
                    desc="  " * depth + phase_name,
                    position=depth,
                    leave=depth == 0,
                    disable=not enabled,
                    dynamic_ncols=True,
                )

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                bar = self._bars.get(phase_name)
                if bar is not None:
                    bar.update(max(0, step + 1 - bar.n))
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                self._depth.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return TqdmProgressMonitor()


@dataclass
class EngineResult:
    model_dir: Path
    manifest: Manifest
    engine: Engine
    skipped: bool
    seconds: float


def _profiles(
    batch_sizes: Sequence[int], mode: str, count: int, opt_batch: int | None
) -> list[tuple[int, int, int]]:
    bs = sorted(set(batch_sizes))
    if mode == "per-batch":
        return [(b, b, b) for b in bs]
    opt = opt_batch or bs[-1]
    if not bs[0] <= opt <= bs[-1]:
        raise TrtBuildError(f"opt batch {opt} outside {bs[0]}..{bs[-1]}")
    return [(bs[0], opt, bs[-1])] * max(1, count)


def build_engine(
    model_dir: str | Path,
    precision: str = "fp16",
    target_gpu: str = "auto",
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    tile: int | None = None,
    profile_mode: Literal["shared", "per-batch"] = "shared",
    profiles: int = 1,
    opt_batch: int | None = None,
    workspace_gb: float | None = None,
    opt_level: int = 3,
    timing_cache: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    device_id: int = 0,
) -> EngineResult:
    """Build (or reuse) the TensorRT engine for `precision` on this machine's GPU (module docstring)."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir, verify=True)
    g = manifest.tile
    if tile is not None and tile != g.tile:
        raise TrtBuildError(
            f"{manifest.name}: the ONNX graph is exported for {g.tile}-px tiles; "
            f"re-export with --tile {tile} to build {tile}-px engines"
        )
    if precision not in manifest.onnx:
        hint = "gendr-build quantize" if precision in ("int8", "fp8") else "gendr-build export"
        raise TrtBuildError(
            f"{manifest.name}: no {precision} ONNX graph (have {', '.join(manifest.onnx) or 'none'}); "
            f"run `{hint}` first"
        )
    if not batch_sizes or min(batch_sizes) < 1:
        raise TrtBuildError("batch sizes must be positive integers")
    gpu = detect_gpu(device_id)
    if gpu is None:
        raise TrtBuildError(
            "no NVIDIA GPU visible (nvidia-smi/NVML found none): TensorRT engines are built on the "
            "GPU they will run on; run this on a GPU node"
        )
    check_target(target_gpu, gpu, precision)
    trt = import_tensorrt()
    variant = manifest.onnx[precision]
    onnx_file = model_dir / variant.graph.path
    prof = _profiles(batch_sizes, profile_mode, profiles, opt_batch)
    options = {
        "format": BUILD_FORMAT,
        "onnx_sha256": variant.graph.sha256,
        "external_data_sha256": variant.external_data.sha256 if variant.external_data else None,
        "precision": precision,
        "tensorrt": trt.__version__,
        "cc": gpu.compute_capability,
        "gpu": gpu.name,
        "tile": g.tile,
        "profiles": prof,
        "workspace_gb": workspace_gb,
        "opt_level": opt_level,
    }
    key = hash_inputs("trt-engine", options)
    sm = "sm" + gpu.compute_capability.replace(".", "")
    t0 = time.perf_counter()
    for e in manifest.engines:
        if e.key == key and not force:
            try:
                verify_artifact(model_dir, e.plan)
                log.info("engine %s %s: up to date (key %s…), skipped", sm, precision, key[:12])
                return EngineResult(model_dir, manifest, e, True, time.perf_counter() - t0)
            except ManifestError as err:
                log.warning("%s", err)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise TrtBuildError("could not create a TensorRT builder (CUDA driver/GPU problem?)")
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    log.info("engine %s %s: parsing %s", sm, precision, variant.graph.path)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrtBuildError(f"TensorRT could not parse {variant.graph.path}: {errors[:2000]}")
    inp = network.get_input(0)
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.builder_optimization_level = opt_level
    if hasattr(trt.BuilderFlag, "WEIGHT_STREAMING"):  # plain plans for deserialize_cuda_engine(bytes)
        config.clear_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    for mn, opt, mx in prof:
        p = builder.create_optimization_profile()
        p.set_shape(inp.name, (mn, g.tile, g.tile, 3), (opt, g.tile, g.tile, 3), (mx, g.tile, g.tile, 3))
        config.add_optimization_profile(p)
    cache_path = Path(timing_cache) if timing_cache else model_dir / ENGINES_DIR / sm / TIMING_CACHE_FILE
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", cache_path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
    monitor = make_progress_monitor(trt, enabled=progress)
    config.progress_monitor = monitor
    log.info(
        "engine %s %s: building (profiles %s, tile %d, opt level %d)…", sm, precision, prof, g.tile, opt_level
    )
    t_build = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - t_build
    if plan is None:
        raise TrtBuildError(f"TensorRT failed to build the {precision} engine (see the TensorRT log above)")
    plan_bytes = bytes(memoryview(plan))
    atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    _check_plan(trt, logger, plan_bytes, variant.input_name, variant.output_name, g.tile, g.out_tile, prof)

    plan_path = model_dir / ENGINES_DIR / sm / precision / f"engine-{key[:16]}.plan"
    atomic_write_bytes(plan_path, plan_bytes)
    engine = Engine(
        plan=make_artifact(model_dir, plan_path),
        precision=precision,
        onnx_sha256=variant.graph.sha256,
        tensorrt_version=trt.__version__,
        compute_capability=gpu.compute_capability,
        gpu_name=gpu.name,
        profile=EngineProfile(
            batch_sizes=sorted(set(batch_sizes)),
            tile=g.tile,
            mode=profile_mode,
            count=len(prof),
            opt_batch=prof[0][1] if profile_mode == "shared" else None,
        ),
        key=key,
        build={
            "seconds": round(build_seconds, 1),
            "opt_level": opt_level,
            "workspace_gb": workspace_gb,
            "timing_cache": str(cache_path),
            "timing_cache_reused": bool(cache_bytes),
            "strongly_typed": strongly is not None,
        },
    )
    manifest = read_manifest(model_dir, verify=False)  # re-read: another step may have written meanwhile
    old = [
        e
        for e in manifest.engines
        if e.compute_capability == gpu.compute_capability and e.precision == precision
    ]
    engines = [e for e in manifest.engines if e not in old] + [engine]
    manifest = manifest.model_copy(update={"engines": engines})
    write_manifest(model_dir, manifest)
    for e in old:
        if e.plan.path != engine.plan.path:
            (model_dir / e.plan.path).unlink(missing_ok=True)
    log.info(
        "engine %s %s: %s (%.1f MB, %.0f s)",
        sm,
        precision,
        plan_path.relative_to(model_dir),
        len(plan_bytes) / 1e6,
        build_seconds,
    )
    return EngineResult(model_dir, manifest, engine, False, time.perf_counter() - t0)


def _check_plan(
    trt: Any,
    logger: Any,
    plan: bytes,
    in_name: str,
    out_name: str,
    tile: int,
    out_tile: int,
    prof: list[tuple[int, int, int]],
) -> None:
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise TrtBuildError("the built plan does not deserialize")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    if sorted(names) != sorted([in_name, out_name]):
        raise TrtBuildError(f"engine I/O {names} != {[in_name, out_name]}")
    for n in names:
        if engine.get_tensor_dtype(n) != trt.DataType.UINT8:
            raise TrtBuildError(f"engine tensor {n} is {engine.get_tensor_dtype(n)}, expected UINT8")
    if engine.num_optimization_profiles != len(prof):
        raise TrtBuildError(f"engine has {engine.num_optimization_profiles} profiles, expected {len(prof)}")
    shape = tuple(engine.get_tensor_shape(out_name))
    if tuple(shape[1:]) != (out_tile, out_tile, 3):
        raise TrtBuildError(f"engine output {shape} != [-1,{out_tile},{out_tile},3]")


class TrtTileRunner:
    """Runs a plan on the GPU through PyTorch CUDA tensors (GPU check script and verify; not the service)."""

    def __init__(self, plan_path: str | Path, profile: int = 0) -> None:
        import torch

        trt = import_tensorrt()
        self._torch = torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise TrtBuildError(
                f"{plan_path}: cannot deserialize (built for another GPU or TensorRT version?)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.in_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.out_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.stream = torch.cuda.Stream()
        if profile:
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
        self.context.set_input_shape(self.in_name, tuple(x.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.out_name))
        y = torch.empty(out_shape, dtype=torch.uint8, device="cuda")
        self.context.set_tensor_address(self.in_name, x.data_ptr())
        self.context.set_tensor_address(self.out_name, y.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise TrtBuildError("execute_async_v3 failed")
        self.stream.synchronize()
        return y.cpu().numpy()
