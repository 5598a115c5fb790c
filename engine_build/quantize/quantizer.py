"""Post-training quantization (int8 / fp8) of the tile graph: explicit Q/DQ ONNX, from NVIDIA ModelOpt
(TensorRT's form, fp8) or ONNX Runtime's quantizer (the CPU int8 graph: engine_build/quantize/ort.py).

TensorRT 10/11 networks are strongly typed: precision comes from the ONNX, so int8 and fp8 engines are
built from graphs that carry QuantizeLinear/DequantizeLinear pairs with calibrated scales. This step
writes them into the repository as `onnx/int8/` and `onnx/fp8/`.

- Calibration data (engine_build/quantize/calib.py): graph-input tiles cut from real photos, prepared as the
  runtime prepares requests (GenDR: bicubic ×native-scale crops; single networks: raw crops).
- Base graph: the fp16 export when present (so its fp32 islands — norms, attention scores, an fp32
  VAE decoder — stay as they are and the un-quantized rest runs in fp16 in TensorRT), else fp32.
  ModelOpt's own fp32→fp16 conversion is avoided: on this graph it is quadratic in the node count
  (≈100 s for the tiny model, hours at full size).
- Excluded from quantization (regexes over ONNX node names; configurable): conv_in, conv_out, the
  time embedding, norm_out and proj_out — first/last layers and the conditioning path, where int8
  error is known to hurt diffusion models most.
- int8 graphs use only standard ONNX ops and run in ONNX Runtime CPU; each gets a parity figure (PSNR
  vs fp32 on held-out real-photo tiles) that `auto` on onnxruntime-cpu checks against 40 dB. Each graph
  is checked against TensorRT's rules once written: ModelOpt's (symmetric Q/DQ) must pass; ONNX
  Runtime's (asymmetric activations, which TensorRT cannot build) is recorded `cpu_only` with the
  reason, and `gendr-build engine` refuses it in one line. fp8
  graphs use FLOAT8E4M3FN Q/DQ (opset 19), the form TensorRT consumes; fp8 engines need compute
  capability ≥ 8.9 (L20, H100), so targeting an A10 is refused here already.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine_build.export.onnx_graph import DATA_FILE, GRAPH_FILE, ExportError, finalize_onnx, trt_problems
from engine_build.gpu_targets import (
    PRECISION_MIN_CC,
    QUANT_PRECISIONS,
    TARGET_GPUS,
    describe_gpu,
    detect_gpu,
    parse_cc,
)
from engine_build.quantize.calib import calibration_tiles, int8_parity, tiles_digest
from engine_build.quantize.errors import QuantizeError, QuantizeToolMissing
from engine_build.repository import ONNX_DIR, replace_dir, run_step
from service.manifest import (
    Manifest,
    OnnxVariant,
    hash_inputs,
    make_artifact,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

DEFAULT_EXCLUDES: tuple[str, ...] = (
    r".*conv_in.*",
    r".*conv_out.*",
    r".*time_emb.*",
    r".*norm_out.*",
    r".*proj_out.*",
)
FP8_MIN_CC = PRECISION_MIN_CC["fp8"]
QUANTIZE_FORMAT = 2  # 2: TensorRT's rules decide `cpu_only` (an ORT graph made before lacks the marker)
QUANT_TOOLS = ("auto", "ort", "modelopt")


@dataclass
class QuantizeResult:
    model_dir: Path
    manifest: Manifest
    precision: str
    skipped: bool
    seconds: float
    n_tiles: int


def check_fp8_target(target_gpu: str) -> str:
    """Refuse fp8 for GPUs below compute capability 8.9. Returns a note for the manifest/log."""
    if target_gpu != "auto":
        if target_gpu not in TARGET_GPUS:
            raise QuantizeError(
                f"unknown target GPU {target_gpu!r}; choose auto or one of {sorted(TARGET_GPUS)}"
            )
        cc, name = TARGET_GPUS[target_gpu]
        if parse_cc(cc) < FP8_MIN_CC:
            raise QuantizeError(
                f"fp8 needs compute capability ≥ 8.9 (Ada: L20/L40/L4, Hopper: H100); {name} is {cc}. "
                "Use --precision int8 (or fp16) for A10 nodes."
            )
        return f"target {target_gpu} ({name}, sm_{cc.replace('.', '')})"
    gpu = detect_gpu()
    if gpu is None:
        log.warning(
            "fp8: no GPU visible here; the fp8 graph builds into engines only on compute capability ≥ 8.9 "
            "(L20, H100) — `gendr-build engine` checks that"
        )
        return "no GPU visible at quantization time"
    if parse_cc(gpu.compute_capability) < FP8_MIN_CC:
        raise QuantizeError(
            f"fp8 needs compute capability ≥ 8.9 (L20, H100); this machine's {describe_gpu(gpu)} "
            "cannot run it. "
            "Use --precision int8, or pass --target-gpu l20|h100 to prepare the graph for another node pool."
        )
    return f"GPU present: {describe_gpu(gpu)}"


def _modelopt_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("nvidia-modelopt", "onnxruntime", "onnx"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _require_tools(tool: str, builtin_photos: bool) -> None:
    """Raise QuantizeToolMissing before any work when a tool this run needs is not installed."""
    import importlib.util

    need = {"modelopt": tool == "modelopt", "onnxruntime": tool == "ort", "skimage": builtin_photos}
    why = {
        "modelopt": "NVIDIA ModelOpt is not installed (pip install nvidia-modelopt, or --tool ort for int8)",
        "onnxruntime": "ONNX Runtime's quantizer is not installed (pip install onnxruntime)",
        "skimage": "scikit-image is not installed: the `builtin` photos come with it; pass folders of "
        "photos (--calib DIR, --parity-photos DIR)",
    }
    for module, needed in need.items():
        if needed and importlib.util.find_spec(module) is None:
            raise QuantizeToolMissing(why[module])


def _import_modelopt():
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise QuantizeToolMissing(
            f"NVIDIA ModelOpt's ONNX quantizer is not importable ({e}); install nvidia-modelopt plus "
            "onnx-graphsurgeon, onnxconverter-common, polygraphy, onnxslim and lief"
        ) from e
    return quantize


def quantize_model(
    model_dir: str | Path,
    precision: str,
    calib: str | Path | None = None,
    n_tiles: int = 32,
    base: str = "auto",
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    method: str = "auto",
    target_gpu: str = "auto",
    seed: int = 0,
    force: bool = False,
    calib_batch: int = 1,
    calib_ep: str = "cpu",
    tool: str = "auto",
    parity_tiles: int = 8,
    parity_photos: str | Path | None = "builtin",
) -> QuantizeResult:
    """Write onnx/<precision>/ (Q/DQ) from the repository's fp16 (or fp32) graph; idempotent.

    tool: `ort` (ONNX Runtime's quantize_static, the CPU int8 path), `modelopt` (TensorRT's form, and
    the only fp8 path) or `auto` (ort for int8 from the fp32 graph, else modelopt). int8 graphs get a
    parity figure against fp32 on held-out real-photo tiles, which `auto` on onnxruntime-cpu reads.
    """
    model_dir = Path(model_dir)
    if precision not in QUANT_PRECISIONS:
        raise QuantizeError(f"precision must be one of {QUANT_PRECISIONS}, got {precision!r}")
    target_note = check_fp8_target(target_gpu) if precision == "fp8" else None
    manifest = read_manifest(model_dir, verify=True)
    if base == "auto":
        base = "fp16" if "fp16" in manifest.onnx else "fp32"
    if base not in manifest.onnx:
        raise QuantizeError(
            f"{model_dir}: no {base} graph to quantize (have {list(manifest.onnx)}); run `gendr-build export`"
        )
    if n_tiles < 1 or n_tiles % calib_batch:
        raise QuantizeError(
            f"--tiles {n_tiles} must be a positive multiple of the calibration batch {calib_batch}"
        )
    if tool == "auto":
        tool = "ort" if precision == "int8" and base == "fp32" else "modelopt"
    if tool not in QUANT_TOOLS or (tool == "ort" and precision != "int8"):
        raise QuantizeError(f"tool must be one of {QUANT_TOOLS} (ort: int8 only), got {tool!r}")
    if method == "auto":
        method = "minmax" if tool == "ort" else "entropy" if precision == "int8" else "max"
    builtin = calib in (None, "builtin") or (
        precision == "int8" and parity_tiles > 0 and parity_photos in (None, "builtin")
    )
    _require_tools(tool, builtin)
    base_v = manifest.onnx[base]
    tiles = calibration_tiles(manifest, calib, n_tiles, seed)
    calib_digest = tiles_digest(tiles)
    options = {
        "format": QUANTIZE_FORMAT,
        "precision": precision,
        "base": base,
        "base_key": base_v.key,
        "calibration_sha256": calib_digest,
        "n_tiles": n_tiles,
        "excludes": list(excludes),
        "method": method,
        "calib_batch": calib_batch,
        "tool": tool,
        "parity_tiles": parity_tiles if precision == "int8" else 0,
        "parity_photos": str(parity_photos),
        "versions": _modelopt_versions(),
    }
    key = hash_inputs("quantize", options)
    t0 = time.perf_counter()
    current = manifest.onnx.get(precision)
    src = model_dir / base_v.graph.path
    t = manifest.tile.tile
    cpu_only: str | None = None

    def produce(tmp: Path) -> dict[str, Any]:
        nonlocal cpu_only
        raw = tmp / "raw"
        raw.mkdir()
        log.info(
            "quantize %s: %s %s calibration (%s) on %d real-photo tiles from the %s graph",
            precision,
            tool,
            precision,
            method,
            n_tiles,
            base,
        )
        if tool == "ort":
            info = _ort_quantize(
                src, raw / GRAPH_FILE, base_v.input_name, tiles, excludes, method, calib_batch
            )
        else:
            info = {}
            _modelopt_quantize(
                src, raw / GRAPH_FILE, base_v, tiles, precision, method, excludes, calib_batch, calib_ep, t
            )
        try:  # ModelOpt's graph is TensorRT's form and must pass its rules; ORT's is for the CPU
            out = manifest.tile.out_tile
            finalize_onnx(raw / GRAPH_FILE, tmp / "final", out, None, (t, t, 3), trt_strict=tool != "ort")
        except ExportError as e:
            raise QuantizeError(str(e)) from e
        cpu_only = _cpu_only_reason(trt_problems(tmp / "final" / GRAPH_FILE, out)) if tool == "ort" else None
        return info

    def install(tmp: Path, tool_info: dict[str, Any]) -> str:
        nonlocal manifest
        target = model_dir / ONNX_DIR / precision
        replace_dir(tmp / "final", target)
        n_qdq = _count_qdq(target / GRAPH_FILE)
        quant_info: dict[str, Any] = {k: v for k, v in options.items() if k != "versions"}
        quant_info.update(
            {
                "quantize_linear_nodes": n_qdq,
                "tool": "onnxruntime.quantization" if tool == "ort" else "nvidia-modelopt",
                "versions": options["versions"],
                **tool_info,
            }
        )
        if precision == "int8" and parity_tiles > 0:
            quant_info["parity"] = int8_parity(
                model_dir, manifest, base_v, target / GRAPH_FILE, parity_photos, parity_tiles, seed
            )
        if target_note:
            quant_info["target"] = target_note
        data = target / DATA_FILE
        variant = OnnxVariant(
            precision=precision,  # type: ignore[arg-type]
            graph=make_artifact(model_dir, target / GRAPH_FILE),
            external_data=make_artifact(model_dir, data) if data.is_file() else None,
            input_name=base_v.input_name,
            output_name=base_v.output_name,
            opset=_opset(target / GRAPH_FILE),
            key=key,
            quantization=quant_info,
            options={"seconds": round(time.perf_counter() - t0, 2)},
            cpu_only=cpu_only,
        )
        engines = [e for e in manifest.engines if e.precision != precision]
        if len(engines) != len(manifest.engines):
            log.warning(
                "dropping TensorRT %s engine(s) built from the previous %s graph", precision, precision
            )
        manifest = manifest.model_copy(
            update={"onnx": {**manifest.onnx, precision: variant}, "engines": engines}
        )
        write_manifest(model_dir, manifest)
        return f"{n_qdq} Q/DQ pairs"

    skipped, _ = run_step(
        model_dir,
        f"onnx {precision}",
        key,
        (current.key, [current.graph, current.external_data]) if current else None,
        produce,
        install,
        force=force,
        parent=model_dir / ONNX_DIR,
    )
    return QuantizeResult(model_dir, manifest, precision, skipped, time.perf_counter() - t0, n_tiles)


def _cpu_only_reason(problems: list[str]) -> str | None:
    """The manifest's one-line `cpu_only` reason from TensorRT's rules (None: TensorRT can build it)."""
    if not problems:
        return None
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"ONNX Runtime's quantizer (asymmetric int8) breaks TensorRT's rules: {problems[0]}{more}"


def _modelopt_quantize(
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
    quantize = _import_modelopt()
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


def _ort_quantize(
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


def _count_qdq(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return sum(1 for n in m.graph.node if n.op_type == "QuantizeLinear")


def _opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


__all__ = [
    "DEFAULT_EXCLUDES",
    "QUANT_PRECISIONS",
    "QuantizeError",
    "QuantizeResult",
    "QuantizeToolMissing",
    "calibration_tiles",
    "check_fp8_target",
    "quantize_model",
]

if os.environ.get("GENDR_MODELOPT_QUIET", "1") == "1":
    logging.getLogger("modelopt").setLevel(logging.WARNING)
