"""Choosing a backend for a model on this machine, saying why, and what to fall back to.

`auto` ranks what could serve the model here: TensorRT when a real TensorRT runtime, a GPU and an
engine built for this GPU's compute capability *by this exact TensorRT version* exist (a plan only
deserialises in the version that built it); then ONNX Runtime's CUDA provider when onnxruntime-gpu
sees a GPU; then OpenVINO on the CPU (`cpu_choice`: int8 or bf16 by CPU family); then ONNX Runtime on
the CPU; then (a checkpoint in the repository) PyTorch. The runtime loads the first and falls back down
the list when a load fails, recording why (`candidates`).

The CPU rule (`cpu_choice`, docs/runtime.md): NNCF's int8 graph is served only where its parity passes
(≥ 40 dB vs fp32 on real photos, for this CPU's arithmetic: `int8_sums_hold`) and a speed figure
measured on this CPU family says it beats every other path this CPU would take (OpenVINO bf16 on a
bf16 unit, OpenVINO fp32 where measured, ONNX Runtime fp32) by INT8_MIN_GAIN; the figure comes from the
repository (recorded by `gendr-build quantize --tool nncf` on a CPU of the same family) or from
CPU_FIGURES (measured by benchmarks/cpu_efficiency.py). An unmeasured family never gets int8. Else bf16
on a bf16 unit; else OpenVINO fp32 where measured OV_FP32_MIN_GAIN × ONNX Runtime fp32 on this family;
else ONNX Runtime.

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
from service.hardware import (
    GpuInfo,
    cpu_family,
    gpu_info,
    has_package,
    tensorrt_too_old,
    tensorrt_version,
)
from service.manifest import PRECISIONS, Engine, Manifest, OnnxVariant
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


#: Wall seconds per 96-px tile of the default model (Real-ESRGAN ×4plus, batch 1, 2 cores) by CPU family and
#: path, from benchmarks/cpu_efficiency.py (docs/benchmarks.md, "CPU efficiency"). A family or path not
#: here was not measured; `auto` gives int8 to no family on a guess.
CPU_FIGURES: dict[str, dict[str, float]] = {
    # Intel Xeon 5th gen (AMX), 2 cores: the first CPU efficiency run; int8 there was ORT's, not NNCF's
    "amx": {"ort-fp32": 1.61, "ov-fp32": 1.37, "ov-bf16": 0.44},
    # AMD EPYC (Zen 3, family 25 model 1: AVX2, no VNNI, no AVX-512), 2 cores: issue 28's quietest run
    # (int8 = NNCF's graph; its parity, 35.3 dB, fails the bound: the figure only ranks the paths)
    "avx2": {"ort-fp32": 2.71, "ort-int8": 3.39, "ov-fp32": 2.39, "ov-int8": 1.37},
}
#: int8 must be this much faster than the next path (a shared 2-core VM's timings move ±10 %).
INT8_MIN_GAIN = 1.1
#: OpenVINO fp32 replaces ONNX Runtime fp32 (same graph, ≈90 dB apart) only this much faster: the bar
#: OpenVINO was adopted at (docs/benchmarks.md; the Xeon's 1.18× stayed below it, ONNX Runtime kept fp32).
OV_FP32_MIN_GAIN = 1.3


@dataclass(frozen=True)
class CpuChoice:
    """What `auto` serves on this CPU: OpenVINO's precision (None: no OpenVINO candidate), the precision
    ONNX Runtime gets under `auto` (fp32 where NNCF's int8 graph is not measured faster in it), and why."""

    family: str
    openvino: str | None
    ort_precision: str
    reason: str


def nncf_int8(manifest: Manifest) -> OnnxVariant | None:
    from service.backends.openvino import nncf_int8 as find

    return find(manifest)


#: Families whose int8 dot products sum u8×s8 products into int32 exactly (VNNI, AMX-INT8).
EXACT_INT8_FAMILIES = ("amx", "avx512_bf16", "vnni")


def int8_sums_hold(variant: OnnxVariant, family: str, why: str) -> tuple[bool, str]:
    """Whether the int8 graph's parity figure speaks for this CPU. With 8-bit weights a CPU without VNNI
    (AVX2's `vpmaddubsw`) adds u8×s8 pairs in saturating int16, so its output can differ from the exact
    sums VNNI/AMX compute (the parity's `exact` row): the figure holds there only if it was measured on
    such a CPU. 7-bit weights (`--weight-bits 7`) never saturate."""
    q = variant.quantization or {}
    if q.get("weight_bits", 7) != 8 or family in EXACT_INT8_FAMILIES:
        return True, why
    parity = q.get("parity")
    measured = parity.get("family") if isinstance(parity, dict) else None
    if measured is not None and measured not in EXACT_INT8_FAMILIES:
        return True, f"{why} (measured on {measured})"
    return False, (
        f"int8 not served on {family}: its 8-bit weights saturate in AVX2's u8×s8 pairs and its parity "
        f"was measured on {measured or 'an unrecorded CPU family'} (re-run gendr-build quantize on this "
        "CPU, or quantize with --weight-bits 7)"
    )


def family_figures(manifest: Manifest, family: str) -> tuple[dict[str, float], str]:
    """Seconds per tile by path measured on this CPU family, and where they come from: the repository's
    own (recorded by `gendr-build quantize --tool nncf` on a CPU of this family), else CPU_FIGURES."""
    v = nncf_int8(manifest)
    speed = (v.quantization or {}).get("speed") if v is not None else None
    if (
        isinstance(speed, dict)
        and speed.get("family") == family
        and isinstance(speed.get("s_per_tile"), dict)
    ):
        figs = {k: float(x) for k, x in speed["s_per_tile"].items() if isinstance(x, int | float) and x > 0}
        return figs, f"measured on {speed.get('cpu', 'a CPU')} ({family}) by gendr-build quantize"
    figs = {k: x for k, x in CPU_FIGURES.get(family, {}).items() if x > 0}
    return figs, f"docs/benchmarks.md figures for {family}" if figs else f"no figures for {family}"


def _faster(figs: dict[str, float], path: str, others: list[str]) -> tuple[bool, str]:
    """Whether `path` beats each of `others` by INT8_MIN_GAIN in `figs` (unmeasured: no), and the ratios."""
    if path not in figs or any(o not in figs for o in others):
        missing = [p for p in (path, *others) if p not in figs]
        return False, f"{', '.join(missing)} not measured"
    gains = {o: figs[o] / figs[path] for o in others}
    text = ", ".join(f"{g:.2f}× {o}" for o, g in gains.items())
    return all(g >= INT8_MIN_GAIN for g in gains.values()), text


def cpu_choice(manifest: Manifest, settings: Settings, flags: set[str] | None = None) -> CpuChoice:
    """The CPU paths `auto` takes for this model here (the rule in the module docstring)."""
    from service.backends import openvino as ovmod
    from service.backends.onnxruntime import int8_passes

    flags = ovmod.cpu_flags() if flags is None else flags
    family = cpu_family(flags)
    bf16 = ovmod.bf16_flags(flags)
    ov_ok = (
        settings.precision in ("auto", "bf16", "int8")
        and "fp32" in manifest.onnx
        and manifest.kind == "single"
        and has_package("openvino")
    )
    figs, source = family_figures(manifest, family)
    v = nncf_int8(manifest)
    int8_ok, int8_why = int8_passes(v) if v is not None else (False, "no NNCF int8 graph")
    if int8_ok and v is not None:
        int8_ok, int8_why = int8_sums_hold(v, family, int8_why)
    ort_precision = "auto"
    if v is not None and settings.precision == "auto":
        faster, why = _faster(figs, "ort-int8", ["ort-fp32"])
        ort_precision = "auto" if int8_ok and faster else "fp32"
    if not ov_ok:
        return CpuChoice(family, None, ort_precision, "")
    # OpenVINO fp32 is a rival (and a path of its own) only where measured on this family
    fp32_rival = ["ov-fp32"] if "ov-fp32" in figs and settings.precision == "auto" else []
    if int8_ok and settings.precision in ("auto", "int8"):
        rivals = ["ov-bf16", *fp32_rival, "ort-fp32"] if bf16 else [*fp32_rival, "ort-fp32"]
        faster, why = _faster(figs, "ov-int8", rivals)
        if faster or settings.precision == "int8":
            return CpuChoice(
                family,
                "int8",
                ort_precision,
                f"auto: OpenVINO int8 (NNCF; {int8_why}; {family}: {why}, {source})",
            )
        int8_why = f"int8 not served on {family}: {why} ({source})"
    if bf16 and settings.precision in ("auto", "bf16"):
        return CpuChoice(family, "bf16", ort_precision, f"auto: OpenVINO bf16 on the CPU ({', '.join(bf16)})")
    if fp32_rival and figs.get("ort-fp32", 0) >= OV_FP32_MIN_GAIN * figs["ov-fp32"]:
        gain = figs["ort-fp32"] / figs["ov-fp32"]
        why = f"auto: OpenVINO fp32 on {family} ({gain:.2f}× ONNX Runtime fp32, {source}); {int8_why}"
        return CpuChoice(family, "fp32", ort_precision, why)
    return CpuChoice(family, None, ort_precision, int8_why)


def openvino_candidate(manifest: Manifest, settings: Settings) -> str | None:
    """Why OpenVINO should serve on this CPU (`cpu_choice`: NNCF's int8 where measured fastest on this CPU
    family, else bf16 on a bf16 unit, docs/benchmarks.md), or None: not installed, no such path, no fp32
    graph, or not a `single` network (GenDR's bf16 quality is unmeasured: GENDR_BACKEND=openvino-cpu)."""
    c = cpu_choice(manifest, settings)
    return c.reason if c.openvino is not None else None


def _cpu_settings(name: str, manifest: Manifest, settings: Settings) -> Settings:
    """`auto` precision made concrete where the CPU rule decides it (OpenVINO int8, ONNX Runtime fp32)."""
    if settings.precision != "auto" or name not in ("openvino-cpu", "onnxruntime-cpu"):
        return settings
    c = cpu_choice(manifest, settings)
    p = (c.openvino or "auto") if name == "openvino-cpu" else c.ort_precision
    return settings if p == "auto" else settings.model_copy(update={"precision": p})


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
    settings = _cpu_settings(name, manifest, settings)
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
