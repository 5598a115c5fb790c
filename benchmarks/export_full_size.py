#!/usr/bin/env python
"""Full-size GenDR export on CPU (random weights): wall time and peak RSS of every step, as JSON.

Shows that the fused full-size graph exports (external data, checker, shape inference) and runs, and
gives the figures recorded in docs/export.md. Each step runs in its own Python process so its peak
RSS (ru_maxrss) is its own. Needs ~14 GB of disk and ~10 GB of RAM; on 2 cores the whole run takes
tens of minutes (most of it ONNX Runtime and PyTorch running 512² tiles of the full model).

    python benchmarks/export_full_size.py --work /tmp/gendr-full  # → benchmarks/results/export_full_size.json
    python benchmarks/export_full_size.py --steps checkpoint,export-fp32   # a subset

Steps (in order): checkpoint (random full-size checkpoint, safetensors), export-fp32, export-again
(idempotency: must be skipped), export-fp16, ort-fp32 (one 512² tile in ONNX Runtime CPU, parity
vs PyTorch fp32 on a real photo tile), ort-fp16, stages (three-stage export + ORT timing vs fused).
Nothing here runs in the default test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

STEPS = ["checkpoint", "export-fp32", "export-again", "export-fp16", "ort-fp32", "ort-fp16", "stages"]
ROOT = Path(__file__).resolve().parents[1]


def _rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)  # KiB on Linux


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _photo_tile(tile: int):
    from engine_build.verify.parity import builtin_photos, graph_input_tiles

    return graph_input_tiles(builtin_photos(("astronaut",)), tile, 1, 4, n=1, seed=0)


def run_step(step: str, work: Path, tile: int) -> dict:
    """Runs inside the child process; returns the step's figures."""
    sys.path.insert(0, str(ROOT))
    ckpt, model_dir = work / "checkpoint", work / "models" / "gendr-full"
    out: dict = {}
    t0 = time.perf_counter()
    if step == "checkpoint":
        from engine_build.gendr.checkpoint import save_checkpoint
        from engine_build.gendr.model import build_gendr, count_parameters

        m = build_gendr("gendr", seed=0)
        out["unet_params"], out["vae_params"] = count_parameters(m.unet), count_parameters(m.vae)
        save_checkpoint(m, ckpt)
        out["bytes"] = _dir_bytes(ckpt)
    elif step in ("export-fp32", "export-again", "export-fp16"):
        from engine_build.export.exporter import export_gendr

        precisions = ("fp32", "fp16") if step == "export-fp16" else ("fp32",)
        res = export_gendr(
            ckpt,
            model_dir,
            name="gendr-full",
            tile=tile,
            overlap=64,
            precisions=precisions,
            copy_checkpoint=False,
            force=step == "export-fp32",  # always a real (cold) export; export-again must skip
        )
        out["steps"] = [
            {"step": s.step, "skipped": s.skipped, "seconds": round(s.seconds, 2), "detail": s.detail}
            for s in res.steps
        ]
        for p, v in res.manifest.onnx.items():
            out[f"{p}_graph_bytes"] = v.graph.size
            out[f"{p}_external_data_bytes"] = v.external_data.size if v.external_data else 0
            out[f"{p}_options"] = v.options
    elif step in ("ort-fp32", "ort-fp16"):
        import numpy as np

        from engine_build.verify.parity import compare, onnx_runner, reference_net, torch_runner
        from service.manifest import read_manifest

        p = step.split("-")[1]
        manifest = read_manifest(model_dir, verify=False)
        x = _photo_tile(tile)
        t1 = time.perf_counter()
        runner = onnx_runner(model_dir, p, manifest=manifest)
        out["session_seconds"] = round(time.perf_counter() - t1, 2)
        t1 = time.perf_counter()
        y = runner(x)
        out["ort_seconds_per_tile"] = round(time.perf_counter() - t1, 2)
        out["ort_rss_gb"] = _rss_gb()
        del runner
        ref_file = work / "torch_ref.npy"
        if not ref_file.exists():
            t1 = time.perf_counter()
            ref = torch_runner(reference_net(model_dir, manifest, ckpt), geometry=manifest.tile)(x)
            out["torch_seconds_per_tile"] = round(time.perf_counter() - t1, 2)
            np.save(ref_file, ref)
        ref = np.load(ref_file)
        out["vs_torch_fp32"] = compare(y, ref)
    elif step == "stages":
        from export_stages import measure_stages

        from engine_build.gendr.checkpoint import load_checkpoint
        from service.manifest import read_manifest

        manifest = read_manifest(model_dir, verify=False)
        model = load_checkpoint(ckpt)
        out.update(measure_stages(model, tile, work / "stages", model_dir, _photo_tile(tile)))
    else:
        raise SystemExit(f"unknown step {step}")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_gb"] = _rss_gb()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gendr-full"), help="scratch folder (~14 GB)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export_full_size.json")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {STEPS}")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--step", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.step:
        print("RESULT " + json.dumps(run_step(args.step, args.work, args.tile)), flush=True)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    import onnx
    import torch

    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "load_avg_start": os.getloadavg(),
        },
        "tile": args.tile,
        "steps": {},
    }
    if args.out.exists():  # keep figures of steps not re-run
        try:
            result["steps"].update(json.loads(args.out.read_text()).get("steps", {}))
        except (json.JSONDecodeError, OSError):
            pass
    for step in [s for s in args.steps.split(",") if s]:
        print(f"== {step}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--step", step, "--work", str(args.work), "--tile", str(args.tile)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            result["steps"][step] = {
                "error": proc.stderr.strip().splitlines()[-1:] or ["failed"],
                "wall_seconds": round(time.perf_counter() - t0, 1),
            }
            print(f"   FAILED ({step})", flush=True)
        else:
            data = json.loads(line[len("RESULT ") :])
            data["wall_seconds"] = round(time.perf_counter() - t0, 1)
            result["steps"][step] = data
            print(
                "   " + json.dumps({k: v for k, v in data.items() if not isinstance(v, (dict, list))}),
                flush=True,
            )
        result["machine"]["load_avg_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
