"""benchmarks/int8_error_budget.py on the photo-like ×4 test network: every variant measured in exact
arithmetic and in this CPU's kernels, the error split by source, a verdict per CPU family. No figure
here depends on the machine's speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("nncf")
pytest.importorskip("openvino")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "engine_build" / "quantize"))

from test_quantize_cpu import photo_repo  # noqa: E402, F401  (the photo-like ×4 test network)


def test_budget_per_variant_source_and_family(photo_repo: Path, tmp_path: Path) -> None:  # noqa: F811
    import int8_error_budget

    out = tmp_path / "budget.json"
    assert int8_error_budget.main(["--model-dir", str(photo_repo), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    variants = report["variants"]
    assert set(variants) == {"w7", "w8", "w8-eq"}
    assert variants["w7"]["weight_bits"] == 7 and variants["w8-eq"]["equalized_groups"] == 2
    for row in variants.values():
        assert {"exact", "openvino", "onnxruntime"} <= set(row) and all(
            10 < row[k] <= 99 for k in ("exact", "openvino", "onnxruntime")
        )
    budget = report["budget"]
    best = budget["variant"]
    assert variants[best]["exact"] == max(v["exact"] for v in variants.values())  # the best one is split
    assert budget["both"] == variants[best]["exact"]
    # taking a noise source away does not make the output worse
    for part in ("weights_only", "activations_only", "activations_but_after_activation_fns"):
        assert budget[part] >= budget["both"] - 0.5, (part, budget)
    families = {f["family"]: f for f in report["families"]}
    assert set(families) == {"amx", "avx512_bf16", "vnni", "avx2"}
    for fam in ("amx", "avx512_bf16", "vnni"):  # exact integer sums: one figure for all three
        assert families[fam]["psnr_db"] == variants[best]["exact"]
    for f in families.values():
        assert f["passes"] == (f["psnr_db"] is not None and f["psnr_db"] >= 40.0)
    # PhotoNet has no residual-in-residual blocks: the frontier is the best variant alone
    (point,) = report["frontier"]
    assert point["float_blocks"] == 0 and 0 < point["float_mac_share"] < 1
    share = point["float_mac_share"]
    assert point["max_speedup_int8_free"] == round(1 / share, 2) and 1 < point["max_speedup_k4"] < 4
