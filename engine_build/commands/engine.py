"""`gendr-build engine`: TensorRT engine for this machine's GPU into the model repository."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine_build.gpu_targets import TARGET_GPUS
from service.manifest import PRECISIONS


def _ints(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {value!r}") from e


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "engine",
        help="build the TensorRT engines (fp16/int8/fp8) of a precision for the GPU of this machine",
        description="Strongly typed TensorRT builds from the repository's ONNX graphs of that precision: one "
        "static-tile plan per tile they cover (the primary tile and every shape bucket), batch profiles, "
        "persistent timing cache; writes engines/sm<cc>/<precision>/ and one manifest entry per tile.",
    )
    p.add_argument("--model", required=True, type=Path, help="model folder, e.g. models/gendr")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument(
        "--target-gpu",
        "--gpu",
        dest="target_gpu",
        choices=["auto", *TARGET_GPUS],
        default="auto",
        help="node pool the engine is for; must match this machine's GPU (auto: whatever is present)",
    )
    p.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4, 8], help="comma list (default 1,2,4,8)")
    p.add_argument(
        "--tile", type=int, help="build only this tile's engine (one the graphs cover; default: every tile)"
    )
    p.add_argument(
        "--profiles",
        type=int,
        default=1,
        help="identical [min..max] optimisation profiles (default 1: TensorRT 10/11 contexts share one)",
    )
    p.add_argument(
        "--opt-batch", type=int, help="batch size the profiles are tuned for (default: the largest)"
    )
    p.add_argument("--workspace-gb", type=float, help="builder workspace limit (default: TensorRT's)")
    p.add_argument("--opt-level", type=int, default=3, choices=range(0, 6), help="builder optimisation level")
    p.add_argument(
        "--timing-cache", type=Path, help="timing cache file (default: MODEL/engines/sm<cc>/timing.cache)"
    )
    p.add_argument("--device", type=int, default=0, help="CUDA device index")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_engine)


def cmd_engine(args: argparse.Namespace) -> int:
    from engine_build.trt.build import build_engine
    from service.manifest import ManifestError

    try:
        res = build_engine(
            args.model,
            precision=args.precision,
            target_gpu=args.target_gpu,
            batch_sizes=args.batch_sizes,
            tile=args.tile,
            profiles=args.profiles,
            opt_batch=args.opt_batch,
            workspace_gb=args.workspace_gb,
            opt_level=args.opt_level,
            timing_cache=args.timing_cache,
            force=args.force,
            progress=not args.no_progress,
            device_id=args.device,
        )
    except ManifestError as e:  # build errors: engine_build.cli maps every BuildError to exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    for t in res.tiles:
        e = t.engine
        state = "up to date (skipped)" if t.skipped else f"built in {t.seconds:.0f} s"
        print(
            f"{e.precision} engine, {t.tile}-px tiles, for {e.gpu_name} "
            f"(sm_{e.compute_capability.replace('.', '')}): {e.plan.path} {state}"
        )
    return 0
