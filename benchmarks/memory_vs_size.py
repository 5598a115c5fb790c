"""Peak memory of one request vs output size (1…16 MP), with the fake backend and the tiny ONNX model.

Each (backend, size) runs in a fresh child process: load + warm up, reset the kernel's peak-RSS mark
(/proc/self/clear_refs 5), run one ×4 request through ModelRuntime.upscale, read VmHWM. The increase
over the RSS before the request is what the request cost. The fake backend also reports the peak of
each phase (prepare = resize + pad, tiles = batcher + stitching, finish = round + resize + colour fix)
and the image buffers the request cannot avoid, so the rest — what tiling should keep flat — shows.

    python benchmarks/memory_vs_size.py                     # fake + tiny ORT, 1 2 4 8 16 MP
    python benchmarks/memory_vs_size.py --backend fake --sizes 1 4 16
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import machine, tiny_repo

MB = 1 << 20


def rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    vals = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            vals[k] = int(v.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def reset_peak() -> int:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return rss()[0]


def photo(h: int, w: int) -> np.ndarray:
    from skimage import data

    img = data.astronaut()
    reps = (-(-h // img.shape[0]), -(-w // img.shape[1]), 1)
    return np.ascontiguousarray(np.tile(img, reps)[:h, :w])


def child(backend: str, mp: float, color_fix: str, tile: int) -> dict[str, Any]:
    from service.backends.fake import FakeBackend
    from service.backends.onnxruntime import OnnxRuntimeBackend
    from service.manifest import Manifest, PipelineParams, TileGeometry, read_manifest
    from service.metrics import Metrics
    from service.runtime import ModelRuntime, UpscaleJob, _finish, _prepare, _sink
    from service.settings import Settings

    if backend == "fake":
        m = Manifest(
            name="fake",
            kind="gendr",
            native_scale=4,
            pipeline=PipelineParams(),
            tile=TileGeometry(tile=512, overlap=64, graph_scale=1, size_multiple=64),
        )
        be: Any = FakeBackend(m, max_batch=4)
    else:
        repo = tiny_repo(tile, tile // 4)
        m = read_manifest(repo / f"tiny{tile}")
        be = OnnxRuntimeBackend(m, repo / f"tiny{tile}", max_batch=4)
    s = Settings(
        model_repository=Path("."), max_batch=4, queue_capacity_tiles=1 << 20, max_output_pixels=1 << 30
    )
    host = concurrent.futures.ThreadPoolExecutor(2)
    rt = ModelRuntime(m.name, Path("."), m, be, s, Metrics(), host)
    rt.load()
    side = round(math.sqrt(mp * 1e6))
    oh = ow = side - side % 4
    img = photo(oh // 4, ow // 4)
    plan = rt.plan(img.shape[0], img.shape[1], oh, ow)

    async def one() -> float:
        r = rt.reserve(plan)
        t0 = time.perf_counter()
        out = await rt.upscale(UpscaleJob(img, oh, ow, color_fix, time.monotonic() + 3600, "m"), r)
        dt = time.perf_counter() - t0
        del out
        return dt

    base = reset_peak()
    dt = asyncio.run(one())
    peak = rss()[1] - base
    out: dict[str, Any] = {
        "backend": backend,
        "out_mp": oh * ow / 1e6,
        "out": f"{ow}x{oh}",
        "tiles": plan.n_tiles,
        "seconds": round(dt, 2),
        "peak_mb": round(peak / MB, 1),
        "baseline_rss_mb": round(base / MB),
    }
    px = oh * ow
    # Buffers one request cannot avoid at this size (GenDR works at output resolution):
    out["unavoidable_mb"] = {
        "input": round(img.nbytes / MB, 1),
        "resized+padded input (uint8)": round((px + plan.tiles.padded_h * plan.tiles.padded_w) * 3 / MB, 1),
        "result (uint8)": round(px * 3 / MB, 1),
    }
    if backend == "fake":  # per phase, same functions the runtime calls
        phases = {}
        base = reset_peak()
        padded, st = _prepare(img, plan)
        phases["prepare"] = (rss()[1] - base) / MB
        b = rt.batcher
        base = reset_peak()
        t = b.submit(padded, plan.tiles, time.monotonic() + 3600, _sink(st))
        t.future.result()
        del t, padded
        phases["tiles+stitch"] = (rss()[1] - base) / MB
        base = reset_peak()
        res = _finish(st, img, plan, color_fix)
        phases[f"finish ({color_fix})"] = (rss()[1] - base) / MB
        del res, st
        out["phase_peak_mb"] = {k: round(v, 1) for k, v in phases.items()}
    rt.close()
    host.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["fake", "onnxruntime", "both"], default="both")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 2, 4, 8, 16], help="output megapixels")
    ap.add_argument("--color-fix", default="adain", choices=["none", "adain", "wavelet"])
    ap.add_argument("--tile", type=int, default=128, help="tile of the tiny ONNX model")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mp", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.backend, args.mp, args.color_fix, args.tile)))
        return 0
    if args.backend in ("onnxruntime", "both"):
        tiny_repo(args.tile, args.tile // 4)  # export once, outside the measured children
    rows = []
    print(json.dumps(machine()))
    for backend in ["fake", "onnxruntime"] if args.backend == "both" else [args.backend]:
        for mp in args.sizes:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--backend",
                backend,
                "--mp",
                str(mp),
                "--color-fix",
                args.color_fix,
                "--tile",
                str(args.tile),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                return r.returncode
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            unavoidable = sum(row["unavoidable_mb"].values())
            extra = f" phases {row['phase_peak_mb']}" if "phase_peak_mb" in row else ""
            print(
                f"{backend:12} {row['out']:>11} {row['tiles']:5d} tiles {row['seconds']:7.2f}s peak "
                f"+{row['peak_mb']:7.1f} MB (image buffers {unavoidable:7.1f} MB){extra}",
                flush=True,
            )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "color_fix": args.color_fix, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
