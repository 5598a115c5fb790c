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
"achieved TFLOP/s" is model FLOPs / wall time, the usual MFU-style figure. Each row records its own
failure (`error`: an fp16 overflow's FloatingPointError, out of memory, …; a failed FLOP count is
`flops_error` and the row is timed without TFLOP/s) and the check goes on; exit code 1 when a row failed.
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


def row_ok(row: dict[str, Any]) -> bool:
    return "ms_per_tile" in row and "error" not in row


def measure_config(
    rep: Report, args: argparse.Namespace, base: Any, device: str, prec: str, compile_: bool, tile: int
) -> int:
    """One (precision, compile, tile): load, count FLOPs, one row per batch size; returns the failed rows.

    Every failure (an fp16 overflow's FloatingPointError, out of memory, a load or FLOP-count error) is
    its own row's `error`, and the check goes on; after out of memory the larger batches of that tile are
    skipped (they need more), not tried.
    """
    import torch

    from engine_build.torch_backend import TorchBackend
    from service.manifest import TileGeometry

    key = {"precision": prec, "compile": compile_, "tile": tile}
    if rep.over_budget():
        rep.add({**key, "skipped": "time budget"})
        return 0
    be, failed, flops, load_s, stop = None, 0, None, 0.0, ""
    try:
        geo = TileGeometry(tile=tile, overlap=tile // 8, graph_scale=1, size_multiple=base.size_multiple)
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
    except Exception as e:  # the whole configuration cannot run: one row says why
        rep.add({**key, "error": f"load: {type(e).__name__}: {e}"})
        _release(be, device)
        return 1
    try:
        flops = count_flops(be._graph, tile, torch.device(device))
    except Exception as e:  # e.g. the check_finite FloatingPointError on an fp16 overflow: rows go on
        key["flops_error"] = f"{type(e).__name__}: {e}"
    for bs in args.batches:
        row: dict[str, Any] = {**key, "batch": bs, "load_s": round(load_s, 1)}
        if flops is not None:
            row["gflop_per_tile"] = round(flops / 1e9, 1)
        if stop or rep.over_budget():
            rep.add({**row, "skipped": stop or "time budget"})
            continue
        try:
            measure_row(row, be, args, device, bs, tile, flops)
        except Exception as e:  # FloatingPointError (fp16 overflow), out of memory, …: this row only
            row["error"] = "out of memory" if _is_oom(e) else f"{type(e).__name__}: {e}"
            failed += 1
            if _is_oom(e):
                stop = f"out of memory at batch {bs}"
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
        rep.add(row)
    _release(be, device)
    return failed


def measure_row(
    row: dict[str, Any],
    be: Any,
    args: argparse.Namespace,
    device: str,
    bs: int,
    tile: int,
    flops: float | None,
) -> None:
    """Time `bs` tiles through the backend into `row` (raises on any failure)."""
    import numpy as np
    import torch

    x = np.random.default_rng(0).integers(0, 256, (bs, tile, tile, 3), dtype=np.uint8)
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
    if y.shape != (bs, tile, tile, 3) or y.dtype != np.uint8:
        raise ValueError(f"output {y.shape} {y.dtype}, expected ({bs}, {tile}, {tile}, 3) uint8")
    row.update(ms_per_batch=round(dt * 1e3, 2), ms_per_tile=round(dt * 1e3 / bs, 2))
    row["mp_per_s"] = round(bs * tile * tile / dt / 1e6, 3)
    if flops is not None:
        row["tflops"] = round(flops * bs / dt / 1e12, 2)
        if args.peak:
            row["mfu"] = round(row["tflops"] / args.peak, 3)
    if device.startswith("cuda"):
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(args.device) / 2**30, 2)


def _is_oom(e: Exception) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError)


def _release(be: Any, device: str) -> None:
    import torch

    if be is not None:
        try:
            be.close()
        except Exception:  # closing a failed backend must not stop the check
            pass
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    import torch

    from engine_build.gendr.model import build_gendr

    device = "cpu" if args.dry_run else f"cuda:{args.device}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch; use --dry-run on CPU")
    gpu = (
        torch.cuda.get_device_name(args.device)
        if device.startswith("cuda")
        else platform.processor() or "cpu"
    )
    peak = args.peak = args.peak_tflops or (peak_for(gpu) if device.startswith("cuda") else None)
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
    failed = 0
    for compile_ in args.compile:  # every eager configuration first: compiling is what eats the budget
        for prec in args.precisions:
            for tile in args.tiles:
                failed += measure_config(rep, args, base, device, prec, compile_, tile)
    exercised = device.startswith("cuda") and any(row_ok(r) for r in rep.data["results"])
    how = f"TorchBackend on {device}" if device.startswith("cuda") else "dry run: on the CPU"
    rep.backend("torch", exercised, how if exercised or not device.startswith("cuda") else "every row failed")
    rep.set(failed_rows=failed, ok=failed == 0)
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
    data = run(args, path)
    print(f"wrote {path}; ok={data['ok']}")
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
