"""Seconds per tile of the CPU paths `auto` chooses between, measured where `gendr-build quantize` runs and
recorded with the CPU family (`quantization.speed` in the manifest).

Why record it: int8 pays off only on some CPUs (VNNI / AMX do int8 dot products at 2–16× the fp32 rate,
AVX2 saturates and gains little), and bf16 competes with it where there is a bf16 unit. The only honest
way to know which is fastest on a family is to measure there, so `auto` (service/backends/select.py)
serves int8 on a CPU only where a figure measured on that family says int8 is the fastest path — this
one, when the repository was quantized on such a CPU, or select.py's table of figures from
docs/benchmarks.md.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine_build.quantize.nncf_ptq import TileFn, ort_runner, ov_runner
from service.hardware import available_cpus, cpu_family, cpu_flags, cpu_model_name, cpu_units


def cpu_speed(fp32: Path, int8: Path, input_name: str, tiles: np.ndarray, reps: int = 3) -> dict[str, Any]:
    """Median wall seconds per tile (batch 1, all usable cores) of ort-fp32, ort-int8, ov-fp32, ov-int8 and,
    on CPUs with a bf16 unit, ov-bf16; configurations interleaved round by round (the machine may be
    shared), after one untimed call each. The family and flags say which CPUs the figure speaks for."""
    flags = cpu_flags()
    threads = available_cpus()
    fns: dict[str, TileFn] = {
        "ort-fp32": ort_runner(fp32, input_name, threads),
        "ort-int8": ort_runner(int8, input_name, threads),
        "ov-fp32": ov_runner(fp32, "f32", threads),
        "ov-int8": ov_runner(int8, "f32", threads),
    }
    units = cpu_units(flags)
    if "bf16" in units:
        fns["ov-bf16"] = ov_runner(fp32, "bf16", threads)
    for fn in fns.values():
        fn(tiles[:1])
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        x = tiles[r % len(tiles)][None]
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            times[k].append(time.perf_counter() - t0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "family": cpu_family(flags),
        "cpu": cpu_model_name(),
        "units": units,
        "threads": threads,
        "reps": reps,
        "load_avg_1m": None if load is None else round(load, 2),
        "s_per_tile": {k: round(statistics.median(v), 3) for k, v in times.items()},
    }
