"""CPU serving at the hardware's limit: peaks, FLOPs, efficiency, s/MP by size, threads × instances, HTTP.

    python benchmarks/cpu_efficiency.py --model-dir models/realesrgan-x4plus [--json out/cpu.json]

One run prints (configurations interleaved round by round, medians; load average recorded):
1. the cores' measured peaks: a 2048³ GEMM in ONNX Runtime (fp32 MatMul, u8×s8 MatMulInteger) and in
   OpenVINO (fp32, bf16);
2. FLOPs per tile counted from the graph's convolutions, per tile shape;
3. per configuration and tile shape: wall/CPU s per tile, achieved GFLOP/s and efficiency against the
   matching peak, PSNR against ONNX Runtime fp32 on real-photo tiles;
4. CPU s and wall s per output MP for small (128×150), medium (320×240) and large (1000×1000) inputs
   through the service's tiling (`run_sync`); large only for --large configurations (minutes otherwise);
5. instances × intra-op threads for the default model;
6. the served-vs-raw ratio through HTTP for what `auto` serves here;
and writes the plot and the fp32/int8/bf16 crop picture for docs/benchmarks.md.
Configurations: ort-fp32 (today's default), the repository's int8 graph in ONNX Runtime (`ort-int8-<tool>`)
and, when NNCF made it, in OpenVINO (`ov-int8-nncf`), ov-fp32, ov-bf16 (OpenVINO; on CPUs without a bf16
unit OpenVINO would emulate it: left out), plus any `--graph LABEL=PATH` ONNX graph run in ONNX Runtime.
Every row names the CPU family (service/hardware.py: cpu_family) whose figures it is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, machine
from _cpu_measure import (
    Peaks,
    crop_picture,
    graph_with_tile,
    ort_fn,
    ov_fn,
    plot_s_per_mp,
    psnr,
    tile_flops,
)

SIZES = {"small 128×150": (150, 128), "medium 320×240": (240, 320), "large 1000×1000": (1000, 1000)}
PEAK_OF = {"ort-fp32": "ort-fp32", "ov-fp32": "ov-fp32", "ov-bf16": "ov-bf16", "ov-int8-nncf": "ov-int8"}
TOOL_LABEL = {"nncf": "nncf", "onnxruntime.quantization": "ortq", "nvidia-modelopt": "modelopt"}


def family() -> str:
    from service.hardware import cpu_family, cpu_flags

    return cpu_family(cpu_flags())


def flags() -> list[str]:
    from service.hardware import cpu_flags

    want = (
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
    )
    have = cpu_flags()
    return [f for f in want if f in have]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def timed(fn: Any, x: np.ndarray) -> tuple[float, float, np.ndarray]:
    w0, c0 = time.perf_counter(), time.process_time()
    y = fn(x)
    return time.perf_counter() - w0, time.process_time() - c0, y


def make_fns(
    model_dir: Path, manifest: Any, tile: int, threads: int, extra: dict[str, Path]
) -> dict[str, Any]:
    fp32 = model_dir / manifest.onnx["fp32"].graph.path
    g = graph_with_tile(fp32, tile, manifest.tile.graph_scale) if tile != manifest.tile.tile else fp32
    from service.backends.openvino import bf16_flags

    fns: dict[str, Any] = {"ort-fp32": ort_fn(g, threads)[0]}
    int8 = manifest.onnx.get("int8") if tile == manifest.tile.tile else None
    tool = TOOL_LABEL.get(str((int8.quantization or {}).get("tool")), "int8") if int8 else ""
    if int8 is not None:
        fns[f"ort-int8-{tool}"] = ort_fn(model_dir / int8.graph.path, threads)[0]
    if tile == manifest.tile.tile:
        for label, path in extra.items():
            fns[label] = ort_fn(path, threads)[0]
    try:
        fns["ov-fp32"] = ov_fn(g, "f32", threads)[0]
        if bf16_flags():  # without a bf16 unit OpenVINO emulates bf16 (slower than fp32): not a path
            fns["ov-bf16"] = ov_fn(g, "bf16", threads)[0]
        if int8 is not None and tool == "nncf":
            fns["ov-int8-nncf"] = ov_fn(model_dir / int8.graph.path, "f32", threads)[0]
    except ImportError:
        pass
    return fns


def per_tile(args: argparse.Namespace, manifest: Any, photos: list, peaks: dict[str, float]) -> list[dict]:
    from engine_build.verify.parity import graph_input_tiles

    model_dir = Path(args.model_dir)
    rows: list[dict] = []
    fp32 = model_dir / manifest.onnx["fp32"].graph.path
    for tile in args.tiles:
        flop = tile_flops(graph_with_tile(fp32, tile, manifest.tile.graph_scale))
        fns = make_fns(model_dir, manifest, tile, args.threads, args.extra)
        x = graph_input_tiles(
            photos, tile, manifest.tile.graph_scale, manifest.native_scale, args.reps + 1, seed=5
        )
        outs = {k: fn(x[:1]) for k, fn in fns.items()}  # warm-up, and the outputs compared below
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
        round_peaks: list[dict[str, float]] = []
        for r in range(args.reps):
            round_peaks.append({k: max(v.values()) for k, v in args.peaks_rt.measure().items()})
            for k, fn in fns.items():  # interleaved: every configuration (and the peaks) once per round
                w, c, y = timed(fn, x[r + 1 : r + 2])
                times[k].append((w, c))
                outs[k] = np.concatenate([outs[k], y])
        for k in fns:
            wall = statistics.median(t[0] for t in times[k])
            cpu = statistics.median(t[1] for t in times[k])
            pk = PEAK_OF.get(k, "ort-int8" if "int8" in k else "ort-fp32")
            # the peak measured in the same rounds as the tiles (the machine is shared)
            peak = (
                statistics.median(p.get(pk, float("nan")) for p in round_peaks) if round_peaks else peaks[pk]
            )
            row = {
                "cpu_family": args.family,
                "config": k,
                "tile": f"{tile}→{tile * manifest.tile.graph_scale}",
                "gflop_per_tile": round(flop / 1e9, 1),
                "wall_s": round(wall, 3),
                "cpu_s": round(cpu, 3),
                "gflops": round(flop / wall / 1e9, 1),
                "peak_gflops": round(peak, 1),
                "efficiency": round(flop / wall / 1e9 / peak, 3),
                "psnr_vs_ort_fp32": psnr(outs[k], outs["ort-fp32"]),
            }
            rows.append(row)
            print(
                f"  [{args.family}] {k:<16} tile {row['tile']:<8} {row['gflop_per_tile']:7.1f} GFLOP  "
                f"wall {wall:6.2f} s  "
                f"CPU {cpu:6.2f} s  {row['gflops']:7.1f} GFLOP/s = {100 * row['efficiency']:5.1f}% of "
                f"{row['peak_gflops']:.0f}  PSNR {row['psnr_vs_ort_fp32']} dB",
                flush=True,
            )
    return rows


def sizes(args: argparse.Namespace, manifest: Any, photos: list) -> list[dict]:
    from service.pixels.imageops import resize_rgb
    from service.pixels.pipeline import run_sync

    fns = make_fns(Path(args.model_dir), manifest, manifest.tile.tile, args.threads, {})
    s = manifest.native_scale
    rows = []
    for size, (h, w) in SIZES.items():
        img = resize_rgb(photos[0][1], h, w)
        cfgs = [k for k in fns if "large" not in size or k in args.large]
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in cfgs}
        for _ in range(args.size_reps if "small" in size else 1):
            for k in cfgs:
                w0, c0 = time.perf_counter(), time.process_time()
                run_sync(img, s * h, s * w, manifest.tile, fns[k], batch=1, color_fix="none")
                res[k].append((time.perf_counter() - w0, time.process_time() - c0))
        mp = s * s * h * w / 1e6
        for k in cfgs:
            wall = statistics.median(t[0] for t in res[k])
            cpu = statistics.median(t[1] for t in res[k])
            rows.append(
                {
                    "cpu_family": args.family,
                    "size": size,
                    "config": k,
                    "out_mp": round(mp, 2),
                    "wall_s_per_mp": round(wall / mp, 2),
                    "cpu_s_per_mp": round(cpu / mp, 2),
                    "load": load(),
                }
            )
            print(f"  {size:<16} {k:<10} {wall / mp:7.2f} wall s/MP  {cpu / mp:7.2f} CPU s/MP", flush=True)
    return rows


def threads_instances(args: argparse.Namespace, manifest: Any, photos: list) -> list[dict]:
    """Tiles/s with every instance busy: instances × threads-per-instance filling the cores."""
    from engine_build.verify.parity import graph_input_tiles

    fp32 = Path(args.model_dir) / manifest.onnx["fp32"].graph.path
    cores = len(os.sched_getaffinity(0))
    x = graph_input_tiles(photos, manifest.tile.tile, manifest.tile.graph_scale, manifest.native_scale, 1)
    layouts = [(i, cores // i) for i in (1, 2, 4) if i <= cores and cores % i == 0]
    makers = {"ort-fp32": lambda i, t: ort_fn(fp32, t, sessions=i)}
    try:
        import openvino  # noqa: F401

        makers["ov-bf16"] = lambda i, t: ov_fn(fp32, "bf16", t, streams=i)
    except ImportError:
        pass
    rows = []
    for k, make in makers.items():
        for inst, thr in layouts:
            fns = make(inst, thr)
            for fn in fns:
                fn(x)
            per = args.ti_tiles
            t0 = time.perf_counter()
            ths = [threading.Thread(target=lambda f=f, n=per: [f(x) for _ in range(n)]) for f in fns]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            tps = inst * per / (time.perf_counter() - t0)
            rows.append({"config": k, "instances": inst, "threads": thr, "tiles_per_s": round(tps, 3)})
            print(f"  {k:<10} {inst} instance(s) × {thr} thread(s): {tps:.3f} tiles/s", flush=True)
    return rows


def served_vs_raw(args: argparse.Namespace, manifest: Any, photos: list) -> dict[str, Any]:
    """What `auto` serves here, through gendr-serve (HTTP) and in process, the same photos alternating."""
    import httpx
    from _default_speed_setup import free_port, png_bytes, proc_cpu_seconds, stop_server, wait_ready

    from service.backends import select
    from service.pixels.imageops import resize_rgb
    from service.pixels.pipeline import run_sync
    from service.settings import Settings

    model_dir = Path(args.model_dir).resolve()
    env = dict(os.environ)
    env.update(
        {
            "GENDR_MODEL_REPOSITORY": str(model_dir.parent),
            "GENDR_MODELS": model_dir.name,
            "GENDR_MAX_BATCH": "1",
            "GENDR_DEFAULT_DEADLINE_S": "600",
        }
    )
    settings = Settings(model_repository=model_dir.parent, max_batch=1)
    backend, reason = select.create_backend(manifest, model_dir, settings)
    backend.load()
    raw = lambda b: backend.infer(0, np.ascontiguousarray(b))  # noqa: E731
    raw(np.zeros((1, manifest.tile.tile, manifest.tile.tile, 3), np.uint8))
    import subprocess
    import tempfile

    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"gendr-cpu-eff-{port}.log"
    exe = Path(sys.executable).with_name("gendr-serve")
    cmd = [str(exe), "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=str(ROOT))
    s = manifest.native_scale
    sums = {"raw": 0.0, "raw_cpu": 0.0, "srv": 0.0, "srv_cpu": 0.0, "mp": 0.0}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=900) as client:
            ready = wait_ready(client, proc, 300, log_path)
            served = client.get("/v1/models").json()
            for _ in range(args.http_reps):
                for _, img in photos[:2]:
                    lr = resize_rgb(img, 128, 150)
                    w0, c0 = time.perf_counter(), time.process_time()
                    run_sync(lr, s * 128, s * 150, manifest.tile, raw, batch=1)
                    sums["raw"] += time.perf_counter() - w0
                    sums["raw_cpu"] += time.process_time() - c0
                    w0, c0 = time.perf_counter(), proc_cpu_seconds(proc.pid)
                    r = client.post("/upscale", files={"image": ("p.png", png_bytes(lr), "image/png")})
                    r.raise_for_status()
                    sums["srv"] += time.perf_counter() - w0
                    sums["srv_cpu"] += proc_cpu_seconds(proc.pid) - c0
                    sums["mp"] += s * s * 128 * 150 / 1e6
    finally:
        stop_server(proc)
        backend.close()
    mp = sums["mp"]
    out = {
        "backend": backend.info.name,
        "precision": backend.info.precision,
        "reason": reason,
        "served_models": served,
        "ready_s": round(ready, 1),
        "raw_wall_s_per_mp": round(sums["raw"] / mp, 2),
        "served_wall_s_per_mp": round(sums["srv"] / mp, 2),
        "raw_cpu_s_per_mp": round(sums["raw_cpu"] / mp, 2),
        "served_cpu_s_per_mp": round(sums["srv_cpu"] / mp, 2),
        "served_over_raw_wall": round(sums["srv"] / sums["raw"], 3),
        "served_over_raw_cpu": round(sums["srv_cpu"] / sums["raw_cpu"], 3),
    }
    print(f"  {json.dumps({k: v for k, v in out.items() if k != 'served_models'})}", flush=True)
    return out


def pictures(
    args: argparse.Namespace, manifest: Any, photos: list, size_rows: list[dict], info: dict
) -> None:
    from engine_build.verify.parity import graph_input_tiles

    fns = make_fns(Path(args.model_dir), manifest, manifest.tile.tile, args.threads, {})
    g = manifest.tile
    x = graph_input_tiles(photos, g.tile, g.graph_scale, manifest.native_scale, 12, 11)
    x = x[int(np.argmax([float(np.abs(np.diff(t.astype(np.float32), axis=0)).mean()) for t in x]))][None]
    o, c = g.out_tile, 160  # the most detailed of 12 photo tiles; a 160² crop of its centre
    sl = slice((o - c) // 2, (o + c) // 2)
    keep = ("ort-fp32", "ov-int8-nncf", "ort-int8-ortq", "ov-bf16")
    outs = {k: fns[k](x)[0][sl, sl] for k in keep if k in fns}
    crop_picture(outs, Path(args.crop_png))
    title = f"{info['cpu']}, {info['cores']} cores — {manifest.name}, tile {manifest.tile.tile}"
    if plot_s_per_mp(size_rows, Path(args.plot_png), title):
        print(f"wrote {args.crop_png} and {args.plot_png}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default="models/realesrgan-x4plus")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--tiles", type=lambda s: [int(v) for v in s.split(",")], default=[64, 96, 128])
    p.add_argument("--reps", type=int, default=3, help="rounds of the per-tile measurement")
    p.add_argument("--size-reps", type=int, default=2, help="rounds for the small input (others: one)")
    p.add_argument("--large", type=lambda s: s.split(","), default=["ov-bf16"], help="configs run at 1000²")
    p.add_argument(
        "--ti-tiles", type=int, default=2, help="tiles per instance in the threads × instances run"
    )
    p.add_argument("--http-reps", type=int, default=2)
    p.add_argument("--graph", action="append", default=[], metavar="LABEL=PATH", help="extra ORT graph")
    p.add_argument("--skip", default="", help="comma list of sections to skip: tiles,sizes,ti,http,pictures")
    p.add_argument("--crop-png", default="docs/cpu-int8-crop.png")
    p.add_argument("--plot-png", default="docs/cpu-s-per-mp.png")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.extra = {k: Path(v) for k, v in (g.split("=", 1) for g in args.graph)}
    skip = set(args.skip.split(","))

    from engine_build.verify.parity import builtin_photos
    from service.manifest import read_manifest

    manifest = read_manifest(Path(args.model_dir), verify=True)
    photos = builtin_photos()
    args.family = family()
    info = machine() | {"flags": flags(), "family": args.family, "threads": args.threads}
    t_start = time.perf_counter()
    print(f"{info}\nmodel {manifest.name}: tile {manifest.tile.tile}, precisions {sorted(manifest.onnx)}")
    result: dict[str, Any] = {"machine": info, "model": manifest.name}
    print(
        "1. peaks (GEMM 1024³/2048³, 3×3 conv 256→256 on 64², 512→512 on 48²; GFLOP/s, int8: 2 ops per MAC):"
    )
    peaks_rt = Peaks(args.threads)
    rounds = [peaks_rt.measure() for _ in range(args.reps)]
    kernels = {k: {n: statistics.median(r[k][n] for r in rounds) for n in rounds[0][k]} for k in rounds[0]}
    result["peak_kernels"] = kernels
    result["peaks"] = peaks = {k: max(v.values()) for k, v in kernels.items()}
    args.peaks_rt = peaks_rt
    print(f"  {kernels}\n  peak per runtime/precision: {peaks}  load {load()}", flush=True)
    if "tiles" not in skip:
        print("2./3. per tile (median of interleaved rounds):", flush=True)
        result["tiles"] = per_tile(args, manifest, photos, peaks)
    if "sizes" not in skip:
        print("4. s per output MP by input size (run_sync, batch 1):", flush=True)
        result["sizes"] = sizes(args, manifest, photos)
    if "ti" not in skip:
        print("5. instances × intra-op threads:", flush=True)
        result["threads_instances"] = threads_instances(args, manifest, photos)
    if "http" not in skip:
        print("6. served (gendr-serve, HTTP) vs raw backend, what `auto` serves here:", flush=True)
        result["http"] = served_vs_raw(args, manifest, photos)
    if "pictures" not in skip:
        pictures(args, manifest, photos, result.get("sizes", []), info)
    result["load_end"] = load()
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    print(f"done in {result['elapsed_s']} s; load average {info['load_avg_1m']} → {result['load_end']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
