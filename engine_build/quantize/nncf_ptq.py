"""int8 for the CPU with OpenVINO's NNCF post-training quantization (`gendr-build quantize --tool nncf`).

Why NNCF after ONNX Runtime's quantizer and ModelOpt (both 30–36 dB on Real-ESRGAN, under the 40 dB bound,
docs/benchmarks.md): its placement is made for the runtime that serves the graph (OpenVINO's CPU plugin
turns its Q/DQ pairs into int8 convolutions), and it does what static MinMax did not:

- **float scope** (`float_scope`): the first and the last convolution, and on a super-resolution network
  every node from the first upsampling op on (the ×4 path: its convolutions run at 4–16× the pixels and
  write what the user sees), stay float — the issue's "quantize the residual trunk only";
- per-channel symmetric int8 weights, per-tensor asymmetric activations (preset `mixed`: LeakyReLU
  outputs are skewed) written as uint8 (`unsigned_activations`: OpenVINO 2026.4 computes convolutions
  over a Concat of signed int8 inputs wrongly), ranges from the mean of per-tile minima/maxima, and
  bias correction;
- **8-bit weights** by default (`weight_bits`): measured on Real-ESRGAN they are worth 1.3 dB over NNCF's
  7-bit "overflow fix" form (36.7 against 35.4 dB in exact arithmetic), and the AVX2 runtimes here lose
  nothing to `vpmaddubsw`'s saturation on that graph (OpenVINO 36.9, ONNX Runtime 36.6 dB). Other graphs
  do (the test network quantized end to end: 46.5 dB exact, 35.3 in OpenVINO on AVX2), hence the `exact`
  parity row and select.int8_sums_hold; `weight_bits=7` keeps every u8×s8 pair sum inside int16;
- **channel equalization** first (`equalize_alpha`, engine_build/quantize/equalize.py): exact in float,
  it evens the channels of each activation tensor so per-tensor int8 wastes fewer levels (+0.5 dB);
- an **accuracy-aware mode** (`nncf.quantize_with_accuracy_control`, supported for ONNX models at NNCF
  3.x): PSNR against fp32 on validation tiles is the metric, and NNCF puts the layers that cost the most
  back into float until the target holds (validation tiles come from the calibration photos, never from
  the parity set).

The graph is standard ONNX (QuantizeLinear/DequantizeLinear) with non-zero activation zero points, so
TensorRT cannot build it: it is recorded `cpu_only`. The quantization runs in a fresh interpreter (NNCF
imports torch and OpenVINO, and keeps every activation statistic in memory until it returns).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

NNCF_PRESETS = ("mixed", "performance")
WEIGHT_BITS = (7, 8)
#: Ops that make a super-resolution network's output larger than its input: where the float tail starts.
UPSAMPLE_OPS = ("Resize", "Upsample", "DepthToSpace", "ConvTranspose")
#: PSNR a validation run reports at most (fp32 against itself is infinite); the accuracy-aware mode's
#: allowed drop is this cap minus its target, so "drop ≤ max_drop" reads "PSNR ≥ target".
PSNR_CAP_DB = 60.0
TileFn = Callable[[np.ndarray], np.ndarray]


class NncfQuantizeError(RuntimeError):
    pass


@dataclass(frozen=True)
class FloatScope:
    """ONNX node names NNCF leaves float, by why."""

    first_last: tuple[str, ...]
    upsampling: tuple[str, ...]
    excluded: tuple[str, ...]

    def names(self) -> list[str]:
        return list(dict.fromkeys([*self.first_last, *self.upsampling, *self.excluded]))

    def summary(self) -> dict[str, Any]:
        """For the manifest: the end convolutions by name, the upsampling path by size and first node."""
        return {
            "first_last": list(self.first_last),
            "upsampling_nodes": len(self.upsampling),
            "upsampling_from": self.upsampling[0] if self.upsampling else None,
            "excluded_nodes": len(self.excluded),  # by the --exclude regexes, which the key records
        }


def float_scope(
    graph: Path, kind: str, excludes: Sequence[str] = (), ends: bool = True, upsampling: bool = True
) -> FloatScope:
    """What stays float: the first and last Conv (graph order), for `single` networks every node from the
    first upsampling op to the output, and nodes matching the `excludes` regexes (GenDR's conv_in, …)."""
    import onnx

    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    convs = [n.name for n in nodes if n.op_type in ("Conv", "ConvTranspose")]
    first_last = tuple(dict.fromkeys([convs[0], convs[-1]])) if ends and convs else ()
    tail: tuple[str, ...] = ()
    if upsampling and kind == "single":
        start = next((i for i, n in enumerate(nodes) if n.op_type in UPSAMPLE_OPS), None)
        if start is not None:
            tail = tuple(n.name for n in nodes[start:] if n.name)
    rx = [re.compile(p) for p in excludes]
    excluded = tuple(n.name for n in nodes if any(r.fullmatch(n.name) for r in rx))
    return FloatScope(first_last, tail, excluded)


def quantize_nncf_int8(
    src: Path,
    dst: Path,
    input_name: str,
    tiles: np.ndarray,
    ignored: Sequence[str],
    *,
    preset: str = "mixed",
    accuracy_target_db: float | None = None,
    validation_tiles: np.ndarray | None = None,
    max_iterations: int = 20,
    weight_bits: int = 8,
    equalize_alpha: float = 0.5,
) -> dict[str, Any]:
    """Write NNCF's int8 Q/DQ graph of `src` to `dst` (in a fresh process); returns how, for the manifest.

    weight_bits: 8, or 7 (NNCF's overflow fix). equalize_alpha: channel equalization's migration strength
    before quantizing (0: none).

    accuracy_target_db: run NNCF's accuracy-aware mode until PSNR vs fp32 on `validation_tiles` (in
    ONNX Runtime, NNCF's engine for ONNX models) reaches it, reverting at most `max_iterations` layers.
    """
    if preset not in NNCF_PRESETS:
        raise NncfQuantizeError(f"NNCF preset must be one of {NNCF_PRESETS}, got {preset!r}")
    if accuracy_target_db is not None and (validation_tiles is None or not len(validation_tiles)):
        raise NncfQuantizeError("the accuracy-aware mode needs validation tiles")
    if weight_bits not in WEIGHT_BITS:
        raise NncfQuantizeError(f"weight bits must be one of {WEIGHT_BITS}, got {weight_bits}")
    if not 0 <= equalize_alpha <= 1:
        raise NncfQuantizeError(f"the equalization strength must be in [0, 1], got {equalize_alpha}")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        job = pool.submit(
            _quantize_here,
            src,
            dst,
            input_name,
            tiles,
            list(ignored),
            preset,
            accuracy_target_db,
            validation_tiles,
            max_iterations,
            weight_bits,
            equalize_alpha,
        )
        return job.result()


def _quantize_here(
    src: Path,
    dst: Path,
    input_name: str,
    tiles: np.ndarray,
    ignored: list[str],
    preset: str,
    target_db: float | None,
    validation_tiles: np.ndarray | None,
    max_iterations: int,
    weight_bits: int = 8,
    equalize_alpha: float = 0.5,
) -> dict[str, Any]:
    """The quantization itself (run in a fresh process by quantize_nncf_int8)."""
    os.environ.setdefault("NNCF_CI", "1")  # NNCF's switch that stubs its telemetry (no network here)
    try:
        import nncf
        import onnx
        from nncf.quantization.advanced_parameters import (
            AdvancedAccuracyRestorerParameters,
            AdvancedQuantizationParameters,
            OverflowFix,
        )
    except ImportError as e:
        raise NncfQuantizeError(f"nncf is not importable: {e}") from e
    logging.getLogger("nncf").setLevel(logging.WARNING)
    model = onnx.load(str(src))
    equalized = None
    if equalize_alpha > 0:
        from engine_build.quantize.equalize import equalize

        equalized = equalize(model, tiles, input_name, equalize_alpha)
    calib = nncf.Dataset([{input_name: tiles[i : i + 1]} for i in range(len(tiles))])
    common: dict[str, Any] = {
        "preset": nncf.QuantizationPreset(preset),
        "target_device": nncf.TargetDevice.CPU,
        "subset_size": len(tiles),
        "fast_bias_correction": True,
        # names come from the graph itself; NNCF's graph drops some (Cast), which must not fail the run
        "ignored_scope": nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
    }
    fix = OverflowFix.ENABLE if weight_bits == 7 else OverflowFix.DISABLE
    advanced = AdvancedQuantizationParameters(overflow_fix=fix)
    info: dict[str, Any] = {
        "preset": preset,
        "weights": "int8 per-channel, symmetric, "
        + ("7-bit range (overflow fix: exact without VNNI)" if weight_bits == 7 else "8-bit range"),
        "weight_bits": weight_bits,
        "equalization": equalized or {"groups": 0, "alpha": 0},
        "activations": "8-bit per-tensor, "
        + ("asymmetric" if preset == "mixed" else "symmetric")
        + ", uint8",
        "bias_correction": "fast",
        "float_nodes": len(ignored),
    }
    try:
        if target_db is None:
            q = nncf.quantize(model, calib, advanced_parameters=advanced, **common)
            info["mode"] = "ptq"
        else:
            assert validation_tiles is not None
            ref = _ort_outputs(model.SerializeToString(), input_name, validation_tiles)
            # each item carries its fp32 output: NNCF validates subsets of the items when it ranks layers
            val = nncf.Dataset(
                list(zip(validation_tiles, ref, strict=True)), lambda it: {input_name: it[0][None]}
            )
            q = nncf.quantize_with_accuracy_control(
                model,
                calib,
                val,
                _psnr_validation(input_name),
                max_drop=PSNR_CAP_DB - target_db,
                advanced_quantization_parameters=advanced,
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=max_iterations, ranking_subset_size=min(len(validation_tiles), 4)
                ),
                **common,
            )
            info |= {
                "mode": "accuracy-control",
                "target_psnr_db": target_db,
                "validation_tiles": len(validation_tiles),
                "max_iterations": max_iterations,
            }
    except Exception as e:  # NNCF raises many types
        raise NncfQuantizeError(f"NNCF quantization failed: {type(e).__name__}: {e}") from e
    info["unsigned_activations"] = unsigned_activations(q)  # OpenVINO's correct int8 path (see there)
    onnx.save(q, str(dst))
    info["quantized_nodes"] = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")
    return info


def _ort_outputs(model: bytes, input_name: str, tiles: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return [s.run(None, {input_name: t[None]})[0] for t in tiles]


def _psnr_validation(input_name: str) -> Callable[[Any, Any], tuple[float, list[float]]]:
    """NNCF's validation function over (tile, fp32 output) items: pooled PSNR (capped) and each tile's."""

    def validate(model: Any, items: Any) -> tuple[float, list[float]]:
        pairs = list(items)
        outs = _ort_outputs(model.SerializeToString(), input_name, np.stack([t for t, _ in pairs]))
        refs = [r for _, r in pairs]
        per = [min(PSNR_CAP_DB, _psnr(o, r)) for o, r in zip(outs, refs, strict=True)]
        return min(PSNR_CAP_DB, _psnr(np.stack(outs), np.stack(refs))), per

    return validate


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


# ---------------------------------------------------------------------------------------------
# Running a graph in the runtimes that may serve it: parity and speed
# ---------------------------------------------------------------------------------------------


def ov_runner(graph: Path, hint: str = "f32", threads: int = 0) -> TileFn:
    """A tile function over OpenVINO's CPU plugin, as the openvino-cpu backend compiles the graph."""
    import openvino as ov

    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = threads
    req = ov.Core().compile_model(str(graph), "CPU", cfg).create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        req.infer({0: np.ascontiguousarray(x)})
        return np.array(req.get_output_tensor(0).data, copy=True)

    return run


def ort_runner(graph: Path, input_name: str, threads: int = 0) -> TileFn:
    from engine_build.quantize.ort import _cpu_session

    s = _cpu_session(graph, threads)
    return lambda x: s.run(None, {input_name: x})[0]


def exact_runner(graph: Path, input_name: str, threads: int = 0) -> TileFn:
    """The int8 graph as VNNI and AMX compute it: ONNX Runtime with no graph fusion runs each Q/DQ pair
    and each convolution in float, so a convolution sums the same integer products exactly (in float: no
    saturating u8×s8 pairs, no kernel-specific rounding). What a CPU without VNNI computes is measured in
    the runtimes themselves (ov_runner, ort_runner)."""
    from engine_build.quantize.ort import _cpu_session

    s = _cpu_session(graph, threads, fuse=False)
    return lambda x: s.run(None, {input_name: x})[0]


def parity(ref: TileFn, cand: TileFn, tiles: np.ndarray) -> dict[str, Any]:
    """PSNR of `cand` against `ref` on tiles, one at a time (batch 1, as the CPU serves), pooled over all
    tiles, with the worst tile and the largest error (keys as engine_build/quantize/ort.py's figure)."""
    a = np.concatenate([ref(t[None]) for t in tiles])
    b = np.concatenate([cand(t[None]) for t in tiles])
    worst = min(_psnr(x, y) for x, y in zip(a, b, strict=True))
    return {
        "psnr_db": round(min(_psnr(a, b), 99.0), 2),
        "worst_tile_psnr_db": round(min(worst, 99.0), 2),
        "max_abs_err": int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()),
        "n_tiles": len(tiles),
    }


def runtime_parity(reference: Path, graph: Path, input_name: str, tiles: np.ndarray) -> dict[str, Any]:
    """The int8 graph against ONNX Runtime fp32 (the reference every variant is held to), run in OpenVINO
    (the backend that serves it), in ONNX Runtime (the fallback), both with this CPU's kernels, and in exact
    integer arithmetic (`exact`: what VNNI and AMX compute); the figure is the worst of the three, so it
    holds on every CPU family."""
    ref = ort_runner(reference, input_name)
    by_runtime = {
        "openvino": parity(ref, ov_runner(graph), tiles),
        "onnxruntime": parity(ref, ort_runner(graph, input_name), tiles),
        "exact": parity(ref, exact_runner(graph, input_name), tiles),
    }
    worst = min(by_runtime.values(), key=lambda p: p["psnr_db"])
    return {
        **worst,
        "runtime": min(by_runtime, key=lambda k: by_runtime[k]["psnr_db"]),
        "by_runtime": by_runtime,
    }


def unsigned_activations(model: Any) -> int:
    """Rewrite every activation Q/DQ pair with an int8 zero point as uint8 with zero point + 128, in place;
    returns how many. The grid is the same (q_u8 = q_i8 + 128, both clamp to 256 levels), so ONNX Runtime's
    output does not change by a bit; OpenVINO 2026.4's CPU plugin mis-computes a convolution over a Concat
    of signed int8 Q/DQ inputs (RRDB's dense blocks: 10 dB instead of 35; its unsigned path is right), and
    uint8 activations are the form NNCF writes for OpenVINO's own models."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    quants = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    signed = {
        n.input[2]
        for n in quants
        if (t := inits.get(n.input[2])) is not None and t.data_type == TensorProto.INT8
    }
    for name in signed:
        zp = numpy_helper.to_array(inits[name]).astype(np.int16) + 128
        inits[name].CopyFrom(numpy_helper.from_array(zp.astype(np.uint8), name))
    outs = {n.output[0] for n in quants if n.input[2] in signed} | signed
    for vi in model.graph.value_info:  # the declared types follow: quantized tensors, zero points
        if vi.name in outs:
            vi.type.tensor_type.elem_type = TensorProto.UINT8
    return len(signed)
