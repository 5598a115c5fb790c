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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
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
from engine_build.quantize.calib import (
    CALIBRATION_PHOTOS,
    VALIDATION_SEED_OFFSET,
    calibration_tiles,
    int8_parity,
    tiles_digest,
)
from engine_build.quantize.errors import QuantizeError, QuantizeToolMissing
from engine_build.quantize.tools import (
    count_qdq,
    cpu_only_reason,
    graph_opset,
    modelopt_quantize,
    ort_quantize,
    require_tools,
    tool_versions,
)
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
QUANT_TOOLS = ("auto", "ort", "modelopt", "nncf")
TOOL_NAMES = {"ort": "onnxruntime.quantization", "modelopt": "nvidia-modelopt", "nncf": "nncf"}


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


@dataclass(frozen=True)
class NncfOptions:
    """How `--tool nncf` quantizes (engine_build/quantize/nncf_ptq.py); every field is part of the key."""

    preset: str = "mixed"
    keep_ends: bool = True  # the first and last convolution stay float
    keep_upsampling: bool = True  # single networks: every node from the first upsampling op on stays float
    accuracy_target_db: float | None = None  # the accuracy-aware mode's PSNR target (None: plain PTQ)
    validation_tiles: int = 8
    max_iterations: int = 20
    speed_reps: int = 3  # rounds of the per-family speed figure (0: none recorded)
    weight_bits: int = 8  # 7: NNCF's overflow fix (u8×s8 pair sums inside int16 without VNNI)
    equalize: float = 0.5  # channel equalization's migration strength before quantizing (0: none)


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
    nncf: NncfOptions | None = None,
) -> QuantizeResult:
    """Write onnx/<precision>/ (Q/DQ) from the repository's fp16 (or fp32) graph; idempotent.

    tool: `ort` (ONNX Runtime's quantize_static), `nncf` (OpenVINO's NNCF: the CPU int8 graph OpenVINO
    serves, engine_build/quantize/nncf_ptq.py), `modelopt` (TensorRT's form, and the only fp8 path) or
    `auto` (ort for int8 from the fp32 graph, else modelopt). int8 graphs get a parity figure against fp32
    on held-out real-photo tiles, which `auto` reads; NNCF's also a speed figure for this CPU's family.
    """
    model_dir = Path(model_dir)
    if precision not in QUANT_PRECISIONS:
        raise QuantizeError(f"precision must be one of {QUANT_PRECISIONS}, got {precision!r}")
    target_note = check_fp8_target(target_gpu) if precision == "fp8" else None
    manifest = read_manifest(model_dir, verify=True)
    if base == "auto":
        base = "fp16" if "fp16" in manifest.onnx and tool != "nncf" else "fp32"
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
    if tool not in QUANT_TOOLS or (tool in ("ort", "nncf") and precision != "int8"):
        raise QuantizeError(f"tool must be one of {QUANT_TOOLS} (ort, nncf: int8 only), got {tool!r}")
    if tool == "nncf" and base != "fp32":
        raise QuantizeError("--tool nncf quantizes the fp32 graph (the CPU's), not the fp16 one: --base fp32")
    if method == "auto":
        method = {"ort": "minmax", "nncf": "nncf-ptq"}.get(tool, "entropy" if precision == "int8" else "max")
    builtin = calib in (None, "builtin") or (
        precision == "int8" and parity_tiles > 0 and parity_photos in (None, "builtin")
    )
    require_tools(tool, builtin)
    nncf = (nncf or NncfOptions()) if tool == "nncf" else None
    base_v = manifest.onnx[base]
    tiles = calibration_tiles(manifest, calib, n_tiles, seed, disjoint=tool == "nncf")
    options = {
        "format": QUANTIZE_FORMAT,
        "precision": precision,
        "base": base,
        "base_key": base_v.key,
        "calibration_sha256": tiles_digest(tiles),
        "n_tiles": n_tiles,
        "excludes": list(excludes),
        "method": method,
        "calib_batch": calib_batch,
        "tool": tool,
        "parity_tiles": parity_tiles if precision == "int8" else 0,
        "parity_photos": str(parity_photos),
        "versions": tool_versions(tool),
    }
    if nncf is not None:
        options["nncf"] = {k: v for k, v in asdict(nncf).items() if k != "speed_reps"}
        if calib in (None, "builtin"):
            options["calibration_photos"] = list(CALIBRATION_PHOTOS)
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
        info: dict[str, Any] = {}
        if tool == "ort":
            info = ort_quantize(
                src, raw / GRAPH_FILE, base_v.input_name, tiles, excludes, method, calib_batch
            )
        elif tool == "nncf":
            assert nncf is not None
            info = _nncf_quantize(src, raw / GRAPH_FILE, manifest, base_v, tiles, excludes, nncf, calib, seed)
        else:
            modelopt_quantize(
                src, raw / GRAPH_FILE, base_v, tiles, precision, method, excludes, calib_batch, calib_ep, t
            )
        try:  # ModelOpt's graph is TensorRT's form and must pass its rules; ORT's and NNCF's are the CPU's
            out = manifest.tile.out_tile
            strict = tool == "modelopt"
            with _one_line_trt_warning():
                finalize_onnx(raw / GRAPH_FILE, tmp / "final", out, None, (t, t, 3), trt_strict=strict)
        except ExportError as e:
            raise QuantizeError(str(e)) from e
        if not strict:
            cpu_only = cpu_only_reason(trt_problems(tmp / "final" / GRAPH_FILE, out), tool)
        return info

    def install(tmp: Path, tool_info: dict[str, Any]) -> str:
        nonlocal manifest
        target = model_dir / ONNX_DIR / precision
        replace_dir(tmp / "final", target)
        n_qdq = count_qdq(target / GRAPH_FILE)
        quant_info: dict[str, Any] = {k: v for k, v in options.items() if k != "versions"}
        quant_info.update(
            {
                "quantize_linear_nodes": n_qdq,
                "tool": TOOL_NAMES[tool],
                "versions": options["versions"],
                **tool_info,
            }
        )
        if precision == "int8" and parity_tiles > 0:
            quant_info["parity"] = int8_parity(
                model_dir, manifest, base_v, target / GRAPH_FILE, parity_photos, parity_tiles, seed, tool
            )
        if nncf is not None and nncf.speed_reps > 0:
            from engine_build.quantize.speed import cpu_speed

            speed_tiles = calibration_tiles(manifest, calib, nncf.speed_reps, seed + 7, disjoint=True)
            quant_info["speed"] = cpu_speed(src, target / GRAPH_FILE, base_v.input_name, speed_tiles)
        if target_note:
            quant_info["target"] = target_note
        data = target / DATA_FILE
        variant = OnnxVariant(
            precision=precision,  # type: ignore[arg-type]
            graph=make_artifact(model_dir, target / GRAPH_FILE),
            external_data=make_artifact(model_dir, data) if data.is_file() else None,
            input_name=base_v.input_name,
            output_name=base_v.output_name,
            opset=graph_opset(target / GRAPH_FILE),
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


@contextmanager
def _one_line_trt_warning() -> Iterator[None]:
    """The export's warning lists every TensorRT rule a CPU graph breaks (1 300 for NNCF's Real-ESRGAN: 400 kB
    of log); this step records and prints the first one with the count (`cpu_only`), so cut it to that."""

    def shorten(record: logging.LogRecord) -> bool:
        if "TensorRT cannot build" in str(record.msg) and len(record.args or ()) == 2:
            path, problems = record.args  # type: ignore[misc]
            first, _, rest = str(problems).partition("; ")
            record.args = (path, first + (" (and more: the manifest's cpu_only counts them)" if rest else ""))
        return True

    logger = logging.getLogger("engine_build.export.onnx_graph")
    logger.addFilter(shorten)
    try:
        yield
    finally:
        logger.removeFilter(shorten)


def _nncf_quantize(
    src: Path,
    dst: Path,
    manifest: Manifest,
    base_v: OnnxVariant,
    tiles: np.ndarray,
    excludes: Sequence[str],
    opts: NncfOptions,
    calib: str | Path | None,
    seed: int,
) -> dict[str, Any]:
    from engine_build.quantize.nncf_ptq import NncfQuantizeError, float_scope, quantize_nncf_int8

    scope = float_scope(src, manifest.kind, excludes, ends=opts.keep_ends, upsampling=opts.keep_upsampling)
    val = None
    if opts.accuracy_target_db is not None:
        n = opts.validation_tiles
        val = calibration_tiles(manifest, calib, n, seed + VALIDATION_SEED_OFFSET, disjoint=True)
    try:
        info = quantize_nncf_int8(
            src,
            dst,
            base_v.input_name,
            tiles,
            scope.names(),
            preset=opts.preset,
            accuracy_target_db=opts.accuracy_target_db,
            validation_tiles=val,
            max_iterations=opts.max_iterations,
            weight_bits=opts.weight_bits,
            equalize_alpha=opts.equalize,
        )
    except NncfQuantizeError as e:
        raise QuantizeError(str(e)) from e
    return {**info, "float_scope": scope.summary()}


__all__ = [
    "DEFAULT_EXCLUDES",
    "QUANT_PRECISIONS",
    "NncfOptions",
    "QuantizeError",
    "QuantizeResult",
    "QuantizeToolMissing",
    "calibration_tiles",
    "check_fp8_target",
    "quantize_model",
]

if os.environ.get("GENDR_MODELOPT_QUIET", "1") == "1":
    logging.getLogger("modelopt").setLevel(logging.WARNING)
