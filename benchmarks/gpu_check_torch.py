"""GPU check: full-size GenDR (random weights) through the production PyTorch backend.

For every output tile size (512², 1024²), batch size (1…8) and precision (bf16, fp16; torch.compile
only with --full) it measures, through `engine_build.torch_backend.TorchBackend.infer` (uint8 tiles
in and out, host↔device copies included): ms per tile, output megapixels/s, achieved TFLOP/s against
the GPU's dense fp16/bf16 tensor peak, and peak GPU memory. The JSON ($OUT or --out) is rewritten
after every row, so a timeout loses nothing.

    python benchmarks/gpu_check_torch.py                      # eager matrix (GPU), ~3 min on an H200
    python benchmarks/gpu_check_torch.py --full               # + torch.compile
    python benchmarks/gpu_check_torch.py --dry-run            # tiny model on CPU, same code path

FLOPs are counted once per tile size with torch.utils.flop_counter (matmul, conv, attention), so
"achieved TFLOP/s" is model FLOPs / wall time, the usual MFU-style figure.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gpu_report import Report, peak_for


def count_flops(graph: Any, tile: int, device: Any) -> float:
    """Model FLOPs of one tile (batch 1) through the TileGraph."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, tile, tile, 3, dtype=torch.uint8, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        graph(x)
    return float(fc.get_total_flops())


def run(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    from engine_build.gendr.model import build_gendr
    from engine_build.torch_backend import TorchBackend
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
    rep = Report(
        path,
        args.max_seconds,
        gpu=gpu,
        device=device,
        torch=torch.__version__,
        preset=args.preset,
        parameters=n_params,
        peak_tflops_dense=peak,
        model_build_s=round(build_s, 1),
        iters=args.iters,
    )
    if device.startswith("cuda"):
        rep.set(
            cuda=torch.version.cuda,
            gpu_memory_total_gb=round(torch.cuda.get_device_properties(args.device).total_memory / 2**30, 1),
        )
    print(
        f"{gpu}: GenDR preset {args.preset}, {n_params / 1e6:.0f} M parameters, peak {peak} TFLOP/s",
        flush=True,
    )
    for compile_ in args.compile:  # every eager configuration first: compiling is what eats the budget
        for prec in args.precisions:
            for tile in args.tiles:
                if rep.over_budget():
                    rep.add({"precision": prec, "compile": compile_, "tile": tile, "skipped": "time budget"})
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
                    if rep.over_budget():
                        rep.add(
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
                        rep.add(row)
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
                    rep.add(row)
                be.close()
                del be
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    rep.save()
    return rep.data


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--dry-run", action="store_true", help="tiny model on CPU, fp32, two batch sizes, one tile size"
    )
    p.add_argument("--preset", default="gendr", help="model preset (gendr = full size)")
    p.add_argument("--tiles", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=["fp32", "fp16", "bf16"])
    p.add_argument("--full", action="store_true", help="also with torch.compile (minutes per shape)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense fp16 peak")
    p.add_argument(
        "--max-seconds", type=float, default=150.0, help="stop starting new configurations after this"
    )
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    a = p.parse_args(argv)
    a.compile = [False, True] if a.full else [False]
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
    path = args.out / ("gpu_check_torch_dry_run.json" if args.dry_run else "gpu_check_torch.json")
    run(args, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
