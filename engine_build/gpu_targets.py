"""The GPUs engines are built for, and the checks that an engine is built on the right one.

Engines only run on the compute capability they were built on: build on a node of each pool
(`--target-gpu a10|l20|h100` refuses to build on the wrong GPU).
"""

from __future__ import annotations

import logging
import shutil
import subprocess

from engine_build.errors import BuildError
from service.hardware import GpuInfo, gpu_info, import_cudart

log = logging.getLogger(__name__)

#: target → (compute capability, GPU name). Engines are specific to the compute capability.
TARGET_GPUS: dict[str, tuple[str, str]] = {
    "a10": ("8.6", "NVIDIA A10"),
    "l20": ("8.9", "NVIDIA L20"),
    "h100": ("9.0", "NVIDIA H100"),
}
#: Precisions that need a Q/DQ graph first (engine_build/quantize).
QUANT_PRECISIONS = ("int8", "fp8")
#: The minimum compute capability per precision of service.manifest.PRECISIONS (bf16 tensor cores:
#: Ampere 8.0; fp8: Ada 8.9 and Hopper 9.0).
PRECISION_MIN_CC: dict[str, tuple[int, int]] = {
    "fp32": (7, 0),
    "fp16": (7, 0),
    "bf16": (8, 0),
    "int8": (7, 5),
    "fp8": (8, 9),
}
#: The precision matrix we build and test per node pool (docs/export.md).
SUPPORTED: dict[str, tuple[str, ...]] = {
    "a10": ("fp16", "int8"),
    "l20": ("fp16", "int8", "fp8"),
    "h100": ("fp16", "int8", "fp8"),
}


class TrtBuildError(BuildError, RuntimeError):
    """A build that cannot run here (no TensorRT, no GPU, wrong GPU) or failed; one-line message."""


Gpu = GpuInfo  # the build side's name for the same record


def parse_cc(cc: str) -> tuple[int, int]:
    major, _, minor = cc.partition(".")
    return int(major), int(minor or 0)


def describe_gpu(gpu: Gpu) -> str:
    return f"{gpu.name} (sm_{gpu.compute_capability.replace('.', '')})"


def detect_gpu(device_id: int = 0) -> Gpu | None:
    """The GPU at CUDA index `device_id` (service.hardware: CUDA runtime + NVML by PCI bus id), else
    nvidia-smi (whose `--id` is NVML's PCI-ordered index: used only when CUDA cannot be asked)."""
    g = gpu_info(device_id)
    if g is not None:
        return g
    if shutil.which("nvidia-smi") and import_cudart() is None:
        try:
            out = subprocess.run(
                [
                    "nvidia-smi",
                    f"--id={device_id}",
                    "--query-gpu=name,compute_cap,memory.total,pci.bus_id",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            )
            if out.returncode == 0 and out.stdout.strip():
                name, cc, mem, bus = (s.strip() for s in out.stdout.strip().splitlines()[0].split(","))
                return Gpu(device_id, name, cc, int(float(mem)) * 1024 * 1024, bus.lower())
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
