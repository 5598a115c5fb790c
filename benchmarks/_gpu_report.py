"""What the GPU checks share: a JSON report written after every row (a timeout loses nothing), the
GPU's name and dense tensor peak, a time budget, which backends each check ran on the GPU, and the
summary of a whole run (`python benchmarks/_gpu_report.py OUT`, the last step of gpu_checks.sh).

A row fails when its `status` is "failed", its `ok` is False or it has an `error`; it is skipped when its
`status` is "skipped" (or it says `skipped`). A backend counts as exercised on the GPU only where a check
says so (`Report.backend`): a run on the CPU, or a skipped step, never does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

#: The backends a GPU can serve with (service/backends/select.py's names): the summary names each.
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-trt", "torch")
SUMMARY_FILE = "gpu_checks_summary.json"

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

    def backend(self, name: str, exercised_on_gpu: bool, why: str) -> None:
        """Record whether this check ran backend `name` on a GPU, and how (or why not)."""
        self.data.setdefault("backends", {})[name] = {"exercised_on_gpu": exercised_on_gpu, "why": why}
        self.save()

    def save(self) -> None:
        self.data["wall_s"] = round(time.monotonic() - self.started, 1) if hasattr(self, "started") else 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def row_state(row: dict[str, Any]) -> str:
    """ok, failed or skipped (module docstring)."""
    if row.get("status") == "failed" or row.get("ok") is False or "error" in row:
        return "failed"
    if row.get("status") == "skipped" or "skipped" in row or "skipped" in row.values():
        return "skipped"
    return "ok"


def summarize(out: Path) -> dict[str, Any]:
    """Every check's JSON in `out` → rows per state, failed rows, and each GPU backend exercised or not
    (with every check's reason); written to `out`/SUMMARY_FILE."""
    checks: dict[str, Any] = {}
    backends: dict[str, dict[str, Any]] = {b: {"exercised_on_gpu": False, "why": []} for b in GPU_BACKENDS}
    for path in sorted(out.glob("gpu_check_*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            checks[path.stem] = {"ok": False, "error": f"unreadable: {e}"}
            continue
        rows = data.get("results", [])
        states = [row_state(r) for r in rows]
        failed = [r for r, st in zip(rows, states, strict=True) if st == "failed"]
        checks[path.stem] = {
            "ok": bool(data.get("ok", True)) and not failed and "results" in data,
            "rows": {st: states.count(st) for st in ("ok", "failed", "skipped")},
            "failed_rows": [{k: v for k, v in r.items() if k != "traceback"} for r in failed],
        }
        for name, rec in data.get("backends", {}).items():
            b = backends.setdefault(name, {"exercised_on_gpu": False, "why": []})
            b["exercised_on_gpu"] = b["exercised_on_gpu"] or bool(rec.get("exercised_on_gpu"))
            b["why"].append(f"{path.stem}: {rec.get('why', '')}")
    for b in backends.values():
        b["why"] = b["why"] or ["no check runs it"]
    summary = {
        "checks": checks,
        "backends": backends,
        "exercised_on_gpu": sorted(n for n, b in backends.items() if b["exercised_on_gpu"]),
        "not_exercised_on_gpu": sorted(n for n, b in backends.items() if not b["exercised_on_gpu"]),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for name, c in summary["checks"].items():
        verdict = "ok" if c["ok"] else "FAILED"
        counts = ", ".join(f"{n} {st}" for st, n in c.get("rows", {}).items())
        lines.append(f"{name}: {verdict} ({counts} rows)")
        lines += [f"  failed: {json.dumps(r, default=str)[:300]}" for r in c.get("failed_rows", [])]
    for label, key in (
        ("exercised on the GPU", "exercised_on_gpu"),
        ("NOT exercised on the GPU", "not_exercised_on_gpu"),
    ):
        names = summary[key]
        lines.append(f"backends {label}: {', '.join(names) or 'none'}")
        lines += [f"  {n}: {'; '.join(summary['backends'][n]['why'])}" for n in names]
    return lines


if __name__ == "__main__":
    print("\n".join(summary_lines(summarize(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))))
