"""TensorRT engine build (TensorRT 10/11 Python API) into the model repository.

- Strongly typed network (`NetworkDefinitionCreationFlag.STRONGLY_TYPED` where the flag exists; TRT
  11 networks are strongly typed anyway): no FP16/INT8 builder flags, precision comes from the ONNX
  variant (fp16 graph → fp16 engine, Q/DQ graph → int8/fp8 engine).
- Static tile shape (the graph's), dynamic batch inside optimisation profiles: `profiles` identical
  profiles [min batch … max batch] (default one; TensorRT 10/11 let several execution contexts use
  one profile at once, so one is enough for any number of instances). Per-batch (min = max)
  profiles are refused: a context is pinned to its profile but is offered every batch size.
- Built on the GPU probed (`--device` is a CUDA index; the CUDA device is set before the builder).
- Persistent timing cache per GPU architecture *and TensorRT version*; a rejected cache is replaced.
- Build progress through `IProgressMonitor` as nested tqdm bars.
- DETAILED profiling verbosity; the engine inspector's JSON is saved beside the plan and the layer
  count per precision goes into the manifest entry (does the int8 engine really run int8?).
- The plan and its manifest entry are written atomically; the entry records everything the plan was
  built from (ONNX sha256, TensorRT version, compute capability, GPU, precision, profiles) and the
  step is skipped when an engine with the same key is present.

Without the tensorrt package or a GPU, `build_engine` raises TrtBuildError with a one-line reason
(the CLI exits 2).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from engine_build.gpu_targets import (
    PRECISION_MIN_CC,
    SUPPORTED,
    TARGET_GPUS,
    Gpu,
    TrtBuildError,
    check_target,
    describe_gpu,
    detect_gpu,
    parse_cc,
)
from engine_build.repository import run_step
from engine_build.trt_rules import TrtGraphError, require_trt_compatible
from engine_build.trt_tools import (
    ENGINES_DIR,
    import_tensorrt,
    layer_precisions,
    load_timing_cache,
    make_progress_monitor,
    timing_cache_path,
)
from service.hardware import set_cuda_device
from service.manifest import (
    Engine,
    EngineProfile,
    Manifest,
    Precision,
    atomic_write_bytes,
    hash_inputs,
    make_artifact,
    read_manifest,
    verify_artifact,
    write_manifest,
)

log = logging.getLogger(__name__)

__all__ = [  # the build API, in one place for its callers
    "PRECISION_MIN_CC",
    "SUPPORTED",
    "TARGET_GPUS",
    "Gpu",
    "TrtBuildError",
    "build_engine",
    "check_target",
    "describe_gpu",
    "detect_gpu",
    "import_tensorrt",
    "parse_cc",
]

BUILD_FORMAT = 2  # 2: timing cache per TensorRT version, layer report, device selection
DEFAULT_BATCH_SIZES = (1, 2, 4, 8)


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
    if mode != "shared":
        raise TrtBuildError(
            f"profile mode {mode!r} is not supported: the runtime pins each execution context to one "
            "profile and offers it every batch size, so per-batch (min = max) profiles cannot be served; "
            "use --profile-mode shared"
        )
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
    manifest = read_manifest(model_dir, verify=False)  # the graph built from is verified below
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
    variant = manifest.onnx[precision]
    for art in (variant.graph, variant.external_data):
        if art is not None:
            verify_artifact(model_dir, art)  # a damaged graph is an error; a damaged engine is rebuilt
    try:  # e.g. a community SR network exported for ONNX Runtime only
        require_trt_compatible(model_dir / variant.graph.path, tile=g.tile, out_tile=g.out_tile)
    except TrtGraphError as e:
        raise TrtBuildError(
            f"{manifest.name}: the {precision} graph breaks TensorRT's rules, so no engine can be built "
            f"(ONNX Runtime still serves it): {e}"
        ) from e
    prof = _profiles(batch_sizes, profile_mode, profiles, opt_batch)
    gpu = detect_gpu(device_id)
    if gpu is None:
        raise TrtBuildError(
            f"no NVIDIA GPU at CUDA index {device_id} (CUDA/NVML/nvidia-smi found none): TensorRT "
            "engines are built on the GPU they will run on; run this on a GPU node"
        )
    check_target(target_gpu, gpu, precision)
    import_tensorrt()  # a real runtime (not its stubs), new enough
    import tensorrt as trt  # typed by tensorrt-stubs in scripts/typecheck_trt.sh

    try:
        set_cuda_device(device_id)  # the builder works on the current device: the one probed above
    except RuntimeError as err:
        raise TrtBuildError(f"cannot select CUDA device {device_id}: {err}") from err
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
    current = next((e for e in manifest.engines if e.key == key), None)
    cache_path = (
        Path(timing_cache) if timing_cache else timing_cache_path(model_dir, sm, str(trt.__version__))
    )
    plan_path = model_dir / ENGINES_DIR / sm / precision / f"engine-{key[:16]}.plan"
    engine: Engine | None = current

    def produce(tmp: Path) -> dict[str, Any]:
        plan_bytes, layers_json, info = _build_plan(
            model_dir, variant, prof, g.tile, g.out_tile, workspace_gb, opt_level, cache_path, progress
        )
        (tmp / "plan").write_bytes(plan_bytes)
        (tmp / "layers.json").write_text(layers_json)
        return {**info, "layer_precisions": layer_precisions(layers_json)}

    def install(tmp: Path, info: dict[str, Any]) -> str:
        nonlocal manifest, engine
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        layers_path = plan_path.with_suffix(".layers.json")
        os.replace(tmp / "plan", plan_path)
        os.replace(tmp / "layers.json", layers_path)
        engine = Engine(
            plan=make_artifact(model_dir, plan_path),
            precision=cast(Precision, precision),  # checked above: the manifest has this variant
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
                **info,
                "opt_level": opt_level,
                "workspace_gb": workspace_gb,
                "timing_cache": str(cache_path),
                "layers_json": str(layers_path.relative_to(model_dir)),
            },
        )
        manifest = read_manifest(model_dir, verify=False)  # re-read: another step may have written
        old = [
            e
            for e in manifest.engines
            if e.compute_capability == gpu.compute_capability and e.precision == precision
        ]
        manifest = manifest.model_copy(
            update={"engines": [e for e in manifest.engines if e not in old] + [engine]}
        )
        write_manifest(model_dir, manifest)
        for e in old:
            if e.plan.path != engine.plan.path:
                (model_dir / e.plan.path).unlink(missing_ok=True)
        return (
            f"{plan_path.relative_to(model_dir)} ({engine.plan.size / 1e6:.1f} MB, {info['seconds']:.0f} s)"
        )

    skipped, _ = run_step(
        model_dir,
        f"engine {sm} {precision}",
        key,
        (current.key, [current.plan]) if current else None,
        produce,
        install,
        force=force,
        parent=model_dir / ENGINES_DIR,
    )
    assert engine is not None
    return EngineResult(model_dir, manifest, engine, skipped, time.perf_counter() - t0)


def _build_plan(
    model_dir: Path,
    variant: Any,
    prof: list[tuple[int, int, int]],
    tile: int,
    out_tile: int,
    workspace_gb: float | None,
    opt_level: int,
    cache_path: Path,
    progress: bool,
) -> tuple[bytes, str, dict[str, Any]]:
    """Parse the ONNX variant and build the plan: (plan bytes, engine inspector JSON, build facts)."""
    import tensorrt as trt  # import_tensorrt() checked it is the runtime; typed by tensorrt-stubs

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
    log.info("engine: parsing %s", variant.graph.path)
    if not parser.parse_from_file(str(model_dir / variant.graph.path)):
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
        p.set_shape(
            inp.name,
            trt.Dims([mn, tile, tile, 3]),
            trt.Dims([opt, tile, tile, 3]),
            trt.Dims([mx, tile, tile, 3]),
        )
        config.add_optimization_profile(p)
    _, cache_reused = load_timing_cache(config, cache_path)
    if hasattr(trt, "ProfilingVerbosity"):  # layer names and precisions in the engine inspector
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.progress_monitor = make_progress_monitor(trt, enabled=progress)
    log.info(
        "engine: building %s (profiles %s, tile %d, opt level %d)…", variant.precision, prof, tile, opt_level
    )
    t_build = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - t_build
    if plan is None:
        raise TrtBuildError(f"TensorRT failed to build the {variant.precision} engine (see its log above)")
    plan_bytes = bytes(memoryview(plan))
    atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    layers_json = _check_plan(
        logger, plan_bytes, variant.input_name, variant.output_name, tile, out_tile, prof
    )
    info = {
        "seconds": round(build_seconds, 1),
        "timing_cache_reused": cache_reused,
        "strongly_typed": strongly is not None,
    }
    return plan_bytes, layers_json, info


def _check_plan(
    logger: Any,
    plan: bytes,
    in_name: str,
    out_name: str,
    tile: int,
    out_tile: int,
    prof: list[tuple[int, int, int]],
) -> str:
    """Check the plan's I/O and profiles; returns the engine inspector's JSON (which layers run in which
    precision: the record that an int8/fp8 engine really runs int8/fp8)."""
    import tensorrt as trt

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
    shape: tuple[int, ...] = tuple(engine.get_tensor_shape(out_name)[:])
    if shape[1:] != (out_tile, out_tile, 3):
        raise TrtBuildError(f"engine output {shape} != [-1,{out_tile},{out_tile},3]")
    inspector = engine.create_engine_inspector()
    fmt = getattr(trt.LayerInformationFormat, "JSON", None)
    return str(inspector.get_engine_information(fmt)) if inspector is not None and fmt is not None else "{}"
