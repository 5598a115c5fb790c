"""The GPU check (`benchmarks/gpu_checks.sh`) runs end to end in --dry-run on the CPU, through the same
scripts and code paths it runs on a GPU (production torch backend, the service runtime and batcher,
export + TensorRT graph rules + ONNX Runtime parity), and writes its JSON after every row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_checks_dry_run_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr + "".join(p.read_text() for p in tmp_path.glob("*.log"))
    torch_rows = json.loads((tmp_path / "gpu_check_torch_dry_run.json").read_text())["results"]
    assert [row["batch"] for row in torch_rows] == [1, 2]
    assert all(row["ms_per_tile"] > 0 and row["gflop_per_tile"] > 0 for row in torch_rows)
    batcher = json.loads((tmp_path / "gpu_check_batcher_dry_run.json").read_text())["results"]
    assert [row["instances"] for row in batcher] == [1, 2]
    assert all(row["tiles_per_s"] > 0 and row["p95_s"] >= row["p50_s"] > 0 for row in batcher)
    engine = json.loads((tmp_path / "gpu_check_engine_dry_run.json").read_text())
    rules = {
        row["graph"]: row["trt_rules_problems"] for row in engine["results"] if "trt_rules_problems" in row
    }
    assert set(rules) >= {"fp32", "fp16", "fp16-attn16", "int8"} and not any(rules.values())
    parity = {
        row["graph"]: row["ort_cpu_vs_torch_fp32"]
        for row in engine["results"]
        if "ort_cpu_vs_torch_fp32" in row
    }
    assert parity["fp32"]["psnr_db"] >= 50 and parity["fp16"]["psnr_db"] >= 40
    assert engine["ok"] and engine["engines_skipped"] == "dry run"


def test_peak_table_matches_the_gpus_we_name() -> None:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _gpu_report import peak_for

    assert peak_for("NVIDIA H100 80GB HBM3") == 989.0 and peak_for("NVIDIA H200") == 989.0
    assert (
        peak_for("NVIDIA A10") == 125.0 and peak_for("NVIDIA A10G") == 125.0 and peak_for("Tesla T4") is None
    )
