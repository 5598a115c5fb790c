"""Seconds per output megapixel of the default model (Real-ESRGAN ×4plus) on this CPU.

Two measurements:

``python benchmarks/default_model_speed.py`` (the default, "serve" mode)
    Starts a real ``gendr-serve`` process on 127.0.0.1 (random free port, ONNX Runtime CPU backend,
    fp32) over the model repository entry, waits for ``GET /readyz``, then POSTs real photos
    (``multipart/form-data`` field ``image``, PNG) to ``/upscale`` and times each response. The same
    photos go through the raw backend in this process: ``OnnxRuntimeBackend`` (the service's own
    class, same session options and threads) driven by ``service.pixels.pipeline.run_sync`` with the same
    tile geometry and batch size, i.e. exactly the tiles the server computes, minus HTTP, image
    decode/encode, queueing and batching. Raw and server runs alternate per photo so that load from
    other processes hits both alike. Prints s/MP for both and their ratio; writes JSON.

``python benchmarks/default_model_speed.py --tile-sweep 64,96,128`` (how the default tile was chosen)
    Exports the model at each LR tile (cached, ``gendr-build default`` machinery) and times one tile
    of a real photo per tile size, interleaved, for ``--reps`` rounds. Reports wall and process CPU
    seconds (all ONNX Runtime threads) per tile, per output megapixel of the tile, per *effective*
    megapixel (the (tile − overlap)² stride area a tile adds in a large image), and the modelled cost
    of whole requests of typical sizes (number of tiles the runtime's planner cuts × median time per
    tile ÷ output megapixels).

Set-up (photos, the model entry, the raw backend, the server process) is benchmarks/_default_speed_setup.py.

Timings on a shared machine are noisy: the process CPU time is the steadier figure when other
processes compete for the cores (wall time then includes waiting for a core).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _default_speed_setup import (
    MODEL,
    ensure_model,
    free_port,
    load_backend,
    machine,
    photos,
    png_bytes,
    proc_cpu_seconds,
    start_server,
    stop_server,
    wait_ready,
)

#: LR sizes of the modelled whole-request cost in the tile sweep (h, w): a thumbnail, a small photo,
#: a VGA photo, a 1 MP photo.
SWEEP_SIZES = ((128, 128), (256, 256), (480, 640), (1024, 1024))


# ---------------------------------------------------------------------------------------------
# Tile sweep
# ---------------------------------------------------------------------------------------------


def tile_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from service.manifest import TileGeometry
    from service.pixels.pipeline import make_plan

    tiles = [int(t) for t in args.tile_sweep.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(args.work_dir)
    img = photos(["astronaut"])[0][1]
    backends = {}
    for t in tiles:
        d = ensure_model(work / f"tile{t}" / MODEL, tile=t, overlap=args.overlap, cache=args.cache)
        backends[t] = load_backend(d, max(batches), args.threads)
        print(f"tile {t}: graph ready ({d})", flush=True)
    # crops from a detailed region of the photo; a first untimed call per size (allocations, caches)
    x = {
        t: np.stack(
            [
                np.ascontiguousarray(img[100 + 37 * i : 100 + 37 * i + t, 150 + 23 * i : 150 + 23 * i + t])
                for i in range(max(batches))
            ]
        )
        for t in tiles
    }
    for t in tiles:
        backends[t].infer(0, x[t][:1])
    samples: dict[tuple[int, int], list[tuple[float, float]]] = {(t, b): [] for t in tiles for b in batches}
    for rep in range(args.reps):
        for t in tiles:
            for b in batches:
                w0, c0 = time.perf_counter(), time.process_time()
                backends[t].infer(0, x[t][:b])
                samples[(t, b)].append(((time.perf_counter() - w0) / b, (time.process_time() - c0) / b))
        print(
            f"round {rep + 1}/{args.reps}: "
            + ", ".join(f"{t}/b{b} {samples[(t, b)][-1][0]:.2f}s" for t in tiles for b in batches),
            flush=True,
        )
    rows = []
    for (t, b), v in samples.items():
        wall = statistics.median(s[0] for s in v)
        cpu = statistics.median(s[1] for s in v)
        out_mp = (4 * t) ** 2 / 1e6
        eff_mp = (4 * (t - args.overlap)) ** 2 / 1e6
        geo = TileGeometry(tile=t, overlap=args.overlap, graph_scale=4, size_multiple=1)
        per_size = {}
        for h, w in SWEEP_SIZES:
            n = make_plan(h, w, 4 * h, 4 * w, geo).n_tiles
            per_size[f"{w}x{h}"] = {
                "tiles": n,
                "cpu_s_per_mp": round(n * cpu / (16 * h * w / 1e6), 2),
                "wall_s_per_mp": round(n * wall / (16 * h * w / 1e6), 2),
            }
        rows.append(
            {
                "tile": t,
                "overlap": args.overlap,
                "batch": b,
                "wall_s_per_tile": {
                    "median": round(wall, 3),
                    "min": round(min(s[0] for s in v), 3),
                    "max": round(max(s[0] for s in v), 3),
                },
                "cpu_s_per_tile": {
                    "median": round(cpu, 3),
                    "min": round(min(s[1] for s in v), 3),
                    "max": round(max(s[1] for s in v), 3),
                },
                "wall_s_per_tile_mp": round(wall / out_mp, 2),
                "cpu_s_per_tile_mp": round(cpu / out_mp, 2),
                "wall_s_per_effective_mp": round(wall / eff_mp, 2),
                "cpu_s_per_effective_mp": round(cpu / eff_mp, 2),
                "requests": per_size,
            }
        )
    print()
    head = (
        f"{'tile':>4} {'b':>2} {'wall s/tile':>11} {'cpu s/tile':>10} {'cpu s/tileMP':>12} "
        f"{'cpu s/effMP':>11} " + " ".join(f"{k + ' s/MP':>14}" for k in per_size)
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['tile']:>4} {r['batch']:>2} {r['wall_s_per_tile']['median']:>11.2f} "
            f"{r['cpu_s_per_tile']['median']:>10.2f} {r['cpu_s_per_tile_mp']:>12.1f} "
            f"{r['cpu_s_per_effective_mp']:>11.1f} "
            + " ".join(f"{v['cpu_s_per_mp']:>9.1f} ({v['tiles']:>2})" for v in r["requests"].values())
        )
    print("(request columns: process CPU seconds per output MP for an LR image of that size, (tiles))")
    return {"mode": "tile-sweep", "machine": machine(), "reps": args.reps, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Server vs raw backend
# ---------------------------------------------------------------------------------------------


def serve_vs_raw(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from service.manifest import read_manifest
    from service.pixels.imageops import resize_rgb
    from service.pixels.pipeline import run_sync

    model_dir = ensure_model(Path(args.model_dir), cache=args.cache, build=args.build)
    manifest = read_manifest(model_dir, verify=True)
    geo = manifest.tile
    inputs = []
    for name, img in photos(args.photos.split(",")):
        h, w = img.shape[:2]
        lr = resize_rgb(img, max(1, round(h / args.downscale)), max(1, round(w / args.downscale)))
        inputs.append((name, lr, png_bytes(lr)))
    info = machine()
    print(
        f"{info['cpu']}, {info['cores']} cores, load {info['loadavg_at_start']}; model {manifest.name} "
        f"tile {geo.tile} overlap {geo.overlap}, max_batch {args.max_batch}",
        flush=True,
    )

    backend = load_backend(model_dir, args.max_batch, args.threads)

    def raw_fn(batch: np.ndarray) -> np.ndarray:
        return backend.infer(0, np.ascontiguousarray(batch))

    raw_fn(np.zeros((1, geo.tile, geo.tile, 3), np.uint8))  # first call outside the timings, like warm-up

    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"gendr-speed-{port}.log"
    t_start = time.perf_counter()
    proc = start_server(model_dir, port, args.max_batch, args.threads, log_path)
    rows: list[dict[str, Any]] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=args.timeout) as client:
            ready_s = wait_ready(client, proc, args.timeout, log_path)
            print(f"gendr-serve ready on 127.0.0.1:{port} after {ready_s:.1f} s (load + warm-up)", flush=True)
            for rep in range(args.reps):
                for name, lr, body in inputs:
                    h, w = lr.shape[:2]
                    mp = 16 * h * w / 1e6
                    w0, c0 = time.perf_counter(), time.process_time()
                    out = run_sync(lr, 4 * h, 4 * w, geo, raw_fn, batch=args.max_batch)
                    raw_s, raw_cpu = time.perf_counter() - w0, time.process_time() - c0
                    assert out.shape == (4 * h, 4 * w, 3)
                    w0, c0 = time.perf_counter(), proc_cpu_seconds(proc.pid)
                    r = client.post(
                        "/upscale",
                        files={"image": (f"{name}.png", body, "image/png")},
                        data={"format": "png"},
                    )
                    srv_s, srv_cpu = time.perf_counter() - w0, proc_cpu_seconds(proc.pid) - c0
                    if r.status_code != 200:
                        raise SystemExit(f"POST /upscale {name}: {r.status_code} {r.text[:500]}")
                    timing = {
                        k.split(";")[0].strip(): float(k.split("dur=")[1])
                        for k in r.headers.get("server-timing", "").split(",")
                        if "dur=" in k
                    }
                    rows.append(
                        {
                            "photo": name,
                            "rep": rep,
                            "lr": f"{w}x{h}",
                            "out": f"{4 * w}x{4 * h}",
                            "out_mp": round(mp, 4),
                            "tiles": int(r.headers.get("x-tiles", 0) or 0),
                            "raw_s": round(raw_s, 3),
                            "raw_cpu_s": round(raw_cpu, 3),
                            "server_s": round(srv_s, 3),
                            "server_cpu_s": round(srv_cpu, 3),
                            "server_timing_ms": timing,
                            "bytes_out": len(r.content),
                        }
                    )
                    print(
                        f"{name:<10} {w}x{h} → {4 * w}x{4 * h}: raw {raw_s:6.2f} s ({raw_cpu:6.2f} CPU s), "
                        f"server {srv_s:6.2f} s ({srv_cpu:6.2f} CPU s; "
                        f"compute {timing.get('compute', float('nan')) / 1000:.2f} s, "
                        f"queue {timing.get('queue', float('nan')) / 1000:.2f} s)",
                        flush=True,
                    )
    finally:
        stop_server(proc)
        backend.close()
    total_mp = sum(r["out_mp"] for r in rows)
    raw_spmp = sum(r["raw_s"] for r in rows) / total_mp
    srv_spmp = sum(r["server_s"] for r in rows) / total_mp
    raw_cpu_spmp = sum(r["raw_cpu_s"] for r in rows) / total_mp
    srv_cpu_spmp = sum(r["server_cpu_s"] for r in rows) / total_mp
    summary = {
        "raw_s_per_mp": round(raw_spmp, 2),
        "server_s_per_mp": round(srv_spmp, 2),
        "server_over_raw": round(srv_spmp / raw_spmp, 3),
        "raw_cpu_s_per_mp": round(raw_cpu_spmp, 2),
        "server_cpu_s_per_mp": round(srv_cpu_spmp, 2),
        "server_over_raw_cpu": round(srv_cpu_spmp / raw_cpu_spmp, 3),
        "output_mp": round(total_mp, 3),
        "ready_s": round(ready_s, 1),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    print()
    print(
        f"raw backend (OnnxRuntimeBackend + run_sync): {raw_spmp:.1f} s per output MP "
        f"({raw_cpu_spmp:.1f} CPU s)"
    )
    print(
        f"through gendr-serve (HTTP, decode, queue, batcher, encode): {srv_spmp:.1f} s per output MP "
        f"({srv_cpu_spmp:.1f} CPU s)"
    )
    print(f"ratio server / raw: {srv_spmp / raw_spmp:.3f} wall, {srv_cpu_spmp / raw_cpu_spmp:.3f} CPU time")
    return {
        "mode": "serve-vs-raw",
        "machine": info,
        "model": manifest.name,
        "tile": geo.model_dump(),
        "max_batch": args.max_batch,
        "rows": rows,
        "summary": summary,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=f"models/{MODEL}", help="model repository entry to serve")
    p.add_argument("--build", action="store_true", help="run `gendr-build default` for --model-dir first")
    p.add_argument("--cache", type=Path, default=None, help="conversion cache (gendr-build default --cache)")
    p.add_argument(
        "--photos",
        default="astronaut,coffee,china",
        help="bundled photos (scikit-image names, china, flower)",
    )
    p.add_argument(
        "--downscale",
        type=float,
        default=4.0,
        help="photos are bicubic-downscaled by this before upscaling ×4 (default 4)",
    )
    p.add_argument("--max-batch", type=int, default=1, help="GENDR_MAX_BATCH and the raw run's batch")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    p.add_argument("--reps", type=int, default=1, help="rounds over the photos (or tiles)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for ready / a response")
    p.add_argument(
        "--tile-sweep", metavar="TILES", help="comma-separated LR tiles: run the tile sweep instead"
    )
    p.add_argument("--overlap", type=int, default=16, help="tile sweep overlap (default 16)")
    p.add_argument("--batches", default="1", help="tile sweep batch sizes, comma-separated (default 1)")
    p.add_argument(
        "--work-dir",
        default=str(Path(tempfile.gettempdir()) / "gendr-tile-sweep"),
        help="tile sweep: where the per-tile exports are kept (cached between runs)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    result = tile_sweep(args) if args.tile_sweep else serve_vs_raw(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
