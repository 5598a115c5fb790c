"""The GPU check (`benchmarks/gpu_checks.sh`) runs end to end in --dry-run on the CPU, through the same
scripts and code paths it runs on a GPU (production torch backend, the service runtime and batcher,
export + TensorRT graph rules + ONNX Runtime parity), and writes its JSON after every row; a missing tool
(ModelOpt, scikit-image: the GPU machine has neither) skips its step with the reason; no row that did not
run on a GPU says ok; the summary names the backends a run exercised on the GPU and the ones it did not."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU_BACKENDS = {"tensorrt", "onnxruntime-cuda", "onnxruntime-trt", "torch"}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["results"]


def test_gpu_checks_dry_run_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env["GPU_CHECK_WITHOUT"] = ""  # the first engine run uses what this machine has
    r = subprocess.run(
        ["bash", "benchmarks/gpu_checks.sh", "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr + "".join(p.read_text() for p in tmp_path.glob("*.log"))
    torch_rows = _rows(tmp_path / "gpu_check_torch_dry_run.json")
    assert [row["batch"] for row in torch_rows] == [1, 2]
    assert all(row["ms_per_tile"] > 0 and row["gflop_per_tile"] > 0 for row in torch_rows)
    batcher = [row for row in _rows(tmp_path / "gpu_check_batcher_dry_run.json") if "instances" in row]
    assert [row["instances"] for row in batcher] == [1, 2]
    assert all(row["tiles_per_s"] > 0 and row["p95_s"] >= row["p50_s"] > 0 for row in batcher)
    engine = json.loads((tmp_path / "gpu_check_engine_dry_run.json").read_text())
    rules = {row["graph"]: row for row in engine["results"] if "trt_rules_problems" in row}
    assert set(rules) >= {"fp32", "fp16", "fp16-attn16"}
    (q,) = [row for row in engine["results"] if row.get("quantize") == "int8"]
    if importlib.util.find_spec("modelopt") is not None:  # this machine quantizes: int8 passes the rules
        assert q["status"] == "ok" and "int8" in rules
    else:
        assert q["status"] == "skipped" and "int8" not in rules
    assert all(row["status"] == "ok" and not row["trt_rules_problems"] for row in rules.values())
    parity = {
        row["graph"]: row["ort_cpu_vs_torch_fp32"]
        for row in engine["results"]
        if "ort_cpu_vs_torch_fp32" in row
    }
    assert parity["fp32"]["psnr_db"] >= 50 and parity["fp16"]["psnr_db"] >= 40
    # the engines did not run: a skipped row (dry run), never "ok"; TensorRT not exercised
    (engines,) = [row for row in engine["results"] if row.get("engine") == "all"]
    assert engines["status"] == "skipped" and "dry run" in engines["why"]
    assert engine["ok"] and engine["backends"]["tensorrt"]["exercised_on_gpu"] is False
    # as on the GPU machine: no ModelOpt, no scikit-image → int8 skipped with the reason, the rest goes on
    bare = json.loads(
        (tmp_path / "gpu_check_engine_dry_run_without_modelopt_without_skimage.json").read_text()
    )
    (q,) = [row for row in bare["results"] if row.get("quantize") == "int8"]
    assert q["status"] == "skipped" and "ModelOpt is not installed" in q["why"]
    later = {row["graph"] for row in bare["results"] if "ort_cpu_vs_torch_fp32" in row}
    assert (
        later == {"fp32", "fp16", "fp16-attn16"} and bare["ok"] and bare["without"] == ["modelopt", "skimage"]
    )
    summary = json.loads((tmp_path / "gpu_checks_summary.json").read_text())
    assert summary["exercised_on_gpu"] == [] and set(summary["not_exercised_on_gpu"]) == GPU_BACKENDS
    assert any("dry run" in why for why in summary["backends"]["torch"]["why"])
    assert "backends NOT exercised on the GPU: onnxruntime-cuda, onnxruntime-trt, tensorrt, torch" in r.stdout


def test_no_gpu_or_no_tensorrt_is_a_failed_engines_row_outside_the_dry_run() -> None:
    check = _load("gpu_check_engine")
    gpu = object()
    assert check.engines_unavailable(gpu, "11.4.0.106", dry_run=False) is None
    no_trt = check.engines_unavailable(gpu, None, dry_run=False)
    assert no_trt["status"] == "failed" and "no TensorRT here" in no_trt["error"]
    assert check.engines_unavailable(None, None, dry_run=False)["status"] == "failed"
    assert check.engines_unavailable(None, None, dry_run=True)["status"] == "skipped"


def test_summary_names_failed_rows_and_backends(tmp_path: Path) -> None:
    report = _load("_gpu_report")
    rep = report.Report(tmp_path / "gpu_check_engine.json", 60, tile=64)
    rep.add({"graph": "fp16", "status": "ok"})
    rep.add({"engine": "all", "status": "failed", "error": "no engine built or run: no TensorRT here"})
    rep.backend("tensorrt", False, "no TensorRT here")
    rep.set(ok=False)
    torch_rep = report.Report(tmp_path / "gpu_check_torch.json", 60)
    torch_rep.add({"batch": 1, "ms_per_tile": 3.0})
    torch_rep.add({"batch": 2, "skipped": "time budget"})
    torch_rep.backend("torch", True, "TorchBackend on cuda:0")
    s = report.summarize(tmp_path)
    engine, torch = s["checks"]["gpu_check_engine"], s["checks"]["gpu_check_torch"]
    assert engine["rows"] == {"ok": 1, "failed": 1, "skipped": 0} and engine["ok"] is False
    assert engine["failed_rows"][0]["error"].endswith("no TensorRT here")
    assert torch["rows"] == {"ok": 1, "failed": 0, "skipped": 1} and torch["ok"] is True
    assert s["exercised_on_gpu"] == ["torch"]
    assert s["not_exercised_on_gpu"] == ["onnxruntime-cuda", "onnxruntime-trt", "tensorrt"]
    assert s["backends"]["onnxruntime-cuda"]["why"] == ["no check runs it"]
    lines = report.summary_lines(s)
    assert "gpu_check_engine: FAILED (1 ok, 1 failed, 0 skipped rows)" in lines
    assert "backends exercised on the GPU: torch" in lines


def test_torch_check_records_each_rows_failure_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fp16 overflow (FloatingPointError) in one row, and in the FLOP count, stop nothing."""
    pytest.importorskip("torch")
    import numpy as np

    check = _load("gpu_check_torch")
    from engine_build.torch_backend import TorchBackend

    real_infer = TorchBackend.infer

    def infer(self: TorchBackend, instance: int, batch: np.ndarray) -> np.ndarray:
        if batch.shape[0] == 1:
            raise FloatingPointError("the network produced NaN/Inf (fp16 overflow?): batch failed")
        return real_infer(self, instance, batch)

    def flops(*_: object) -> float:
        raise FloatingPointError("the network produced NaN/Inf (fp16 overflow?): batch failed")

    monkeypatch.setattr(TorchBackend, "infer", infer)
    monkeypatch.setattr(check, "count_flops", flops)
    args = check.parse(["--dry-run", "--out", str(tmp_path)])
    data = check.run(args, tmp_path / "t.json")
    rows = json.loads((tmp_path / "t.json").read_text())["results"]
    assert [r["batch"] for r in rows] == [1, 2] and rows == data["results"]
    assert rows[0]["error"].startswith("FloatingPointError") and "ms_per_tile" not in rows[0]
    assert rows[1]["ms_per_tile"] > 0 and "error" not in rows[1] and "tflops" not in rows[1]
    assert all(r["flops_error"].startswith("FloatingPointError") for r in rows)
    assert data["ok"] is False and data["failed_rows"] == 1
    assert check.main(["--dry-run", "--out", str(tmp_path)]) == 1


def test_peak_table_matches_the_gpus_we_name() -> None:
    from_report = _load("_gpu_report")
    peak_for = from_report.peak_for
    assert peak_for("NVIDIA H100 80GB HBM3") == 989.0 and peak_for("NVIDIA H200") == 989.0
    assert (
        peak_for("NVIDIA A10") == 125.0 and peak_for("NVIDIA A10G") == 125.0 and peak_for("Tesla T4") is None
    )
