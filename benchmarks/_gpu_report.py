"""What the GPU checks share: a JSON report written after every row (a timeout loses nothing), the
GPU's name and dense tensor peak, and a time budget."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

# Dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L20": 119.5,
    "L4": 121.0,
    "A10": 125.0,
    "A10G": 125.0,
    "RTX 4090": 165.0,
}


def peak_for(name: str) -> float | None:
    best = None
    for key, v in PEAK_TFLOPS.items():
        if key in name and (best is None or len(key) > len(best[0])):
            best = (key, v)
    return best[1] if best else None


class Report:
    """A dict saved atomically to `path` whenever a row is added."""

    def __init__(self, path: Path, budget_s: float, **header: Any) -> None:
        self.path = path
        self.data: dict[str, Any] = {**header, "results": []}
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.save()

    def over_budget(self) -> bool:
        return time.monotonic() - self.started > self.budget_s

    def add(self, row: dict[str, Any]) -> None:
        self.data["results"].append(row)
        print(json.dumps(row, default=str), flush=True)
        self.save()

    def set(self, **kv: Any) -> None:
        self.data.update(kv)
        self.save()

    def save(self) -> None:
        self.data["wall_s"] = round(time.monotonic() - self.started, 1) if hasattr(self, "started") else 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)
