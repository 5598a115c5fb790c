"""Tile functions for the build tools, all through the service's backends (one wrapper per engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine_build.torch_backend import TorchBackend
from service.backends.base import TileFunction
from service.manifest import Manifest, TileGeometry, read_manifest


def torch_runner(
    net: Any,
    device: str = "cpu",
    dtype: str = "fp32",
    geometry: TileGeometry | None = None,
    max_batch: int = 8,
) -> TileFunction:
    """PyTorch on `device` (`auto`, `cpu`, `cuda`, `cuda:N`) in `dtype` (fp32/fp16/bf16/auto)."""
    dev = None if device == "auto" else ("cuda:0" if device == "cuda" else device)
    return TileFunction(
        TorchBackend.from_module(net, geometry, device=dev, precision=dtype, max_batch=max_batch)
    )


def onnx_runner(
    model_dir: str | Path,
    precision: str = "fp32",
    *,
    manifest: Manifest | None = None,
    provider: str = "cpu",
    max_batch: int = 8,
    threads: int = 0,
) -> TileFunction:
    """The repository's ONNX `precision` variant in ONNX Runtime (`cpu`, `cuda` or `trt` provider)."""
    from service.backends.onnxruntime import OnnxRuntimeBackend

    model_dir = Path(model_dir)
    manifest = manifest or read_manifest(model_dir, verify=False)
    return TileFunction(
        OnnxRuntimeBackend(
            manifest,
            model_dir,
            provider=provider,  # type: ignore[arg-type]
            precision=precision,
            max_batch=max_batch,
            intra_op_threads=threads,
        )
    )


def tensorrt_runner(
    model_dir: str | Path,
    precision: str = "auto",
    *,
    device_id: int = 0,
    max_batch: int = 8,
    cuda_graphs: bool = False,
) -> TileFunction:
    """The repository's TensorRT engine for this GPU, through the production backend."""
    from service.backends.tensorrt import TensorRTBackend

    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir, verify=False)
    backend = TensorRTBackend(
        manifest,
        model_dir,
        precision=precision,
        device_id=device_id,
        max_batch=max_batch,
        cuda_graphs=cuda_graphs,
    )
    fn = TileFunction(backend)
    if cuda_graphs:
        backend.warmup()
    return fn
