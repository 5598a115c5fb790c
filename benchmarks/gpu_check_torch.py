"""GPU check: full-size GenDR (random weights) through the PyTorch CUDA backend path.

For every SR tile size (512, 1024), batch size (1…16), precision (fp16, bf16) and with/without
torch.compile it measures, through `service.backends.torch_backend.TorchBackend.infer` (uint8 tiles
in and out, host↔device copies included): ms per tile, output megapixels/s, achieved TFLOP/s against
the GPU's dense fp16/bf16 tensor peak, and peak GPU memory. Results go to JSON ($OUT or --out).

    python benchmarks/gpu_check_torch.py                      # the full matrix (GPU)
    python benchmarks/gpu_check_torch.py --dry-run            # tiny model on CPU: checks the script runs

FLOPs are counted once per tile size with torch.utils.flop_counter (matmul, conv, attention), so
"achieved TFLOP/s" is model FLOPs / wall time, the usual MFU-style figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L20": 119.5,
    "L4": 121.0,
    "A10": 125.0,
    "A10G": 125.0,
    "RTX 4090": 165.0,
}


def peak_for(name: str) -> float | None:
    best = None
    for key, v in PEAK_TFLOPS.items():
        if key in name and (best is None or len(key) > len(best[0])):
            best = (key, v)
    return best[1] if best else None


def count_flops(graph: Any, tile: int, device: Any) -> float:
    """Model FLOPs of one tile (batch 1) through the TileGraph."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, tile, tile, 3, dtype=torch.uint8, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        graph(x)
    return float(fc.get_total_flops())


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from engine_build.model import build_gendr
    from service.backends.torch_backend import TorchBackend
    from service.manifest import TileGeometry

    device = "cpu" if args.dry_run else f"cuda:{args.device}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch; use --dry-run on CPU")
    gpu = (
        torch.cuda.get_device_name(args.device)
        if device.startswith("cuda")
        else platform.processor() or "cpu"
    )
    peak = args.peak_tflops or (peak_for(gpu) if device.startswith("cuda") else None)
    t0 = time.perf_counter()
    base = build_gendr(args.preset, seed=0).eval()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in base.parameters())
    report: dict[str, Any] = {
        "gpu": gpu,
        "device": device,
        "torch": torch.__version__,
        "preset": args.preset,
        "parameters": n_params,
        "peak_tflops_dense": peak,
        "model_build_s": round(build_s, 1),
        "iters": args.iters,
        "results": [],
    }
    if device.startswith("cuda"):
        report["cuda"] = torch.version.cuda
        report["gpu_memory_total_gb"] = round(
            torch.cuda.get_device_properties(args.device).total_memory / 2**30, 1
        )
    print(
        f"{gpu}: GenDR preset {args.preset}, {n_params / 1e6:.0f} M parameters, peak {peak} TFLOP/s",
        flush=True,
    )
    started = time.monotonic()
    for compile_ in args.compile:  # every eager configuration first: compiling is what eats the budget
        for prec in args.precisions:
            for tile in args.tiles:
                if time.monotonic() - started > args.max_seconds:
                    report["results"].append(
                        {"precision": prec, "compile": compile_, "tile": tile, "skipped": "time budget"}
                    )
                    continue
                geo = TileGeometry(
                    tile=tile, overlap=tile // 8, graph_scale=1, size_multiple=base.size_multiple
                )
                be = TorchBackend.from_module(
                    copy.deepcopy(base),
                    geo,
                    name="gendr-random",
                    kind="gendr",
                    device=device,
                    precision=prec,
                    max_batch=max(args.batches),
                    compile=compile_,
                )
                t_load = time.perf_counter()
                be.load()
                load_s = time.perf_counter() - t_load
                flops = count_flops(be._graph, tile, torch.device(device))
                for bs in args.batches:
                    if time.monotonic() - started > args.max_seconds:
                        report["results"].append(
                            {
                                "precision": prec,
                                "compile": compile_,
                                "tile": tile,
                                "batch": bs,
                                "skipped": "time budget",
                            }
                        )
                        continue
                    row: dict[str, Any] = {
                        "precision": prec,
                        "compile": compile_,
                        "tile": tile,
                        "batch": bs,
                        "gflop_per_tile": round(flops / 1e9, 1),
                        "load_s": round(load_s, 1),
                    }
                    x = np.random.default_rng(0).integers(0, 256, (bs, tile, tile, 3), dtype=np.uint8)
                    try:
                        if device.startswith("cuda"):
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats(args.device)
                        t1 = time.perf_counter()
                        for _ in range(args.warmup):
                            y = be.infer(0, x)
                        row["first_call_s"] = round(time.perf_counter() - t1, 2)  # includes compile
                        t1 = time.perf_counter()
                        for _ in range(args.iters):
                            y = be.infer(0, x)
                        dt = (time.perf_counter() - t1) / args.iters
                    except torch.cuda.OutOfMemoryError:
                        row["error"] = "out of memory"
                        report["results"].append(row)
                        print(row, flush=True)
                        torch.cuda.empty_cache()
                        break
                    assert y.shape == (bs, tile, tile, 3) and y.dtype == np.uint8
                    row.update(
                        ms_per_batch=round(dt * 1e3, 2),
                        ms_per_tile=round(dt * 1e3 / bs, 2),
                        mp_per_s=round(bs * tile * tile / dt / 1e6, 3),
                        tflops=round(flops * bs / dt / 1e12, 2),
                    )
                    if peak:
                        row["mfu"] = round(row["tflops"] / peak, 3)
                    if device.startswith("cuda"):
                        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(args.device) / 2**30, 2)
                    report["results"].append(row)
                    print(json.dumps(row), flush=True)
                be.close()
                del be
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--dry-run", action="store_true", help="tiny model on CPU, fp32, two batch sizes, one tile size"
    )
    p.add_argument("--preset", default="gendr", help="model preset (gendr = full size)")
    p.add_argument("--tiles", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=["fp32", "fp16", "bf16"])
    p.add_argument(
        "--compile",
        type=lambda s: s.lower() in ("1", "true", "on", "yes"),
        nargs="+",
        default=[False, True],
        help="torch.compile settings to try (off on)",
    )
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense fp16 peak")
    p.add_argument(
        "--max-seconds", type=float, default=480.0, help="stop starting new configurations after this"
    )
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    a = p.parse_args(argv)
    if a.dry_run:
        a.preset, a.tiles, a.batches, a.precisions, a.compile, a.iters, a.warmup = (
            "tiny",
            [64],
            [1, 2],
            ["fp32"],
            [False],
            1,
            1,
        )
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("gpu_check_torch_dry_run.json" if args.dry_run else "gpu_check_torch.json")
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
