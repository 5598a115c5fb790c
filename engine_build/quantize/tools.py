"""The quantizers `gendr-build quantize` drives besides NNCF (ModelOpt, ONNX Runtime's), the check that the
tools a run needs are installed, and small readers of a written graph (engine_build/quantize/quantizer.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine_build.quantize.errors import QuantizeError, QuantizeToolMissing
from service.manifest import OnnxVariant

log = logging.getLogger("engine_build.quantize.quantizer")


def tool_versions(tool: str) -> dict[str, str]:
    """Versions of the packages whose change changes the quantized graph (part of the step key)."""
    import importlib.metadata as md

    pkgs = (
        ("nncf", "openvino", "onnxruntime", "onnx")
        if tool == "nncf"
        else ("nvidia-modelopt", "onnxruntime", "onnx")
    )
    out = {}
    for pkg in pkgs:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def require_tools(tool: str, builtin_photos: bool) -> None:
    """Raise QuantizeToolMissing before any work when a tool this run needs is not installed."""
    import importlib.util

    need = {
        "modelopt": tool == "modelopt",
        "onnxruntime": tool in ("ort", "nncf"),
        "nncf": tool == "nncf",
        "openvino": tool == "nncf",
        "skimage": builtin_photos,
    }
    why = {
        "modelopt": "NVIDIA ModelOpt is not installed (pip install nvidia-modelopt, or --tool ort for int8)",
        "onnxruntime": "ONNX Runtime's quantizer is not installed (pip install onnxruntime)",
        "nncf": "NNCF is not installed (pip install 'gendr-serve[build]', or pip install nncf; "
        "--tool ort quantizes without it)",
        "openvino": "OpenVINO is not installed: NNCF's int8 graph is measured and served with it "
        "(pip install 'gendr-serve[openvino]')",
        "skimage": "scikit-image is not installed: the `builtin` photos come with it; pass folders of "
        "photos (--calib DIR, --parity-photos DIR)",
    }
    for module, needed in need.items():
        if needed and importlib.util.find_spec(module) is None:
            raise QuantizeToolMissing(why[module])


def import_modelopt():
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise QuantizeToolMissing(
            f"NVIDIA ModelOpt's ONNX quantizer is not importable ({e}); install nvidia-modelopt plus "
            "onnx-graphsurgeon, onnxconverter-common, polygraphy, onnxslim and lief"
        ) from e
    return quantize


def cpu_only_reason(problems: list[str], tool: str = "ort") -> str | None:
    """The manifest's one-line `cpu_only` reason from TensorRT's rules (None: TensorRT can build it)."""
    if not problems:
        return None
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    who = (
        "NNCF (asymmetric int8, for OpenVINO)"
        if tool == "nncf"
        else "ONNX Runtime's quantizer (asymmetric int8)"
    )
    return f"{who} breaks TensorRT's rules: {problems[0]}{more}"


def modelopt_quantize(
    src: Path,
    dst: Path,
    base_v: OnnxVariant,
    tiles: np.ndarray,
    precision: str,
    method: str,
    excludes: Sequence[str],
    calib_batch: int,
    calib_ep: str,
    t: int,
) -> None:
    quantize = import_modelopt()
    try:
        quantize(
            onnx_path=str(src),
            quantize_mode=precision,
            calibration_data={base_v.input_name: tiles},
            calibration_method=method,
            calibration_shapes=f"{base_v.input_name}:{calib_batch}x{t}x{t}x3",
            calibration_eps=[calib_ep],
            nodes_to_exclude=list(excludes) or None,
            use_external_data_format=base_v.external_data is not None,
            output_path=str(dst),
            high_precision_dtype="fp32",  # keep the base graph's dtypes (see the module docstring)
            log_level="WARNING",
        )
    except Exception as e:  # ModelOpt raises many types
        raise QuantizeError(f"ModelOpt {precision} quantization failed: {type(e).__name__}: {e}") from e


def ort_quantize(
    src: Path,
    dst: Path,
    input_name: str,
    tiles: np.ndarray,
    excludes: Sequence[str],
    method: str,
    calib_batch: int,
) -> dict[str, Any]:
    from engine_build.quantize.ort import OrtQuantizeError, quantize_static_int8, select_nodes

    try:
        return quantize_static_int8(
            src,
            dst,
            input_name,
            tiles,
            exclude_nodes=select_nodes(src, excludes),
            method=method,
            batch=calib_batch,
        )
    except OrtQuantizeError as e:
        raise QuantizeError(str(e)) from e


def count_qdq(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return sum(1 for n in m.graph.node if n.op_type == "QuantizeLinear")


def graph_opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
