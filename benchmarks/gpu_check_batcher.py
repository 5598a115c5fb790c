"""GPU check: mixed-size requests through the service runtime (tile batcher + stitching) on full-size
GenDR (random weights) with the production PyTorch backend, 1–3 engine instances on one GPU.

Each round submits the same seeded set of requests at once (outputs from 256² to 1536², GenDR ×4 of
photo-like noise) through `ModelRuntime.upscale`, and records output MP/s, tiles/s, per-request p50 /
p95 latency, mean batch fill and peak GPU memory. The JSON is rewritten after every row.

With `--trt-repo` (a model repository with a TensorRT engine for this GPU, e.g. one gpu_check_engine.py
built) it also loads the TensorRT backend with CUDA graphs and records, for EVERY captured (instance,
tile, batch size), the largest difference between the graph's output and the uncaptured run on the same
tiles (`TensorRTBackend.graph_check()`, measured at warm-up): a graph replayed on a context that moved
to another shape shows here. Exit code 1 when a graph differs or was dropped.

    python benchmarks/gpu_check_batcher.py                 # GPU, bf16, 512-px tiles
    python benchmarks/gpu_check_batcher.py --dry-run       # tiny model on CPU, same code path
    python benchmarks/gpu_check_batcher.py --trt-repo models/gendr-tiny   # + TensorRT CUDA graphs
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gpu_report import Report


def requests(n: int, sizes: list[int], scale: int, seed: int = 0) -> list[np.ndarray]:
    """n LR images whose ×scale outputs have sides drawn from `sizes` (seeded, smooth noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        oh, ow = (int(rng.choice(sizes)) for _ in range(2))
        h, w = max(8, oh // scale), max(8, ow // scale)
        base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        out.append(np.ascontiguousarray(np.kron(base, np.ones((4, 4, 1), np.uint8))[:h, :w]))
    return out


async def one_round(m: Any, images: list[np.ndarray], scale: int) -> tuple[float, list[float]]:
    from service.runtime import UpscaleJob

    async def one(im: np.ndarray) -> float:
        t0 = time.perf_counter()
        oh, ow = im.shape[0] * scale, im.shape[1] * scale
        r = m.reserve(m.plan(im.shape[0], im.shape[1], oh, ow))
        await m.upscale(UpscaleJob(im, oh, ow, "none", time.monotonic() + 3600, "gpu-check"), r)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    lat = await asyncio.gather(*(one(im) for im in images))
    return time.perf_counter() - t0, list(lat)


def run(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    import torch

    from engine_build.gendr.model import build_gendr
    from engine_build.torch_backend import TorchBackend
    from service.manifest import TileGeometry
    from service.metrics import Metrics
    from service.runtime import ModelRuntime
    from service.settings import Settings

    device = "cpu" if args.dry_run else f"cuda:{args.device}"
    gpu = torch.cuda.get_device_name(args.device) if not args.dry_run else platform.processor() or "cpu"
    net = build_gendr(args.preset, seed=0).eval()
    geo = TileGeometry(tile=args.tile, overlap=args.tile // 8, graph_scale=1, size_multiple=net.size_multiple)
    rep = Report(path, args.max_seconds, gpu=gpu, device=device, preset=args.preset, tile=args.tile)
    images = requests(args.requests, args.sizes, 4)
    for inst in args.instances:
        if rep.over_budget():
            rep.add({"instances": inst, "skipped": "time budget"})
            continue
        be = TorchBackend.from_module(
            net,
            geo,
            name="gendr-random",
            kind="gendr",
            device=device,
            precision=args.precision,
            instances=inst,
            max_batch=args.max_batch,
        )
        s = Settings(
            model_repository=Path("."),
            max_batch=args.max_batch,
            queue_capacity_tiles=1 << 20,
            max_output_pixels=1 << 26,
        )
        host = concurrent.futures.ThreadPoolExecutor(max(2, (os.cpu_count() or 2) // 2))
        m = ModelRuntime("gendr-random", Path("."), be.manifest, be, s, Metrics(), host)
        m.load()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(args.device)
        asyncio.run(one_round(m, images[:2], 4))  # warm the stitch path
        calls0 = sum(i.batches for i in m.batcher._instances)
        walls, lats = [], []
        for _ in range(args.rounds):
            wall, lat = asyncio.run(one_round(m, images, 4))
            walls.append(wall)
            lats.extend(lat)
        calls = sum(i.batches for i in m.batcher._instances) - calls0
        tiles = sum(
            m.plan(im.shape[0], im.shape[1], im.shape[0] * 4, im.shape[1] * 4).n_tiles for im in images
        )
        mp = sum(im.shape[0] * im.shape[1] * 16 for im in images) / 1e6
        wall = statistics.median(walls)
        lats.sort()
        row = {
            "instances": inst,
            "precision": be.info.precision,
            "requests": len(images),
            "tiles_per_round": tiles,
            "output_mp_per_s": round(mp / wall, 3),
            "tiles_per_s": round(tiles / wall, 2),
            "p50_s": round(lats[len(lats) // 2], 3),
            "p95_s": round(lats[min(len(lats) - 1, int(0.95 * len(lats)))], 3),
            "mean_batch": round(tiles * args.rounds / max(1, calls), 2),
        }
        if device.startswith("cuda"):
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(args.device) / 2**30, 2)
        rep.add(row)
        m.close()
        host.shutdown()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    try:
        rep.add(trt_graph_row(args.trt_repo, max(args.instances), args.max_batch))
    except Exception as e:  # recorded, not raised: the rows above are kept
        rep.add({"trt_graphs": "error", "error": f"{type(e).__name__}: {e}", "ok": False})
    return rep.data


def trt_graph_row(repo: Path | None, instances: int, max_batch: int) -> dict[str, Any]:
    """Every captured CUDA graph vs the uncaptured run (max |difference| in grey levels, ≤ 1 passes)."""
    from service.hardware import tensorrt_module

    if repo is None or tensorrt_module() is None:
        why = "no --trt-repo given" if repo is None else "TensorRT is not installed here"
        return {"trt_graphs": "skipped", "why": why, "ok": True}
    from service.backends.tensorrt import TensorRTBackend
    from service.backends.trt_instances import GRAPH_TOLERANCE
    from service.manifest import read_manifest

    be = TensorRTBackend(
        read_manifest(repo), repo, instances=instances, max_batch=max_batch, cuda_graphs=True
    )
    try:
        be.load()
        be.warmup()
        diffs = be.graph_check()
        sizes = be.info.batch_sizes
        captured = {(i, t): be.graph_sizes(i, t) for i in range(instances) for t in be.info.tiles}
    finally:
        be.close()
    dropped = [f"i{i}/t{t}" for (i, t), g in captured.items() if g != sizes]
    worst = max(diffs.values(), default=0)
    return {
        "trt_graphs": {f"i{i}/t{t}/b{b}": d for (i, t, b), d in sorted(diffs.items())},
        "batch_sizes": list(sizes),
        "without_graph": dropped,  # (instance, tile) pairs where some size runs without its graph
        "max_diff": worst,
        "ok": bool(diffs) and worst <= GRAPH_TOLERANCE and not dropped,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU, small requests")
    p.add_argument("--preset", default="gendr")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--instances", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768, 1024, 1536])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=100.0)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument("--trt-repo", type=Path, help="repository with a TensorRT engine: check its CUDA graphs")
    a = p.parse_args(argv)
    if a.dry_run:
        a.preset, a.tile, a.precision, a.instances = "tiny", 64, "fp32", [1, 2]
        a.requests, a.sizes, a.rounds, a.max_batch = 4, [64, 96, 160], 1, 2
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    path = args.out / ("gpu_check_batcher_dry_run.json" if args.dry_run else "gpu_check_batcher.json")
    data = run(args, path)
    print(f"wrote {path}")
    return 0 if data["results"][-1]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
