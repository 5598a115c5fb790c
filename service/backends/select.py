"""Choosing a backend for a model on this machine, and saying why.

`auto`: TensorRT when the package, a GPU and an engine built for this GPU's compute capability all
exist; else ONNX Runtime's CUDA provider when onnxruntime-gpu sees a GPU; else ONNX Runtime on the
CPU; else (no ONNX graph at all) PyTorch if it is installed. Each step only looks for packages and
files (importlib.util.find_spec, NVML): nothing heavy is imported and no artifact is read here.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from service.backends.base import Backend, BackendUnavailable
from service.manifest import Engine, Manifest
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "8.6"
    memory_total: int

    @property
    def sm(self) -> str:
        return "sm_" + self.compute_capability.replace(".", "")


def has_package(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def gpu_info(device_id: int = 0) -> GpuInfo | None:
    """The GPU at `device_id` via NVML (nvidia-ml-py) or the CUDA runtime (cuda-python); None if none."""
    if has_package("pynvml"):
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                if device_id >= pynvml.nvmlDeviceGetCount():
                    return None
                h = pynvml.nvmlDeviceGetHandleByIndex(device_id)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                name = pynvml.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
                mem = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
                return GpuInfo(device_id, name, f"{major}.{minor}", mem)
            finally:
                pynvml.nvmlShutdown()
        except Exception as e:  # no driver, no device
            log.debug("NVML: %s", e)
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        if not has_package(mod.rsplit(".", 1)[0]):
            continue
        try:
            cudart = importlib.import_module(mod)
            err, n = cudart.cudaGetDeviceCount()
            if int(err) != 0 or device_id >= n:
                return None
            err, prop = cudart.cudaGetDeviceProperties(device_id)
            if int(err) != 0:
                return None
            name = (
                prop.name.decode(errors="replace").rstrip("\0")
                if isinstance(prop.name, bytes)
                else str(prop.name)
            )
            return GpuInfo(device_id, name, f"{prop.major}.{prop.minor}", int(prop.totalGlobalMem))
        except Exception as e:
            log.debug("%s: %s", mod, e)
    return None


def ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def find_engine(manifest: Manifest, gpu: GpuInfo, precision: str) -> Engine | None:
    """The engine built for this GPU's compute capability (fp16 preferred under `auto`)."""
    built = [e for e in manifest.engines if e.compute_capability == gpu.compute_capability]
    if precision != "auto":
        built = [e for e in built if e.precision == precision]
    order = {"fp16": 0, "bf16": 1, "int8": 2, "fp8": 3, "fp32": 4}
    built.sort(key=lambda e: order.get(e.precision, 9))
    return built[0] if built else None


def choose(manifest: Manifest, settings: Settings) -> tuple[str, str]:
    """(backend name, reason). Honours an explicit settings.backend; explains `auto`'s choice."""
    if settings.backend != "auto":
        return settings.backend, f"configured: GENDR_BACKEND={settings.backend}"
    why: list[str] = []
    gpu = gpu_info(settings.device_id)
    if gpu is None:
        why.append("no NVIDIA GPU visible")
    if has_package("tensorrt"):
        if gpu is not None:
            eng = find_engine(manifest, gpu, settings.precision)
            if eng is not None:
                return "tensorrt", (
                    f"auto: TensorRT {eng.precision} engine built for {gpu.sm} matches {gpu.name} "
                    f"(cuda:{gpu.index})"
                )
            have = sorted({f"sm_{e.compute_capability.replace('.', '')}" for e in manifest.engines}) or [
                "none"
            ]
            why.append(f"no TensorRT engine for {gpu.sm} (built: {', '.join(have)})")
    else:
        why.append("tensorrt not installed")
    providers = ort_providers()
    if manifest.onnx:
        if gpu is not None and "CUDAExecutionProvider" in providers:
            return "onnxruntime-cuda", f"auto: ONNX Runtime CUDA on {gpu.name} ({'; '.join(why)})"
        if gpu is not None:
            why.append("onnxruntime has no CUDA provider (onnxruntime-gpu not installed)")
        if "CPUExecutionProvider" in providers:
            return "onnxruntime-cpu", f"auto: ONNX Runtime CPU ({'; '.join(why)})"
        why.append("onnxruntime not installed")
    else:
        why.append("the manifest lists no ONNX graph")
    if manifest.checkpoint and has_package("torch"):
        return "torch", f"auto: PyTorch reference ({'; '.join(why)})"
    raise BackendUnavailable(f"{manifest.name}: no backend can serve it here: {'; '.join(why)}")


def create_backend(manifest: Manifest, model_dir: Path, settings: Settings) -> tuple[Backend, str]:
    """Construct (not load) the backend `choose` picks, configured from settings."""
    name, reason = choose(manifest, settings)
    common = {"instances": settings.instances_per_device, "selection_reason": reason}
    if name.startswith("onnxruntime"):
        from service.backends.onnxruntime import OnnxRuntimeBackend

        provider = {"onnxruntime-cpu": "cpu", "onnxruntime-cuda": "cuda", "onnxruntime-trt": "trt"}[name]
        backend: Backend = OnnxRuntimeBackend(
            manifest,
            model_dir,
            provider=provider,
            precision=settings.precision,  # type: ignore[arg-type]
            intra_op_threads=settings.intra_op_threads,
            max_batch=settings.max_batch,
            device_id=settings.device_id,
            **common,  # type: ignore[arg-type]
        )
    elif name == "tensorrt":
        from service.backends.tensorrt import TensorRTBackend

        backend = TensorRTBackend(
            manifest,
            model_dir,
            precision=settings.precision,
            device_id=settings.device_id,
            max_batch=settings.max_batch,
            cuda_graphs=settings.cuda_graphs,
            **common,  # type: ignore[arg-type]
        )
    elif name == "torch":
        from service.backends.torch_backend import TorchBackend

        backend = TorchBackend(
            manifest,
            model_dir,
            precision=settings.precision,
            device_id=settings.device_id,
            max_batch=settings.max_batch,
            compile=settings.torch_compile,
            intra_op_threads=settings.intra_op_threads,
            **common,  # type: ignore[arg-type]
        )
    elif name == "fake":
        from service.backends.fake import FakeBackend

        backend = FakeBackend(manifest, model_dir, max_batch=settings.max_batch, **common)  # type: ignore[arg-type]
    else:  # pragma: no cover - Settings validates the name
        raise BackendUnavailable(f"unknown backend {name!r}")
    return backend, reason
