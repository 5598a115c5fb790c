"""Choosing a backend for a model on this machine, saying why, and what to fall back to.

`auto` ranks what could serve the model here: TensorRT when a real TensorRT runtime, a GPU and an
engine built for this GPU's compute capability *by this exact TensorRT version* exist (a plan only
deserialises in the version that built it); then ONNX Runtime's CUDA provider when onnxruntime-gpu
sees a GPU; then ONNX Runtime on the CPU; then (a checkpoint in the repository) PyTorch. The runtime
loads the first and falls back down the list when a load fails, recording why (`candidates`).

Each step only looks for packages, devices and manifest entries: no artifact is read here.
Backends are built by name from a registry of import paths, so the torch backend (which lives on
the build side, beside the model code it needs) is never imported by the service.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.backends.base import Backend, BackendUnavailable
from service.backends.chain import GPU_BACKENDS, GpuExpectation
from service.hardware import GpuInfo, gpu_info, has_package, tensorrt_too_old, tensorrt_version
from service.manifest import PRECISIONS, Engine, Manifest
from service.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["GpuInfo", "gpu_info", "has_package", "tensorrt_version"]  # patched by tests

#: backend name → "module:Class"; each class has `from_settings(name, manifest, model_dir, settings)`.
REGISTRY: dict[str, str] = {
    "onnxruntime-cpu": "service.backends.onnxruntime:OnnxRuntimeBackend",
    "onnxruntime-cuda": "service.backends.onnxruntime:OnnxRuntimeBackend",
    "onnxruntime-trt": "service.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino-cpu": "service.backends.openvino:OpenVinoBackend",
    "tensorrt": "service.backends.tensorrt:TensorRTBackend",
    "torch": "engine_build.torch_backend:TorchBackend",  # the build extra; never imported by service/
    "fake": "service.backends.fake:FakeBackend",
}
#: Engine precision preference under `auto` (fastest first at equal quality bounds): policy over the one
#: list of precisions, service.manifest.PRECISIONS (a precision added there is ranked last until here).
ENGINE_ORDER = {"fp16": 0, "bf16": 1, "int8": 2, "fp8": 3, "fp32": 4}


def engine_preference() -> list[str]:
    """Every precision, the one `auto` prefers first."""
    return sorted(PRECISIONS, key=lambda p: ENGINE_ORDER.get(p, len(ENGINE_ORDER)))


@dataclass(frozen=True)
class Candidate:
    name: str
    reason: str


def ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def engines_for(
    manifest: Manifest, gpu: GpuInfo, precision: str, trt_version: str | None = None
) -> tuple[list[Engine], list[str]]:
    """Primary-tile engines that can run on this GPU with this TensorRT (best first; any version when
    None), and why the others built for this GPU cannot (a plan loads only in the version that built it)."""
    cc = gpu.compute_capability
    wanted = engine_preference() if precision == "auto" else [precision]
    versions = [trt_version] if trt_version else sorted({e.tensorrt_version for e in manifest.engines})
    ok = [e for p in wanted for v in versions if (e := manifest.engine_for(p, cc, v)) is not None]
    why = [
        f"engine {e.precision}@sm_{cc.replace('.', '')} was built by TensorRT {e.tensorrt_version}, "
        f"runtime is {trt_version}"
        for e in manifest.engines
        if trt_version
        and e.precision in wanted
        and e.compute_capability == cc
        and e.profile.tile == manifest.tile.tile
        and e.tensorrt_version != trt_version
    ]
    return ok, why


def find_engine(
    manifest: Manifest, gpu: GpuInfo, precision: str, trt_version: str | None = None
) -> Engine | None:
    """The best engine for this GPU (fp16 preferred under `auto`), or None."""
    ok, _ = engines_for(manifest, gpu, precision, trt_version)
    return ok[0] if ok else None


def openvino_candidate(manifest: Manifest, settings: Settings) -> str | None:
    """Why OpenVINO bf16 should serve on this CPU (it measured several times ONNX Runtime's CPU speed on
    bf16 matrix units, docs/benchmarks.md), or None: not installed, no bf16 unit, no fp32 graph, or not
    a `single` network (GenDR's bf16 quality is unmeasured: GENDR_BACKEND=openvino-cpu opts in)."""
    from service.backends.openvino import bf16_flags

    if (
        settings.precision not in ("auto", "bf16")
        or "fp32" not in manifest.onnx
        or manifest.kind != "single"
        or not has_package("openvino")
    ):
        return None
    flags = bf16_flags()
    return f"auto: OpenVINO bf16 on the CPU ({', '.join(flags)})" if flags else None


def candidates(manifest: Manifest, settings: Settings) -> list[Candidate]:
    """Backends that could serve `manifest` here, best first; raises when none can."""
    if settings.backend != "auto":
        return [Candidate(settings.backend, f"configured: GENDR_BACKEND={settings.backend}")]
    out: list[Candidate] = []
    why: list[str] = []
    gpu = gpu_info(settings.device_id)
    if gpu is None:
        why.append("no NVIDIA GPU visible")
    trt = tensorrt_version()
    too_old = tensorrt_too_old(trt) if trt is not None else None
    if trt is None:
        why.append("tensorrt not installed")
    elif too_old is not None:
        why.append(too_old)
    elif gpu is not None:
        ok, skipped = engines_for(manifest, gpu, settings.precision, trt)
        if ok:
            e = ok[0]
            out.append(
                Candidate(
                    "tensorrt",
                    f"auto: TensorRT {trt} {e.precision} engine built for {gpu.sm} matches {gpu.name} "
                    f"(cuda:{gpu.index})",
                )
            )
        else:
            have = sorted({f"sm_{e.compute_capability.replace('.', '')}" for e in manifest.engines})
            why.extend(skipped or [f"no TensorRT engine for {gpu.sm} (built: {', '.join(have) or 'none'})"])
    providers = ort_providers()
    if manifest.onnx:
        if gpu is not None and "CUDAExecutionProvider" in providers:
            out.append(
                Candidate("onnxruntime-cuda", f"auto: ONNX Runtime CUDA on {gpu.name} ({'; '.join(why)})")
            )
        elif gpu is not None:
            why.append("onnxruntime has no CUDA provider (onnxruntime-gpu not installed)")
        ov = openvino_candidate(manifest, settings)
        if ov is not None:
            out.append(Candidate("openvino-cpu", f"{ov} ({'; '.join(why)})"))
        if "CPUExecutionProvider" in providers:
            out.append(Candidate("onnxruntime-cpu", f"auto: ONNX Runtime CPU ({'; '.join(why)})"))
        else:
            why.append("onnxruntime not installed")
    else:
        why.append("the manifest lists no ONNX graph")
    if manifest.checkpoint and has_package("torch") and has_package("engine_build"):
        out.append(Candidate("torch", f"auto: PyTorch reference ({'; '.join(why)})"))
    if not out:
        raise BackendUnavailable(f"{manifest.name}: no backend can serve it here: {'; '.join(why)}")
    return out


def gpu_expectation(settings: Settings) -> GpuExpectation:
    """A GPU backend is required when GENDR_BACKEND names one, expected under `auto` when a GPU is
    visible: a model that then runs on the CPU is an error (start-up fails) or a loud fallback."""
    if settings.backend in GPU_BACKENDS:
        return GpuExpectation(f"GENDR_BACKEND={settings.backend} names a GPU backend", required=True)
    if settings.backend == "auto":
        gpu = gpu_info(settings.device_id)
        if gpu is not None:
            return GpuExpectation(f"a GPU is visible ({gpu.name} at cuda:{gpu.index}) and GENDR_BACKEND=auto")
    return GpuExpectation()


def choose(manifest: Manifest, settings: Settings) -> tuple[str, str]:
    """(backend name, reason) of the best candidate."""
    c = candidates(manifest, settings)[0]
    return c.name, c.reason


def backend_class(name: str) -> Any:
    try:
        path = REGISTRY[name]
    except KeyError:
        raise BackendUnavailable(f"unknown backend {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
    module, _, cls = path.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise BackendUnavailable(f"backend {name} needs {module} ({e})") from e


def build(name: str, manifest: Manifest, model_dir: Path, settings: Settings) -> Backend:
    """Construct (not load) backend `name` for one model, configured from settings."""
    backend: Backend = backend_class(name).from_settings(name, manifest, model_dir, settings)
    return backend


BackendFactory = Callable[[Manifest, Path, Settings], tuple[Backend, str]]


def create_backend(manifest: Manifest, model_dir: Path, settings: Settings) -> tuple[Backend, str]:
    """Construct (not load) the best candidate's backend."""
    c = candidates(manifest, settings)[0]
    return build(c.name, manifest, model_dir, settings), c.reason


def fallbacks(
    manifest: Manifest, model_dir: Path, settings: Settings
) -> list[tuple[str, Callable[[], Backend]]]:
    """The candidates after the first, as (reason, constructor) pairs for the runtime to try in order."""
    try:
        rest = candidates(manifest, settings)[1:]
    except BackendUnavailable:
        return []

    def make(c: Candidate) -> Callable[[], Backend]:
        return lambda: build(c.name, manifest, model_dir, settings)

    return [(c.reason, make(c)) for c in rest]
