"""benchmarks/scaleout.py --quick: every cell runs end to end on real processes (3 replicas, a real Redis),
and pull mode loses no job, SIGKILL included. Nothing here depends on the machine's speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "scaleout.py"
REDIS = Path("/usr/bin/redis-server")


def test_quick_run_reports_every_cell_and_pull_loses_nothing(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    if not REDIS.exists():
        pytest.skip("redis-server is not installed (.ci/install-system-packages.sh installs it)")
    out = tmp_path / "scaleout.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    data = json.loads(out.read_text())
    cells = {c["cell"]: c for c in data["cells"]}
    expected = {f"{m}-{x}" for m in ("push", "pull") for x in ("50", "90", "120", "90-sigkill")}
    assert set(cells) == expected
    for c in cells.values():
        assert c["offered_jobs"] > 0
        assert c["succeeded"] + c["lost"] == c["submitted"]
        assert len(c["busy_share"]) == 3
        assert c["statuses"].get("get_500", 0) == 0 and c["statuses"].get("post_500", 0) == 0
    for name in ("push-90-sigkill", "pull-90-sigkill"):
        assert len(cells[name]["kills"]) >= 1
    pull = [c for c in cells.values() if c["mode"] == "pull"]
    assert all(c["lost"] == 0 and c["submitted"] == c["offered_jobs"] for c in pull), {
        c["cell"]: c["lost_by"] for c in pull
    }
    assert all(c["statuses"].get("get_404", 0) == 0 for c in pull)
    assert [s["tiles"] for s in data["sizes"]] == data["tiles_by_mode"]["pull"]
    table = run.stdout
    for c in cells.values():
        assert f"| {c['mode']} | {round(100 * c['load'])} % |" in table
