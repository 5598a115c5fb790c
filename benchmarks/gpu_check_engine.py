#!/usr/bin/env python
"""GPU check of the TensorRT path on the tiny model, through the production backend.

Exports the tiny GenDR (fp32, fp16 with fp32 attention islands, fp16 with fp16 attention, int8 Q/DQ,
fp8 where the GPU has it), checks every graph against TensorRT's rules (engine_build.trt.rules), then —
where TensorRT and a GPU exist — builds each engine (one plan per tile the graphs cover), checks
idempotency and the timing cache, records which layers run in which precision (engine inspector), and
measures parity (against ONNX Runtime on the same graph and the PyTorch fp32 reference) and latency
per batch size, with and without CUDA graphs, all through `service.backends.tensorrt.TensorRTBackend`
(engine_build.verify.runners.tensorrt_runner).
The JSON is rewritten after every row.

    python benchmarks/gpu_check_engine.py                 # GPU + TensorRT
    python benchmarks/gpu_check_engine.py --dry-run       # CPU: export, graph rules, ORT parity only
    python benchmarks/gpu_check_engine.py --dry-run --without modelopt   # as on the GPU machine

Every row says `status`: ok, failed, or skipped (a step whose tool is not installed here: ModelOpt for
the int8/fp8 graphs, with the reason; `--without TOOL` or GPU_CHECK_WITHOUT=modelopt,skimage hides a
tool, so the dry run takes the GPU machine's path too). Engines that cannot be built (no GPU, no
TensorRT) are a failed row, never ok: the JSON's `backends` says which backends ran on the GPU.

Exit code 1 if a step failed, a graph breaks TensorRT's rules, no engine could be built or one failed,
fp16 parity vs PyTorch fp32 drops below --min-fp16-db, or a shape bucket (`--bucket`, default tile/2)
is not served or its fp16 plan drifts from ONNX Runtime on the same bucket graph by more than that.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gpu_report import Report


def _latency(run: Any, tiles: Any, batch: int, repeats: int) -> dict[str, float]:
    import numpy as np

    x = np.ascontiguousarray(np.resize(tiles, (batch, *tiles.shape[1:])))
    run(x)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    return {"batch": batch, "ms_per_batch": round(med * 1e3, 3), "ms_per_tile": round(med * 1e3 / batch, 3)}


#: Tools `--without` can hide (import name): what the GPU machine lacks.
HIDEABLE = ("modelopt", "skimage")


def hide_tools(names: list[str]) -> None:
    """Make `import NAME` fail in this process, as on a machine without the tool."""
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's "not importable"


def photos() -> list[tuple[str, Any]]:
    """scikit-image's bundled photos, or (on the GPU machine, which lacks it) a textured stand-in."""
    import numpy as np

    from engine_build.verify.parity import VerifyError, builtin_photos

    try:
        return builtin_photos()
    except VerifyError:
        rng = np.random.default_rng(0)
        g = np.linspace(0, 255, 320, dtype=np.float32)
        img = (g[None, :, None] * 0.5 + g[:, None, None] * 0.5 + rng.normal(0, 20, (320, 320, 3))).clip(
            0, 255
        )
        return [("synthetic", img.astype(np.uint8))]


def save_photos(folder: Path) -> Path:
    """photos() as PNG files: calibration and int8 parity read them, so no step needs scikit-image."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, img in photos():
        Image.fromarray(img).save(folder / f"{name}.png")
    return folder


def export_variants(
    rep: Report, work: Path, tile: int, overlap: int, fp8: bool, bucket: int = 0
) -> dict[str, tuple[Path, str]]:
    """label → (repository, precision): the graphs the engines are built from. A quantized graph whose
    tool is missing here (ModelOpt on the GPU machine) is a skipped row with the reason; one that fails
    is a failed row; either way the check goes on. `bucket`: a smaller static tile exported beside the
    primary one in the main repository (0: none)."""
    from engine_build.export.exporter import Fp16Options, export_gendr
    from engine_build.gendr.checkpoint import make_tiny
    from engine_build.quantize.quantizer import QuantizeToolMissing, quantize_model

    ckpt = make_tiny(work / "ckpt", seed=0)
    repo = work / "models" / "tiny"
    export_gendr(ckpt, repo, tile=tile, overlap=overlap, buckets=(bucket,) if bucket else ())
    attn16 = work / "models" / "tiny-attn16"
    export_gendr(ckpt, attn16, tile=tile, overlap=overlap, fp16=Fp16Options(attention="fp16"))
    out = {"fp32": (repo, "fp32"), "fp16": (repo, "fp16"), "fp16-attn16": (attn16, "fp16")}
    calib = str(save_photos(work / "photos"))
    for q in ("int8", "fp8") if fp8 else ("int8",):
        row: dict[str, Any] = {"quantize": q}
        try:
            quantize_model(repo, q, calib=calib, n_tiles=8, method="max", parity_photos=calib)
            out[q] = (repo, q)
            row["status"] = "ok"
        except QuantizeToolMissing as e:  # not this check's fault: say which tool, and go on
            row.update(status="skipped", why=str(e))
        except Exception as e:  # a quantization that ran and failed: recorded, the others go on
            row.update(
                status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:]
            )
        rep.add(row)
    return out


def check_rules(rep: Report, variants: dict[str, tuple[Path, str]], tile: int) -> bool:
    from engine_build.trt.rules import check_graph
    from service.manifest import read_manifest

    ok = True
    for label, (repo, p) in variants.items():
        import onnx

        m = read_manifest(repo, verify=False)
        g = onnx.load(str(repo / m.onnx[p].graph.path), load_external_data=False)
        problems = check_graph(g, tile=tile, out_tile=m.tile.out_tile)
        casts = sum(n.op_type == "Cast" for n in g.graph.node)
        status = "failed" if problems else "ok"
        rep.add({"graph": label, "status": status, "trt_rules_problems": problems, "cast_nodes": casts})
        ok = ok and not problems
    return ok


def build_and_measure(
    rep: Report, variants: dict[str, tuple[Path, str]], tiles: Any, ref: Any, args: argparse.Namespace
) -> bool:
    from engine_build.trt.build import build_engine
    from engine_build.verify.parity import compare
    from engine_build.verify.runners import onnx_runner, tensorrt_runner

    ok, built = True, 0
    for label, (repo, p) in variants.items():
        if p == "fp32":
            continue
        row: dict[str, Any] = {"engine": label, "status": "ok"}
        try:
            r1 = build_engine(repo, p, batch_sizes=args.batch_sizes, progress=False)
            row["build_s"] = round(r1.seconds, 1)
            row["plan_mb"] = round(r1.engine.plan.size / 1e6, 2)
            row["tiles"] = {t.tile: round(t.engine.plan.size / 1e6, 2) for t in r1.tiles}  # plan MB per tile
            row["layer_precisions"] = r1.engine.build.get("layer_precisions")
            row["second_build_skipped"] = build_engine(
                repo, p, batch_sizes=args.batch_sizes, progress=False
            ).skipped
            r3 = build_engine(repo, p, batch_sizes=args.batch_sizes, progress=False, force=True)
            row["rebuild_with_timing_cache_s"] = round(r3.seconds, 1)
            row["timing_cache_reused"] = r3.engine.build.get("timing_cache_reused")
            for graphs in (False, True):
                fn = tensorrt_runner(repo, p, max_batch=max(args.batch_sizes), cuda_graphs=graphs)
                got = fn(tiles)
                key = "cuda_graphs" if graphs else "plain"
                if graphs:
                    row["graph_sizes"] = list(fn.backend.graph_sizes())  # type: ignore[attr-defined]
                else:
                    ok = _check_buckets(row, fn, repo, p, tiles, args.min_fp16_db) and ok
                row[f"latency_{key}"] = [_latency(fn, tiles, b, args.repeats) for b in args.batch_sizes]
                fn.close()
            row["vs_onnxruntime_same_graph"] = compare(got, onnx_runner(repo, p)(tiles))
            row["vs_torch_fp32"] = compare(got, ref)
            built += 1
            if p == "fp16" and row["vs_torch_fp32"]["psnr_db"] < args.min_fp16_db:
                row["status"], ok = "failed", False
        except Exception as e:  # record and go on with the other engines
            row["status"] = "failed"
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()[-3000:]
            ok = False
        rep.add(row)
    why = f"{built} engine(s) built and run" if built else "no engine could be built and run (rows above)"
    rep.backend("tensorrt", built > 0, why)
    return ok and built > 0


def _check_buckets(row: dict[str, Any], fn: Any, repo: Path, p: str, tiles: Any, min_db: float) -> bool:
    """Every shape bucket of the graphs has a plan that loaded, and each matches ONNX Runtime on its own
    graph (tiles cropped to the bucket); False when a bucket is not served or an fp16 one drifts."""
    import numpy as np
    import onnxruntime as ort

    from engine_build.verify.parity import compare
    from service.manifest import read_manifest

    m = read_manifest(repo, verify=False)
    served = list(fn.backend.info.tiles)
    row["tiles_served"] = served
    ok = True
    for t in m.tiles(p):
        sg = m.shape_graph(p, t)
        if sg is None:
            continue  # the primary tile: measured above
        if t not in served:
            row.setdefault("buckets_not_served", []).append(t)
            ok = False
            continue
        x = np.ascontiguousarray(tiles[:, :t, :t])
        sess = ort.InferenceSession(str(repo / sg.graph.path), providers=["CPUExecutionProvider"])
        ref = sess.run(None, {m.onnx[p].input_name: x})[0]
        c = row.setdefault("bucket_vs_onnxruntime_same_graph", {})[str(t)] = compare(fn(x), ref)
        ok = ok and (p != "fp16" or c["psnr_db"] >= min_db)
    return ok


def engines_unavailable(gpu: Any, trt: str | None, dry_run: bool) -> dict[str, Any] | None:
    """The engines row when no engine can be built here: skipped in a dry run (the CPU's part is the
    point there), a failure otherwise; None when a GPU and TensorRT are present."""
    if gpu is not None and trt is not None:
        return None
    if dry_run:
        return {"engine": "all", "status": "skipped", "why": "dry run: the CPU part only"}
    why = "no GPU here" if gpu is None else "no TensorRT here (install the trt extra or carry its wheels)"
    return {"engine": "all", "status": "failed", "error": f"no engine built or run: {why}"}


def ort_backends(rep: Report) -> None:
    """ONNX Runtime's GPU providers: no row runs them (parity runs on the CPU provider); say so."""
    import onnxruntime

    have = onnxruntime.get_available_providers()
    for name, ep in (
        ("onnxruntime-cuda", "CUDAExecutionProvider"),
        ("onnxruntime-trt", "TensorrtExecutionProvider"),
    ):
        where = "compiled into this onnxruntime" if ep in have else "not in this onnxruntime (CPU wheel)"
        rep.backend(name, False, f"no row runs {ep} ({where}); parity uses the CPU provider")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: export, graph rules and ORT parity only")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temp dir)")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--bucket", type=int, default=-1, help="shape-bucket tile (default tile/2; 0: none)")
    ap.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--min-fp16-db", type=float, default=40.0)
    ap.add_argument("--max-seconds", type=float, default=100.0)
    ap.add_argument(
        "--without",
        action="append",
        choices=HIDEABLE,
        default=[t for t in os.environ.get("GPU_CHECK_WITHOUT", "").split(",") if t],
        help="run as if TOOL were not installed (repeatable; env GPU_CHECK_WITHOUT=modelopt,skimage)",
    )
    args = ap.parse_args(argv)
    if unknown := set(args.without) - set(HIDEABLE):
        ap.error(f"--without: unknown tool(s) {sorted(unknown)}; choose from {HIDEABLE}")
    hide_tools(args.without)
    if args.dry_run:
        args.tile, args.batch_sizes, args.repeats = 64, [1, 2], 2
    if args.bucket < 0:
        args.bucket = args.tile // 2
    from engine_build.gpu_targets import PRECISION_MIN_CC
    from engine_build.trt.build import detect_gpu, parse_cc
    from service.hardware import tensorrt_version

    gpu = None if args.dry_run else detect_gpu()
    trt = None if args.dry_run else tensorrt_version()
    tag = ("_dry_run" if args.dry_run else "") + "".join(f"_without_{t}" for t in sorted(set(args.without)))
    rep = Report(
        args.out / f"gpu_check_engine{tag}.json",
        args.max_seconds,
        tile=args.tile,
        batch_sizes=args.batch_sizes,
        gpu={"name": gpu.name, "cc": gpu.compute_capability} if gpu else None,
        tensorrt=trt,
        without=sorted(set(args.without)),
    )
    fp8 = gpu is not None and parse_cc(gpu.compute_capability) >= PRECISION_MIN_CC["fp8"]
    work = args.work or Path(tempfile.mkdtemp(prefix="gendr-gpu-"))
    ok = run_steps(rep, args, work, gpu, trt, fp8)
    rep.set(ok=ok)
    print(f"wrote {rep.path}; ok={ok}")
    return 0 if ok else 1


def run_steps(
    rep: Report, args: argparse.Namespace, work: Path, gpu: Any, trt: str | None, fp8: bool
) -> bool:
    """Export → TensorRT's rules → ONNX Runtime parity → engines; each step's failure is its own row."""
    from engine_build.gendr.checkpoint import load_checkpoint
    from engine_build.verify.parity import compare, graph_input_tiles
    from engine_build.verify.runners import onnx_runner, torch_runner

    ort_backends(rep)
    t0 = time.perf_counter()
    try:
        variants = export_variants(rep, work, args.tile, args.overlap, fp8, args.bucket)
    except Exception as e:  # nothing to check without graphs: the row says why
        rep.add({"export": "tiny", "status": "failed", "error": f"{type(e).__name__}: {e}"})
        rep.backend("tensorrt", False, "the export failed")
        return False
    rep.set(export_s=round(time.perf_counter() - t0, 1))
    ok = check_rules(rep, variants, args.tile)
    ok = not any(r.get("status") == "failed" for r in rep.data["results"]) and ok
    repo = variants["fp32"][0]
    try:
        tiles = graph_input_tiles(photos(), args.tile, 1, 4, n=8, seed=0)
        ref = torch_runner(load_checkpoint(repo / "checkpoint"))(tiles)
    except Exception as e:  # parity and engines are measured against it: the row says why they did not run
        rep.add({"reference": "torch fp32", "status": "failed", "error": f"{type(e).__name__}: {e}"})
        rep.backend("tensorrt", False, "no PyTorch reference to measure engines against")
        return False
    for label, (r, p) in variants.items():
        try:
            rep.add(
                {
                    "graph": label,
                    "status": "ok",
                    "ort_cpu_vs_torch_fp32": compare(onnx_runner(r, p)(tiles), ref),
                }
            )
        except Exception as e:  # one graph's failure is its own row
            rep.add({"graph": label, "status": "failed", "error": f"{type(e).__name__}: {e}"})
            ok = False
    if (row := engines_unavailable(gpu, trt, args.dry_run)) is not None:
        rep.add(row)
        rep.backend("tensorrt", False, row.get("why") or row["error"])
        return ok and row["status"] != "failed"
    return build_and_measure(rep, variants, tiles, ref, args) and ok


if __name__ == "__main__":
    sys.exit(main())
