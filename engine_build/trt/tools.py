"""TensorRT build helpers: the import (stubs refused), one plan's parse-build-check, build progress bars,
timing cache, layer report."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from engine_build.gpu_targets import TrtBuildError
from service.hardware import tensorrt_module, tensorrt_too_old
from service.manifest import atomic_write_bytes

log = logging.getLogger(__name__)

ENGINES_DIR = "engines"


def import_tensorrt() -> Any:
    trt = tensorrt_module()  # None for a missing install and for tensorrt-stubs alone
    if trt is None:
        raise TrtBuildError(
            "TensorRT is not installed (or only its type stubs are); install it on a GPU machine: "
            "pip install 'gendr-serve[trt]'"
        )
    too_old = tensorrt_too_old(str(trt.__version__))  # the runtime's floor: a plan must also load there
    if too_old is not None:
        raise TrtBuildError(too_old)
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


def timing_cache_path(model_dir: Path, sm: str, trt_version: str) -> Path:
    """One cache per GPU architecture and TensorRT version: another version rejects (or misreads) it."""
    return model_dir / ENGINES_DIR / sm / f"timing-trt{trt_version}.cache"


def load_timing_cache(config: Any, path: Path) -> tuple[Any, bool]:
    """(cache, reused): the file's cache, or an empty one when it is missing, unreadable or rejected."""
    data = b""
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError as e:
        log.warning("timing cache %s unreadable (%s); starting a new one", path, e)
    if data:
        try:
            cache = config.create_timing_cache(data)
            if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
                return cache, True
        except Exception as e:  # TensorRT raises on a corrupt or foreign cache
            log.warning("timing cache %s rejected (%s)", path, e)
        log.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", path)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    return cache, False


#: substrings of the inspector's "Format/Datatype" → one label (UInt8 before Int8: it contains it)
_DTYPE_TOKENS = (
    ("fp8", "FP8"),
    ("uint8", "UInt8"),
    ("int8", "Int8"),
    ("bf16", "BF16"),
    ("half", "Half"),
    ("fp16", "Half"),
    ("float", "Float"),
    ("fp32", "Float"),
    ("int32", "Int32"),
)


def layer_precisions(engine_info_json: str) -> dict[str, int]:
    """Layers per output data type, from the engine inspector's JSON (DETAILED profiling verbosity)."""
    import json

    counts: dict[str, int] = {}
    try:
        layers = json.loads(engine_info_json).get("Layers", [])
    except (ValueError, AttributeError):
        return counts
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        outs = layer.get("Outputs") or [{}]
        fmt = str(outs[0].get("Format/Datatype", "unknown")) if isinstance(outs[0], dict) else "unknown"
        low = fmt.lower()
        kind = next((label for token, label in _DTYPE_TOKENS if token in low), fmt)
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def build_plan(
    graph: Path,
    precision: str,
    io_names: tuple[str, str],
    tiles: tuple[int, int],
    prof: list[tuple[int, int, int]],
    *,
    workspace_gb: float | None,
    opt_level: int,
    cache_path: Path,
    progress: bool,
) -> tuple[bytes, str, dict[str, Any]]:
    """Parse one tile's graph and build its plan, static (input, output) `tiles`, dynamic batch in the
    profiles `prof`: (plan bytes, engine inspector JSON, build facts)."""
    import tensorrt as trt  # import_tensorrt() checked it is the runtime; typed by tensorrt-stubs

    tile, out_tile = tiles

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
    log.info("engine: parsing %s", graph)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrtBuildError(f"TensorRT could not parse {graph}: {errors[:2000]}")
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
    log.info("engine: building %s (profiles %s, tile %d, opt level %d)…", precision, prof, tile, opt_level)
    t_build = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - t_build
    if plan is None:
        raise TrtBuildError(
            f"TensorRT failed to build the {precision} engine for {tile}-px tiles (see its log above)"
        )
    plan_bytes = bytes(memoryview(plan))
    atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    layers_json = _check_plan(logger, plan_bytes, *io_names, tile, out_tile, prof)
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
