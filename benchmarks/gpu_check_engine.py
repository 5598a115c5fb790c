#!/usr/bin/env python
"""GPU check of the TensorRT path on the tiny model: build every precision this GPU supports, check
idempotency and the timing cache, measure parity against ONNX Runtime / PyTorch and latency per batch.

For a machine with an NVIDIA GPU, `tensorrt` and the build extra installed:

    python benchmarks/gpu_check_engine.py                       # JSON → $OUT/gpu_check_engine.json (or ./)
    python benchmarks/gpu_check_engine.py --tile 128 --batch-sizes 1,2,4,8 --out /tmp/gpu.json

Precisions: fp16 and int8 everywhere, fp8 where compute capability ≥ 8.9 (refusal checked on others).
Parity rows compare the engine with (a) ONNX Runtime CPU running the same-precision ONNX graph and
(b) the PyTorch fp32 reference, on tiles cut from real photos (uint8 max abs error, PSNR). Exit code 1
if any engine fails to build or fp16 parity vs PyTorch fp32 drops below --min-fp16-db.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _latency(run, tiles, batch: int, repeats: int) -> dict:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check_engine.json")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temp dir)")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--min-fp16-db", type=float, default=40.0)
    args = ap.parse_args()
    bs = [int(b) for b in args.batch_sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="gendr-gpu-"))
    result: dict = {"tile": args.tile, "batch_sizes": bs, "steps": {}, "engines": {}, "ok": True}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))

    from engine_build.checkpoint import load_checkpoint, make_tiny
    from engine_build.export import export_gendr
    from engine_build.quantize import QuantizeError, check_fp8_target, quantize_model
    from engine_build.trt_build import (
        SUPPORTED,
        TrtTileRunner,
        build_engine,
        detect_gpu,
        parse_cc,
    )
    from engine_build.verify import OrtTileRunner, builtin_photos, compare, graph_input_tiles, torch_runner

    gpu = detect_gpu()
    if gpu is None:
        print("error: no NVIDIA GPU visible", file=sys.stderr)
        return 2
    import tensorrt as trt
    import torch

    result["gpu"] = {
        "name": gpu.name,
        "cc": gpu.compute_capability,
        "memory_gb": round(gpu.memory_total / 2**30, 1),
    }
    result["versions"] = {"tensorrt": trt.__version__, "torch": torch.__version__, "cuda": torch.version.cuda}
    fp8_ok = parse_cc(gpu.compute_capability) >= (8, 9)
    precisions = ["fp16", "int8"] + (["fp8"] if fp8_ok else [])
    pool = next(
        (
            k
            for k, (cc, _) in {"a10": ("8.6", ""), "l20": ("8.9", ""), "h100": ("9.0", "")}.items()
            if cc == gpu.compute_capability
        ),
        None,
    )
    result["matrix"] = {"pool": pool, "documented": SUPPORTED.get(pool or "", ()), "built": precisions}

    t0 = time.perf_counter()
    ckpt = make_tiny(work / "ckpt", seed=0)
    repo = work / "models" / "tiny"
    export_gendr(ckpt, repo, tile=args.tile, overlap=args.overlap)
    result["steps"]["export_s"] = round(time.perf_counter() - t0, 1)
    for q in ("int8", "fp8") if fp8_ok else ("int8",):
        t0 = time.perf_counter()
        quantize_model(repo, q, calib="builtin", n_tiles=8, method="max")
        result["steps"][f"quantize_{q}_s"] = round(time.perf_counter() - t0, 1)
    if not fp8_ok:
        try:
            check_fp8_target("auto")
            result["fp8_refusal"] = "NOT refused (bug)"
            result["ok"] = False
        except QuantizeError as e:
            result["fp8_refusal"] = str(e)
    save()

    photos = builtin_photos()
    tiles = graph_input_tiles(photos, args.tile, 1, 4, n=8, seed=0)
    ref_torch = torch_runner(load_checkpoint(repo / "checkpoint"))(tiles)
    for p in precisions:
        entry: dict = {}
        result["engines"][p] = entry
        try:
            r1 = build_engine(repo, p, batch_sizes=bs, profiles=2, progress=False)
            entry["build_s"] = round(r1.seconds, 1)
            entry["plan_mb"] = round(r1.engine.plan.size / 1e6, 2)
            r2 = build_engine(repo, p, batch_sizes=bs, profiles=2, progress=False)
            entry["second_build_skipped"] = r2.skipped
            r3 = build_engine(repo, p, batch_sizes=bs, profiles=2, progress=False, force=True)
            entry["rebuild_with_timing_cache_s"] = round(r3.seconds, 1)
            plan = repo / r3.engine.plan.path
            runner = TrtTileRunner(plan)
            got = runner(tiles)
            same = OrtTileRunner(repo / "onnx" / p / "model.onnx")(tiles)
            entry["vs_onnxruntime_same_precision"] = compare(got, same)
            entry["vs_torch_fp32"] = compare(got, ref_torch)
            entry["latency"] = [_latency(runner, tiles, b, args.repeats) for b in bs]
            if p == "fp16" and entry["vs_torch_fp32"]["psnr_db"] < args.min_fp16_db:
                result["ok"] = False
        except Exception as e:  # record (TrtBuildError or anything else) and go on with the other precisions
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()[-3000:]
            result["ok"] = False
        save()
        print(p, json.dumps({k: v for k, v in entry.items() if k != "traceback"}), flush=True)
    result["ort_fp32_vs_torch_fp32"] = compare(
        OrtTileRunner(repo / "onnx" / "fp32" / "model.onnx")(tiles), ref_torch
    )
    save()
    print(f"wrote {args.out}; ok={result['ok']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
