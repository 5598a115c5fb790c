"""TensorRT engine build (TensorRT 10/11 Python API) into the model repository.

- Strongly typed network (`NetworkDefinitionCreationFlag.STRONGLY_TYPED` where the flag exists; TRT
  11 networks are strongly typed anyway): no FP16/INT8 builder flags, precision comes from the ONNX
  variant (fp16 graph → fp16 engine, Q/DQ graph → int8/fp8 engine).
- One plan per static tile the precision's graphs cover (`Manifest.tiles`: the primary tile and every
  shape bucket; the dynamic whole-image graph gets none), each its own manifest `Engine` with
  `profile.tile` = its tile and its own step (key, skip, install); `--tile` builds one of them.
  Engines of tiles the graphs no longer cover are removed.
- Static tile shape, dynamic batch inside optimisation profiles: `profiles` identical profiles
  [min batch … max batch] (default one; TensorRT 10/11 let several execution contexts use one profile
  at once). Per-batch (min = max) profiles are refused: a context is pinned to its profile but is
  offered every batch size.
- Built on the GPU probed (`--device` is a CUDA index; the CUDA device is set before the builder).
- Persistent timing cache per GPU architecture *and TensorRT version*; a rejected cache is replaced.
- Build progress through `IProgressMonitor` as nested tqdm bars.
- DETAILED profiling verbosity; the engine inspector's JSON is saved beside the plan and the layer
  count per precision goes into the manifest entry (does the int8 engine really run int8?).
- The plan and its manifest entry are written atomically; the entry records everything the plan was
  built from (ONNX sha256, TensorRT version, compute capability, GPU, precision, tile, profiles) and
  the step is skipped when an engine with the same key is present.

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
from typing import Any, Literal

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
from engine_build.trt.rules import TrtGraphError, require_trt_compatible
from engine_build.trt.tools import (
    ENGINES_DIR,
    build_plan,
    import_tensorrt,
    layer_precisions,
    load_timing_cache,
    make_progress_monitor,
    timing_cache_path,
)
from service.hardware import set_cuda_device
from service.manifest import (
    Artifact,
    Engine,
    EngineProfile,
    Manifest,
    OnnxVariant,
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
    "layer_precisions",
    "load_timing_cache",
    "make_progress_monitor",
    "parse_cc",
    "timing_cache_path",
]

BUILD_FORMAT = 2  # 2: timing cache per TensorRT version, layer report, device selection
DEFAULT_BATCH_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class TileSource:
    """The ONNX graph one engine is built from: the primary tile's or a shape bucket's (static tiles)."""

    tile: int
    graph: Artifact
    external_data: Artifact | None


@dataclass
class TileEngine:
    tile: int
    engine: Engine
    skipped: bool
    seconds: float


@dataclass
class EngineResult:
    model_dir: Path
    manifest: Manifest
    tiles: list[TileEngine]  # smallest tile first
    seconds: float

    @property
    def engine(self) -> Engine:
        """The primary tile's engine (the one built when a single tile was asked for)."""
        primary = self.manifest.tile.tile
        return next((t.engine for t in self.tiles if t.tile == primary), self.tiles[-1].engine)

    @property
    def skipped(self) -> bool:
        """Every tile's engine was up to date."""
        return all(t.skipped for t in self.tiles)


def tile_sources(manifest: Manifest, precision: str, tile: int | None = None) -> list[TileSource]:
    """The static-tile graphs of `precision` (`manifest.tiles`; the dynamic one gets no engine), or the
    one of `tile`; smallest first."""
    v = manifest.onnx[precision]
    out = [TileSource(manifest.tile.tile, v.graph, v.external_data)]
    out += [TileSource(s.tile, s.graph, s.external_data) for s in v.shapes if s.tile is not None]
    out.sort(key=lambda s: s.tile)
    if tile is None:
        return out
    chosen = [s for s in out if s.tile == tile]
    if not chosen:
        have = ", ".join(str(s.tile) for s in out)
        raise TrtBuildError(
            f"{manifest.name}: the {precision} ONNX graphs are exported for {have}-px tiles; "
            f"re-export with --tile {tile} (or a {tile}-px shape bucket) to build {tile}-px engines"
        )
    return chosen


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
    """Build (or reuse) the TensorRT engine of every static tile of `precision` (or of `tile` only) on
    this machine's GPU (module docstring)."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir, verify=False)  # the graphs built from are verified below
    if precision not in manifest.onnx:
        from engine_build.gpu_targets import QUANT_PRECISIONS

        hint = "gendr-build quantize" if precision in QUANT_PRECISIONS else "gendr-build export"
        raise TrtBuildError(
            f"{manifest.name}: no {precision} ONNX graph (have {', '.join(manifest.onnx) or 'none'}); "
            f"run `{hint}` first"
        )
    if reason := manifest.onnx[precision].cpu_only:  # marked by the quantize step: one line, no GPU work
        raise TrtBuildError(
            f"{manifest.name}: the {precision} graph is for ONNX Runtime only ({reason}); for an engine, "
            f"re-quantize with `gendr-build quantize --precision {precision} --tool modelopt` (symmetric)"
        )
    sources = tile_sources(manifest, precision, tile)
    if not batch_sizes or min(batch_sizes) < 1:
        raise TrtBuildError("batch sizes must be positive integers")
    g = manifest.tile.graph_scale
    for src in sources:
        for art in (src.graph, src.external_data):
            if art is not None:
                verify_artifact(model_dir, art)  # a damaged graph is an error; a damaged engine is rebuilt
        try:  # e.g. a community SR network exported for ONNX Runtime only
            require_trt_compatible(model_dir / src.graph.path, tile=src.tile, out_tile=src.tile * g)
        except TrtGraphError as e:
            raise TrtBuildError(
                f"{manifest.name}: the {precision} graph for {src.tile}-px tiles breaks TensorRT's rules, so "
                f"no engine can be built (ONNX Runtime still serves it): {e}"
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
    sm = "sm" + gpu.compute_capability.replace(".", "")
    job = _TileBuild(
        model_dir=model_dir,
        variant=manifest.onnx[precision],
        gpu=gpu,
        trt_version=str(trt.__version__),
        prof=prof,
        batch_sizes=sorted(set(batch_sizes)),
        profile_mode=profile_mode,
        workspace_gb=workspace_gb,
        opt_level=opt_level,
        cache_path=Path(timing_cache) if timing_cache else timing_cache_path(model_dir, sm, trt.__version__),
        progress=progress,
        force=force,
        graph_scale=g,
    )
    results = [job.run(src) for src in sources]
    if tile is None:
        _drop_orphans(model_dir, gpu.compute_capability, precision, {s.tile for s in sources})
    manifest = read_manifest(model_dir, verify=False)
    return EngineResult(model_dir, manifest, results, time.perf_counter() - t0)


def _drop_orphans(model_dir: Path, cc: str, precision: str, tiles: set[int]) -> None:
    """Remove this GPU generation's `precision` engines of tiles the graphs no longer cover."""
    manifest = read_manifest(model_dir, verify=False)
    gone = [
        e
        for e in manifest.engines
        if e.compute_capability == cc and e.precision == precision and e.profile.tile not in tiles
    ]
    if not gone:
        return
    write_manifest(
        model_dir, manifest.model_copy(update={"engines": [e for e in manifest.engines if e not in gone]})
    )
    for e in gone:
        log.warning(
            "engine %s removed: no %s graph for %d-px tiles any more", e.plan.path, precision, e.profile.tile
        )
        _unlink_plan(model_dir, e)


def _unlink_plan(model_dir: Path, e: Engine) -> None:
    plan = model_dir / e.plan.path
    plan.unlink(missing_ok=True)
    plan.with_suffix(".layers.json").unlink(missing_ok=True)


@dataclass
class _TileBuild:
    """What every tile's engine of one `gendr-build engine` run is built with; `run` builds one tile's
    on the repository's step primitive (key → verify-or-skip → produce → install)."""

    model_dir: Path
    variant: OnnxVariant
    gpu: Gpu
    trt_version: str
    prof: list[tuple[int, int, int]]
    batch_sizes: list[int]
    profile_mode: Literal["shared", "per-batch"]
    workspace_gb: float | None
    opt_level: int
    cache_path: Path
    progress: bool
    force: bool
    graph_scale: int

    def run(self, src: TileSource) -> TileEngine:
        t0 = time.perf_counter()
        model_dir, precision, gpu = self.model_dir, self.variant.precision, self.gpu
        options = {
            "format": BUILD_FORMAT,
            "onnx_sha256": src.graph.sha256,
            "external_data_sha256": src.external_data.sha256 if src.external_data else None,
            "precision": precision,
            "tensorrt": self.trt_version,
            "cc": gpu.compute_capability,
            "gpu": gpu.name,
            "tile": src.tile,
            "profiles": self.prof,
            "workspace_gb": self.workspace_gb,
            "opt_level": self.opt_level,
        }
        key = hash_inputs("trt-engine", options)
        sm = "sm" + gpu.compute_capability.replace(".", "")
        manifest = read_manifest(model_dir, verify=False)
        current = next((e for e in manifest.engines if e.key == key), None)
        plan_path = model_dir / ENGINES_DIR / sm / precision / f"engine-t{src.tile}-{key[:16]}.plan"
        engine: Engine | None = current

        def produce(tmp: Path) -> dict[str, Any]:
            v = self.variant
            plan_bytes, layers_json, info = build_plan(
                model_dir / src.graph.path,
                precision,
                (v.input_name, v.output_name),
                (src.tile, src.tile * self.graph_scale),
                self.prof,
                workspace_gb=self.workspace_gb,
                opt_level=self.opt_level,
                cache_path=self.cache_path,
                progress=self.progress,
            )
            (tmp / "plan").write_bytes(plan_bytes)
            (tmp / "layers.json").write_text(layers_json)
            return {**info, "layer_precisions": layer_precisions(layers_json)}

        def install(tmp: Path, info: dict[str, Any]) -> str:
            nonlocal engine
            plan_path.parent.mkdir(parents=True, exist_ok=True)
            layers_path = plan_path.with_suffix(".layers.json")
            os.replace(tmp / "plan", plan_path)
            os.replace(tmp / "layers.json", layers_path)
            engine = Engine(
                plan=make_artifact(model_dir, plan_path),
                precision=precision,
                onnx_sha256=src.graph.sha256,
                tensorrt_version=self.trt_version,
                compute_capability=gpu.compute_capability,
                gpu_name=gpu.name,
                gpu_memory=gpu.memory_total,
                profile=EngineProfile(
                    batch_sizes=self.batch_sizes,
                    tile=src.tile,
                    mode=self.profile_mode,
                    count=len(self.prof),
                    opt_batch=self.prof[0][1] if self.profile_mode == "shared" else None,
                ),
                key=key,
                build={
                    **info,
                    "opt_level": self.opt_level,
                    "workspace_gb": self.workspace_gb,
                    "timing_cache": str(self.cache_path),
                    "layers_json": str(layers_path.relative_to(model_dir)),
                },
            )
            m = read_manifest(model_dir, verify=False)  # re-read: another step may have written
            old = [  # this tile's engine for this GPU generation, of any key: replaced
                e
                for e in m.engines
                if (e.compute_capability, e.precision, e.profile.tile)
                == (gpu.compute_capability, precision, src.tile)
            ]
            write_manifest(
                model_dir, m.model_copy(update={"engines": [e for e in m.engines if e not in old] + [engine]})
            )
            for e in old:
                if e.plan.path != engine.plan.path:
                    _unlink_plan(model_dir, e)
            size = engine.plan.size / 1e6
            return f"{plan_path.relative_to(model_dir)} ({size:.1f} MB, {info['seconds']:.0f} s)"

        skipped, _ = run_step(
            model_dir,
            f"engine {sm} {precision} t{src.tile}",
            key,
            (current.key, [current.plan]) if current else None,
            produce,
            install,
            force=self.force,
            parent=model_dir / ENGINES_DIR,
        )
        assert engine is not None
        return TileEngine(src.tile, engine, skipped, time.perf_counter() - t0)
