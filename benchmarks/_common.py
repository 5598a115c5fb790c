"""Shared bits of the runtime benchmarks: the tiny model repository and machine description."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CACHE = ROOT / ".cache" / "bench"


def machine() -> dict[str, object]:
    """CPU model and core count (lscpu), for the figures in docs/benchmarks.md."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "load_avg_1m": round(load, 2),
        "python": platform.python_version(),
    }


def tiny_repo(tile: int = 64, overlap: int = 16, name: str | None = None) -> Path:
    """models/ with the tiny random GenDR exported at `tile` (cached under .cache/bench)."""
    name = name or f"tiny{tile}"
    repo = CACHE / "models"
    if not (repo / name / "manifest.json").is_file():
        from engine_build.export.exporter import export_gendr
        from engine_build.gendr.checkpoint import make_tiny

        ckpt = make_tiny(CACHE / "ckpt-tiny", seed=0)
        export_gendr(ckpt, repo / name, tile=tile, overlap=overlap, precisions=("fp32",))
    return repo
