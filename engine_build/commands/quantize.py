"""`gendr-build quantize`: int8 / fp8 Q/DQ ONNX (ONNX Runtime's quantizer, OpenVINO's NNCF or NVIDIA
ModelOpt), calibrated on real photo tiles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine_build.gpu_targets import TARGET_GPUS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="post-training int8/fp8 quantization (Q/DQ ONNX: NNCF, ONNX Runtime, ModelOpt)",
        description="Calibrates on graph-input tiles cut from a folder of real photos and writes "
        "onnx/int8 or onnx/fp8 with explicit Q/DQ nodes (what strongly typed TensorRT consumes). "
        "Skipped when up to date.",
    )
    p.add_argument("--model", required=True, type=Path, help="model folder, e.g. models/gendr")
    p.add_argument("--precision", required=True, choices=["int8", "fp8"])
    p.add_argument(
        "--calib",
        required=True,
        help="folder of real photos for calibration ('builtin' = scikit-image's bundled photos)",
    )
    p.add_argument("--tiles", type=int, default=32, help="calibration tiles (default 32)")
    p.add_argument("--calib-batch", type=int, default=1, help="tiles per calibration run (default 1)")
    p.add_argument(
        "--base",
        choices=["auto", "fp16", "fp32"],
        default="auto",
        help="graph to quantize (auto: fp16 when exported, keeping its fp32 islands; else fp32)",
    )
    p.add_argument(
        "--method",
        choices=["auto", "entropy", "max", "minmax", "percentile"],
        default="auto",
        help="activation calibration (auto: minmax with --tool ort; entropy for ModelOpt int8, max for fp8)",
    )
    p.add_argument(
        "--tool",
        choices=["auto", "ort", "nncf", "modelopt"],
        default="auto",
        help="quantizer: nncf = OpenVINO's NNCF (the CPU int8 graph OpenVINO serves: first/last convs and "
        "the upsampling path kept float, channel equalization, 8-bit weights, bias correction; calibrated "
        "on scikit-image photos outside the parity set), ort = ONNX Runtime's quantize_static, "
        "modelopt = NVIDIA ModelOpt (TensorRT's form; fp8); auto = ort for int8 from the fp32 graph, "
        "else modelopt",
    )
    n = p.add_argument_group("--tool nncf")
    n.add_argument(
        "--preset",
        choices=["mixed", "performance"],
        default="mixed",
        help="activations asymmetric (mixed, default) or symmetric (performance)",
    )
    n.add_argument(
        "--accuracy-target",
        type=float,
        default=None,
        metavar="DB",
        help="accuracy-aware mode: NNCF puts layers back into float until PSNR vs fp32 on "
        "validation tiles (calibration photos, not the parity set) reaches DB (e.g. 41)",
    )
    n.add_argument(
        "--validation-tiles", type=int, default=8, help="tiles the accuracy-aware mode validates on"
    )
    n.add_argument(
        "--max-reverted",
        type=int,
        default=20,
        help="accuracy-aware mode: at most this many layers put back into float (default 20)",
    )
    n.add_argument(
        "--weight-bits",
        type=int,
        choices=[7, 8],
        default=8,
        help="weight range: 8 (default) or 7 (NNCF's overflow fix: sums exact on CPUs without VNNI too; "
        "for a model whose AVX2 parity falls below its exact one)",
    )
    n.add_argument(
        "--equalize",
        type=float,
        default=0.5,
        metavar="ALPHA",
        help="channel equalization before quantizing (exact in float; evens activation channels so "
        "per-tensor int8 wastes fewer levels): migration strength in (0, 1], 0 = off (default 0.5)",
    )
    n.add_argument(
        "--quantize-upsampling",
        action="store_true",
        help="quantize the upsampling path too (default: float from the first upsampling op on)",
    )
    n.add_argument(
        "--quantize-ends",
        action="store_true",
        help="quantize the first and last convolution too (default: float)",
    )
    n.add_argument(
        "--speed-reps",
        type=int,
        default=3,
        help="rounds of the speed figure recorded for this CPU family, which `auto` reads "
        "(0: none; `auto` then relies on docs/benchmarks.md's figures)",
    )
    p.add_argument(
        "--parity-tiles",
        type=int,
        default=8,
        help="held-out real-photo tiles for the int8-vs-fp32 parity figure that `auto` on "
        "onnxruntime-cpu checks (≥ 40 dB); 0 skips it (default 8)",
    )
    p.add_argument(
        "--parity-photos",
        default="builtin",
        help="folder of real photos for the parity figure (default 'builtin': scikit-image's photos)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="REGEX",
        help="also keep ONNX nodes matching REGEX un-quantized (repeatable)",
    )
    p.add_argument(
        "--no-default-excludes",
        action="store_true",
        help="do not exclude the default set (conv_in, conv_out, time embedding, norm_out, proj_out)",
    )
    p.add_argument(
        "--target-gpu",
        choices=["auto", *TARGET_GPUS],
        default="auto",
        help="node pool the graph is for; fp8 is refused for A10 (compute capability 8.6 < 8.9)",
    )
    p.add_argument(
        "--calib-ep",
        default="cpu",
        help="ONNX Runtime provider for calibration: cpu (default), cuda:0, trt (needs onnxruntime-gpu)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration crops")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from engine_build.quantize.quantizer import DEFAULT_EXCLUDES, NncfOptions, QuantizeError, quantize_model
    from engine_build.verify.parity import VerifyError
    from service.manifest import ManifestError

    excludes = ([] if args.no_default_excludes else list(DEFAULT_EXCLUDES)) + list(args.exclude)
    try:
        res = quantize_model(
            args.model,
            args.precision,
            calib=args.calib,
            n_tiles=args.tiles,
            base=args.base,
            excludes=excludes,
            method=args.method,
            target_gpu=args.target_gpu,
            seed=args.seed,
            force=args.force,
            calib_batch=args.calib_batch,
            calib_ep=args.calib_ep,
            tool=args.tool,
            parity_tiles=args.parity_tiles,
            parity_photos=args.parity_photos,
            nncf=NncfOptions(
                preset=args.preset,
                keep_ends=not args.quantize_ends,
                keep_upsampling=not args.quantize_upsampling,
                accuracy_target_db=args.accuracy_target,
                validation_tiles=args.validation_tiles,
                max_iterations=args.max_reverted,
                speed_reps=args.speed_reps,
                weight_bits=args.weight_bits,
                equalize=args.equalize,
            ),
        )
    except (QuantizeError, ManifestError, VerifyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    v = res.manifest.onnx[res.precision]
    state = "up to date (skipped)" if res.skipped else f"written in {res.seconds:.1f} s"
    print(
        f"{res.precision}: {v.graph.path} {state}; {v.quantization.get('quantize_linear_nodes')} Q/DQ pairs, "
        f"calibrated on {res.n_tiles} tiles from the {v.quantization.get('base')} graph "
        f"({v.quantization.get('tool')})"
    )
    if v.cpu_only:
        who = "the CPU (OpenVINO, ONNX Runtime)" if v.quantization.get("tool") == "nncf" else "ONNX Runtime"
        print(f"{res.precision}: for {who} only, `gendr-build engine` refuses it ({v.cpu_only})")
    parity = v.quantization.get("parity")
    if isinstance(parity, dict):
        verdict = "passes" if parity.get("passes") else "FAILS"
        runtimes = parity.get("by_runtime")
        each = (
            " (" + ", ".join(f"{k} {r.get('psnr_db')} dB" for k, r in runtimes.items()) + ")"
            if isinstance(runtimes, dict)
            else ""
        )
        print(
            f"parity vs {parity.get('reference')}: {parity.get('psnr_db')} dB PSNR{each} on "
            f"{parity.get('n_tiles')} "
            f"held-out photo tiles (worst tile {parity.get('worst_tile_psnr_db')} dB) — {verdict} the "
            f"{parity.get('bound_db')} dB bound"
            + (
                ""
                if isinstance(runtimes, dict)  # NNCF's: the CPU rule below decides
                else f"; `auto` on onnxruntime-cpu {'serves' if parity.get('passes') else 'skips'} int8"
            )
        )
    if v.quantization.get("tool") == "nncf":
        _print_cpu_verdict(res.manifest, v.quantization.get("speed"))
    return 0


def _print_cpu_verdict(manifest: object, speed: object) -> None:
    """The speed figure just measured, and what `auto` serves on this CPU with it (select.cpu_choice)."""
    from service.backends.select import cpu_choice
    from service.settings import Settings

    if isinstance(speed, dict):
        figs = ", ".join(f"{k} {s:.2f}" for k, s in speed.get("s_per_tile", {}).items())
        print(f"speed on {speed.get('cpu')} ({speed.get('family')}), s per tile: {figs}")
    c = cpu_choice(manifest, Settings())  # type: ignore[arg-type]
    served = f"OpenVINO {c.openvino}" if c.openvino else f"ONNX Runtime {c.ort_precision}"
    print(f"`auto` on this CPU ({c.family}): {served}" + (f" — {c.reason}" if c.reason else ""))
