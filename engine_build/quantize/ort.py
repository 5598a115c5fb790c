"""int8 Q/DQ for ONNX Runtime's CPU provider with ONNX Runtime's own static quantizer, plus the parity
figure (int8 vs fp32 on real photos) that `auto` precision on onnxruntime-cpu reads from the manifest.

Why this quantizer for the CPU graph (measured in docs/benchmarks.md, "CPU efficiency"): its QDQ output
(per-channel int8 weights, per-tensor int8 activations, MinMax ranges from real-photo tiles) is what
ONNX Runtime's QDQ fusions turn into QLinearConv / QLinearConcat / QLinearLeakyRelu kernels, so whole
chains of the network stay in int8 between convolutions. The graph is standard ONNX (QuantizeLinear /
DequantizeLinear, int8 only around them), but it is for ONNX Runtime only: its activations are asymmetric
(non-zero zero points, the better fit for post-ReLU ranges), and TensorRT's Q/DQ layers take only zero
zero points (engine_build/trt/rules.py). The quantize step records such a graph `cpu_only` in the manifest
and `gendr-build engine` refuses it; ModelOpt (`--tool modelopt`) writes the symmetric graph TensorRT builds.

Activations are signed int8 (S8S8): unsigned activations (U8S8) would put uint8 tensors inside the graph.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Operators whose inputs/outputs get Q/DQ (the ones ORT CPU has int8 kernels or QDQ fusions for).
ORT_OP_TYPES = ("Conv", "LeakyRelu", "Concat", "Add", "Mul", "Relu", "MatMul", "Gemm")
ORT_METHODS = ("minmax", "percentile", "entropy")


class OrtQuantizeError(RuntimeError):
    pass


def first_and_last_convs(graph_path: Path, n_last: int = 1) -> list[str]:
    """Names of the first convolution and the last `n_last` ones (graph order): the layers that see the
    raw pixels and write the output, whose int8 error no later layer averages out."""
    import onnx

    m = onnx.load(str(graph_path), load_external_data=False)
    convs = [n.name for n in m.graph.node if n.op_type == "Conv"]
    if not convs:
        return []
    return list(dict.fromkeys([convs[0], *convs[-n_last:]]))


def select_nodes(graph_path: Path, patterns: Sequence[str]) -> list[str]:
    """Node names that fully match any regex in `patterns` (the exclude list, as ModelOpt reads it)."""
    import onnx

    if not patterns:
        return []
    m = onnx.load(str(graph_path), load_external_data=False)
    rx = [re.compile(p) for p in patterns]
    return [n.name for n in m.graph.node if any(r.fullmatch(n.name) for r in rx)]


class _TileReader:
    """ONNX Runtime's CalibrationDataReader protocol over uint8 graph-input tiles, `batch` at a time."""

    def __init__(self, input_name: str, tiles: np.ndarray, batch: int) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(
            {input_name: tiles[i : i + batch]} for i in range(0, len(tiles), batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - only the entropy/percentile calibrators call it
        raise OrtQuantizeError("calibration data can be read once")


def quantize_static_int8(
    src: Path,
    dst: Path,
    input_name: str,
    tiles: np.ndarray,
    *,
    exclude_nodes: Sequence[str] = (),
    method: str = "minmax",
    batch: int = 1,
    op_types: Sequence[str] = ORT_OP_TYPES,
) -> dict[str, Any]:
    """Write an S8S8 QDQ graph of `src` to `dst` with `onnxruntime.quantization.quantize_static`.

    Returns the options used (for the manifest). `tiles` are uint8 graph inputs cut from real photos.
    """
    # A fresh interpreter: NVIDIA ModelOpt, once imported, patches ONNX Runtime's calibrators process-wide
    # (modelopt.onnx.quantization.ort_patching), which breaks quantize_static's MinMax calibration.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        job = pool.submit(
            _quantize_in_this_process,
            src,
            dst,
            input_name,
            tiles,
            exclude_nodes=list(exclude_nodes),
            method=method,
            batch=batch,
            op_types=list(op_types),
        )
        return job.result()


def _quantize_in_this_process(
    src: Path,
    dst: Path,
    input_name: str,
    tiles: np.ndarray,
    *,
    exclude_nodes: Sequence[str] = (),
    method: str = "minmax",
    batch: int = 1,
    op_types: Sequence[str] = ORT_OP_TYPES,
) -> dict[str, Any]:
    """The quantization itself (run in a fresh process by quantize_static_int8)."""
    try:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency of the serve extra
        raise OrtQuantizeError(f"onnxruntime.quantization is not importable: {e}") from e
    calib = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if method not in calib:
        raise OrtQuantizeError(f"ORT calibration method must be one of {ORT_METHODS}, got {method!r}")
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # ORT logs a "consider pre-processing" nag on the root logger
    try:
        quantize_static(
            str(src),
            str(dst),
            _TileReader(input_name, tiles, batch),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types),
            nodes_to_exclude=list(exclude_nodes),
            calibrate_method=calib[method],
            extra_options={
                "ActivationSymmetric": False,
                "WeightSymmetric": True,
                # int32 bias into DequantizeLinear breaks a TensorRT rule (trt_rules: DQ takes 8-bit types)
                "QuantizeBias": False,
            },
        )
    except Exception as e:  # the quantizer raises many types
        raise OrtQuantizeError(f"ONNX Runtime static quantization failed: {type(e).__name__}: {e}") from e
    finally:
        root.setLevel(level)
    return {
        "format": "QDQ",
        "activations": "int8 per-tensor (asymmetric)",
        "weights": "int8 per-channel (symmetric)",
        "op_types": list(op_types),
        "excluded_nodes": list(exclude_nodes),
    }


def _cpu_session(path: Path, threads: int = 0, fuse: bool = True) -> Any:
    """fuse=False: no graph optimization, so an int8 Q/DQ graph runs each pair and convolution in float."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    level = ort.GraphOptimizationLevel
    so.graph_optimization_level = level.ORT_ENABLE_ALL if fuse else level.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def parity_vs_fp32(
    reference: Path, candidate: Path, input_name: str, tiles: np.ndarray, batch: int = 2
) -> dict[str, Any]:
    """PSNR of `candidate`'s uint8 output against `reference`'s (fp32) on held-out real-photo tiles.

    `psnr_db` pools the squared error over all tiles (the figure `auto` compares to the bound);
    `worst_tile_psnr_db` and `max_abs_err` say how uneven it is.
    """
    ref_s, cand_s = _cpu_session(reference), _cpu_session(candidate)
    sq, worst, max_err, n = 0.0, math.inf, 0, 0
    for i in range(0, len(tiles), batch):
        x = {input_name: tiles[i : i + batch]}
        a = ref_s.run(None, x)[0].astype(np.int16)
        b = cand_s.run(None, x)[0].astype(np.int16)
        d = (a - b).astype(np.float64)
        sq += float(np.sum(d**2))
        n += d.size
        max_err = max(max_err, int(np.abs(d).max()))
        for t in d:
            mse = float(np.mean(t**2))
            worst = min(worst, math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse))
    mse = sq / max(n, 1)
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return {
        "psnr_db": round(psnr, 2) if math.isfinite(psnr) else 99.0,
        "worst_tile_psnr_db": round(worst, 2) if math.isfinite(worst) else 99.0,
        "max_abs_err": max_err,
        "n_tiles": len(tiles),
    }
