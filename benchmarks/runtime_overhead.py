"""Raw backend throughput vs the tile batcher on the same backend and the same tiles, in one run.

For each (instances, max batch): the raw figure is N tiles pushed through `backend.infer` by one
thread per instance on pre-stacked full batches (the best the engine can do); the batched figure is
the same tiles submitted as whole requests to `TileBatcher` (batch formation, gather, output checks,
completion thread, stitching into each request's canvas). `busy` is the share of the batched run's
wall time the engine instances spent inside infer() — 1 − busy is the time the batcher kept them
waiting, the overhead figure least sensitive to other load on the machine. Raw and batched runs
alternate and the median of `--rounds` is kept, so background load on a shared machine hits both alike.

Ratio = batched / raw tiles/s: the median over rounds of each back-to-back pair's ratio; target ≥ 0.97
at saturation. Also printed: output MP/s, and the whole
request path (ModelRuntime.upscale: resize, pad, batcher, stitch, colour fix) as `e2e`.

    python benchmarks/runtime_overhead.py                       # tiny GenDR on ONNX Runtime CPU + fake
    python benchmarks/runtime_overhead.py --backend fake --fake-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import machine, tiny_repo

from service.backends.base import Backend
from service.backends.fake import FakeBackend, FakeBehaviour
from service.backends.onnxruntime import OnnxRuntimeBackend
from service.manifest import Manifest, TileGeometry, read_manifest
from service.metrics import Metrics
from service.pixels.pipeline import make_plan, prepare_input
from service.pixels.tiling import Stitcher
from service.scheduling.batcher import TileBatcher


def photo(h: int, w: int) -> np.ndarray:
    from skimage import data

    img = data.astronaut()
    reps = (-(-h // img.shape[0]), -(-w // img.shape[1]), 1)
    return np.ascontiguousarray(np.tile(img, reps)[:h, :w])


def make_backend(
    kind: str, instances: int, max_batch: int, args: argparse.Namespace, shared: bool = False
) -> Backend:
    if kind == "onnxruntime":
        repo = tiny_repo(args.tile, args.tile // 4)
        name = f"tiny{args.tile}"
        m = read_manifest(repo / name)
        be: Backend = OnnxRuntimeBackend(
            m,
            repo / name,
            instances=instances,
            max_batch=max_batch,
            intra_op_threads=args.threads,
            session_per_instance=not shared,
        )
    else:
        m = Manifest(
            name="fake",
            kind="single",
            native_scale=1,
            tile=TileGeometry(tile=args.tile, overlap=args.tile // 4, graph_scale=1, size_multiple=8),
        )
        be = FakeBackend(
            m,
            instances=instances,
            max_batch=max_batch,
            behaviour=FakeBehaviour(per_tile_s=args.fake_ms / 1000),
        )
    be.load()
    be.warmup()
    return be


def workload(be: Backend, n_tiles: int) -> tuple[list[tuple[np.ndarray, Any]], np.ndarray]:
    """Requests (padded image, plan) totalling ≥ n_tiles, and the same tiles stacked for the raw run."""
    geo = be.manifest.tile
    side = geo.tile * 3  # a 3×3…4×4-tile request
    reqs, tiles = [], []
    while len(tiles) < n_tiles:
        plan = make_plan(side, side, side, side, geo)
        padded = prepare_input(photo(side, side), plan)
        reqs.append((padded, plan))
        t = geo.tile
        tiles += [padded[y : y + t, x : x + t] for _, y, x in plan.tiles.positions()]
    return reqs, np.stack(tiles)


def raw(be: Backend, tiles: np.ndarray, instances: int, bs: int) -> float:
    """Tiles/s with one thread per instance hammering infer() on full batches."""
    batches = [np.ascontiguousarray(tiles[i : i + bs]) for i in range(0, len(tiles) - bs + 1, bs)]
    n = len(batches) * bs
    lock = threading.Lock()
    it = iter(batches)

    def worker(i: int) -> None:
        while True:
            with lock:
                b = next(it, None)
            if b is None:
                return
            be.infer(i, b)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(instances)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return n / (time.perf_counter() - t0)


COMPLETION_THREADS: int | None = None


def batched(
    be: Backend, reqs: list[tuple[np.ndarray, Any]], max_batch: int, stitch: bool
) -> tuple[float, float]:
    """(tiles/s, engine busy share): Σ engine-call time / (wall × instances) over the saturated run."""
    metrics = Metrics()
    b = TileBatcher(
        be,
        model="bench",
        metrics=metrics,
        max_batch=max_batch,
        max_queue_delay_s=0.002,
        capacity_tiles=1 << 30,
        completion_threads=COMPLETION_THREADS,
    )
    b.start()
    n = sum(p.n_tiles for _, p in reqs)
    t0 = time.perf_counter()
    tickets = []
    for padded, plan in reqs:
        st = Stitcher(plan.tiles)

        def sink(idx, out, st=st) -> None:
            if stitch:
                for i, o in zip(idx, out, strict=True):
                    st.add(i, o)

        tickets.append(b.submit(padded, plan.tiles, time.monotonic() + 3600, sink))
    for t in tickets:
        t.future.result()
    dt = time.perf_counter() - t0
    b.close()
    busy = metrics.compute_seconds.labels("bench")._sum.get() / (dt * be.info.instances)
    return n / dt, busy


def e2e(be: Backend, reqs: list[tuple[np.ndarray, Any]], max_batch: int) -> float:
    """Whole requests through ModelRuntime.upscale (resize, pad, batch, stitch, colour fix)."""
    import concurrent.futures

    from service.runtime import ModelRuntime, UpscaleJob
    from service.settings import Settings

    s = Settings(model_repository=Path("."), max_batch=max_batch, queue_capacity_tiles=1 << 20)
    host = concurrent.futures.ThreadPoolExecutor(2)
    m = ModelRuntime("bench", Path("."), be.manifest, be, s, Metrics(), host)
    m.batcher.start()
    m._ready = True
    imgs = [photo(p.in_h, p.in_w) for _, p in reqs]

    async def go() -> float:
        t0 = time.perf_counter()
        jobs = []
        for im in imgs:
            r = m.reserve(m.plan(*im.shape[:2], *im.shape[:2]))
            jobs.append(
                m.upscale(UpscaleJob(im, im.shape[0], im.shape[1], "adain", time.monotonic() + 3600, "b"), r)
            )
        await asyncio.gather(*jobs)
        return time.perf_counter() - t0

    dt = asyncio.run(go())
    m.batcher.close()
    host.shutdown()
    return sum(p.n_tiles for _, p in reqs) / dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["onnxruntime", "fake", "both"], default="both")
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--tiles", type=int, default=96, help="tiles per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--instances", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument(
        "--threads", type=int, default=0, help="ORT intra-op threads per instance (0 = cores/instances)"
    )
    ap.add_argument(
        "--fake-ms", type=float, default=4.0, help="fake backend: ms per tile (sleep, GIL released)"
    )
    ap.add_argument("--completion-threads", type=int, default=None, help="0 = stitch inline in the worker")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    global COMPLETION_THREADS
    COMPLETION_THREADS = args.completion_threads
    kinds = ["onnxruntime", "fake"] if args.backend == "both" else [args.backend]
    report: dict[str, Any] = {
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": [],
    }
    print(json.dumps(report["machine"]))
    print(
        f"{'backend':12} {'inst':>4} {'batch':>5} {'sessions':>8} {'raw t/s':>8} {'batcher t/s':>11} "
        f"{'ratio':>6} {'no-stitch':>9} {'e2e t/s':>8} {'e2e ratio':>9} {'MP/s':>6} {'busy':>5}"
    )
    for kind in kinds:
        configs = [(i, b, False) for i in args.instances for b in args.batches]
        if kind == "onnxruntime" and max(args.instances) > 1:
            configs.append((max(args.instances), max(args.batches), True))  # one shared session
        for inst, mb, shared in configs:
            be = make_backend(kind, inst, mb, args, shared)
            reqs, tiles = workload(be, args.tiles)
            r_raw, r_b, r_ns, r_e, busy = [], [], [], [], []
            for _ in range(args.rounds):  # paired: raw and batched back to back, ratio per pair
                r_raw.append(raw(be, tiles, inst, mb))
                tps, bz = batched(be, reqs, mb, stitch=True)
                r_b.append(tps)
                busy.append(bz)
                r_ns.append(batched(be, reqs, mb, stitch=False)[0])
                r_e.append(e2e(be, reqs, mb))
            med = statistics.median
            row = {
                "backend": kind,
                "instances": inst,
                "max_batch": mb,
                "shared_session": shared,
                "raw_tiles_s": med(r_raw),
                "batcher_tiles_s": med(r_b),
                "batcher_nostitch_tiles_s": med(r_ns),
                "e2e_tiles_s": med(r_e),
                "out_tile_px": be.manifest.tile.out_tile**2,
                "ratio": med([b / r for b, r in zip(r_b, r_raw, strict=True)]),
                "ratio_nostitch": med([b / r for b, r in zip(r_ns, r_raw, strict=True)]),
                "e2e_ratio": med([b / r for b, r in zip(r_e, r_raw, strict=True)]),
                "ratio_all": [round(b / r, 3) for b, r in zip(r_b, r_raw, strict=True)],
                "engine_busy": med(busy),
            }
            # output MP/s of the batched path: image pixels only (tiles overlap and pad)
            img_px = sum(p.out_h * p.out_w for _, p in reqs)
            n = sum(p.n_tiles for _, p in reqs)
            row["batcher_out_mp_s"] = row["batcher_tiles_s"] * img_px / n / 1e6
            report["rows"].append(row)
            print(
                f"{kind:12} {inst:>4} {mb:>5} {'1' if shared else str(inst):>8} {row['raw_tiles_s']:8.1f} "
                f"{row['batcher_tiles_s']:11.1f} {row['ratio']:6.3f} {row['ratio_nostitch']:9.3f} "
                f"{row['e2e_tiles_s']:8.1f} {row['e2e_ratio']:9.3f} {row['batcher_out_mp_s']:6.3f} "
                f"{row['engine_busy']:5.3f}",
                flush=True,
            )
            be.close()
    report["machine_after"] = machine()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
