"""benchmarks/host_pipeline.py --quick: real server processes at a GPU's engine speed, every stage of the
host's work accounted for. Nothing here depends on the machine's speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "host_pipeline.py"


def test_quick_run_reports_stages_and_cores_per_gpu(tmp_path: Path) -> None:
    out = tmp_path / "hp.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["cpu"] and report["cores"] >= 1 and "load_avg_before" in report
    rows = {r["model"]: r for r in report["rows"]}
    assert set(rows) == {"realesrgan", "gendr"}
    # the engine speeds derived from FLOPs and the H100's peak (issue 27: ≈130 and ≈25 MP/s)
    assert 120 < rows["realesrgan"]["engine_mp_s"] < 140 and 20 < rows["gendr"]["engine_mp_s"] < 30
    for r in rows.values():
        assert r["format"] == "png" and r["requests"] > 0 and r["errors"] == 0
        assert r["cpu_s_per_mp"] > 0 and r["cores_per_gpu"] > 0 and 0 <= r["engine_busy"] <= 1.05
        stages = r["stage_ms_per_mp"]
        for stage in ("read", "probe", "decode", "pad", "gather", "stitch", "encode", "write", "other"):
            assert stage in stages, stage
        assert stages["encode"] > 0 and stages["decode"] > 0
        assert abs(sum(r["stage_share"].values()) - 1) < 0.02
    assert rows["gendr"]["stage_ms_per_mp"]["colour_fix"] > 0  # GenDR's AdaIN default
