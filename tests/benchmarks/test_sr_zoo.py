"""The model zoo harness on a subset of families, and the coverage table in docs/models.md.

Each served entry goes the whole way (benchmarks/sr_zoo_harness.py): safetensors checkpoint →
import-sr (context, ONNX, parity through the service backend at batch 2 and 1) → two photos of
different sizes served concurrently by the real runtime → compared with one whole-image PyTorch
forward. The subset covers a plain CNN, a window-attention transformer (trace fix for its window
merge, tile multiple 8), a scale-1 denoiser with a noise-map input and BatchNorm, a network with
shape-derived adaptive pooling, and an inpainting model that must be refused.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("spandrel")
pytest.importorskip("onnxruntime")

from engine_build.cli import main as build_main  # noqa: E402
from engine_build.commands.sr.common import MIN_PARITY_DB  # noqa: E402
from engine_build.sr.models import save_sr_checkpoint  # noqa: E402
from engine_build.sr.zoo import entries  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from sr_zoo_harness import SERVED_MIN_DB, run_entry  # noqa: E402
from sr_zoo_table import BEGIN, END, load_results, render_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "sr_zoo.json"

SERVED = ["Compact x2", "SwinIR x2 light", "DnCNN FDnCNN", "SAFMN x2"]


@pytest.mark.parametrize("key", SERVED)
def test_zoo_entry_is_served_and_tiles_do_not_show(key: str, tmp_path: Path) -> None:
    (entry,) = entries([key])
    r = run_entry(entry, tmp_path)
    assert r.status == "served", r.reason
    assert r.detected == "yes" and r.exported == "fp32"
    assert r.parity_db is not None and r.parity_db >= MIN_PARITY_DB
    assert r.served_db is not None and r.served_db >= SERVED_MIN_DB
    assert r.context_measured and r.tile and r.overlap is not None
    if r.context is not None:
        assert r.overlap >= min(4 * r.context, (r.tile - 1) // 2 - 1)
    assert r.tile % (r.multiple or 1) == 0
    if entry.arch == "SwinIR":
        assert r.multiple == 8


@pytest.fixture(scope="module")
def lama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (entry,) = entries(["LaMa"])
    return save_sr_checkpoint(
        entry.build().state_dict(),
        tmp_path_factory.mktemp("lama") / "big-lama.safetensors",
        architecture="LaMa",
        scale=1,
        source="tests",
        license="Apache-2.0",
    )


def test_inpainting_is_refused_with_one_line(lama_checkpoint: Path, tmp_path: Path, capsys) -> None:
    rc = build_main(["import-sr", str(lama_checkpoint), "--out", str(tmp_path / "lama")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len([ln for ln in err if ln.startswith("error:")]) == 1
    line = next(ln for ln in err if ln.startswith("error:"))
    assert "LaMa is not supported: inpainting" in line and "mask" in line
    assert not (tmp_path / "lama" / "manifest.json").exists()


def test_docs_table_is_the_one_the_stored_results_render() -> None:
    data = load_results(RESULTS)
    doc = (ROOT / "docs" / "models.md").read_text()
    table = doc.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == render_table(data).strip(), "docs/models.md is stale: run python benchmarks/sr_zoo.py"


def test_stored_results_cover_every_entry_with_an_outcome() -> None:
    data = load_results(RESULTS)
    rows = {(r["arch"], r["variant"]): r for r in data["results"]}
    for e in entries():
        r = rows.get((e.arch, e.variant))
        assert r is not None, f"{e.key} is missing from {RESULTS.name}: re-run benchmarks/sr_zoo.py"
        assert r["status"] in ("served", "refused", "failed")
        if r["status"] != "served":
            assert r["reason"], f"{e.key}: {r['status']} without a reason"
        else:
            assert r["served_db"] == "inf" or (
                r["served_db"] >= SERVED_MIN_DB and not math.isnan(r["served_db"])
            )
        if e.expect_refusal:
            assert r["status"] == "refused", f"{e.key} must be refused at import"
