"""`verify`: ONNX Runtime vs the PyTorch reference on real photos (tiles and whole images)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine_build.verify.parity import (
    VerifyReport,
    compare,
    failures,
    graph_input_tiles,
    load_photos,
    parse_thresholds,
    verify_model,
)

pytest.importorskip("torch")

# Bounds for the tiny random GenDR (docs/export.md, "Parity"): measured worst case on these photos,
# minus a margin. fp32 is the 50 dB (measured 72–84 dB, max |err| 1). fp16 measured 51–56 dB
# → 45 dB. int8 measured 14.8–20.6 dB: an untrained random UNet is chaotic (its outputs for two
# unrelated tiles differ by ≈13 dB), so this bound only shows the Q/DQ graph tracks the reference;
# the toy network below (image-like output) carries the meaningful int8 bound.
FP32_MIN_DB, FP16_MIN_DB, INT8_MIN_DB = 50.0, 45.0, 12.0


def test_report_covers_tiles_and_whole_images_per_precision(tiny_report: VerifyReport) -> None:
    levels = {(r.precision, r.level) for r in tiny_report.rows}
    assert levels == {(p, lv) for p in ("fp32", "fp16", "int8") for lv in ("tile", "image")}
    img = next(r for r in tiny_report.rows if r.level == "image")
    assert img.shape == "200x200" and img.name.startswith("chelsea-crop 50x50")  # LR ×4 → 200²


def test_fp32_parity_at_least_50db(tiny_report: VerifyReport) -> None:
    w = tiny_report.worst()["fp32"]
    assert w["min_psnr_db"] >= FP32_MIN_DB, tiny_report.table()
    assert w["max_abs_err"] <= 2


def test_fp16_and_int8_within_measured_bounds(tiny_report: VerifyReport) -> None:
    worst = tiny_report.worst()
    assert worst["fp16"]["min_psnr_db"] >= FP16_MIN_DB, tiny_report.table()
    assert worst["int8"]["min_psnr_db"] >= INT8_MIN_DB, tiny_report.table()
    # ordering that must hold whatever the weights: fp32 ≥ fp16 ≥ int8
    assert worst["fp32"]["min_psnr_db"] >= worst["fp16"]["min_psnr_db"] >= worst["int8"]["min_psnr_db"]


def test_table_and_json(tiny_report: VerifyReport, tmp_path: Path) -> None:
    table = tiny_report.table()
    assert "max|err|" in table and "PSNR dB" in table and "fp32      worst" in table
    data = json.loads(tiny_report.save(tmp_path / "v.json").read_text())
    assert data["model"] == "tiny" and len(data["rows"]) == len(tiny_report.rows)
    assert set(data["worst"]) == {"fp32", "fp16", "int8"}
    assert {"max_abs_err", "mean_abs_err", "psnr_db", "level", "precision"} <= set(data["rows"][0])


def test_verify_cli_prints_table_writes_json_and_checks_thresholds(
    tiny_repo: Path, small_photos, tmp_path: Path, capsys
) -> None:
    from engine_build.cli import main

    imgs = tmp_path / "photos"
    imgs.mkdir()
    Image.fromarray(small_photos[0][1]).save(imgs / "cat.png")
    out = tmp_path / "report.json"
    args = [
        "verify",
        "--model",
        str(tiny_repo),
        "--precision",
        "fp32",
        "--images",
        str(imgs),
        "--tiles",
        "2",
        "--whole",
        "1",
        "--json",
        str(out),
    ]
    assert main([*args, "--min-psnr", "fp32=50"]) == 0
    text = capsys.readouterr().out
    assert "fp32      tile" in text and "fp32      image" in text
    assert json.loads(out.read_text())["worst"]["fp32"]["max_abs_err"] <= 2
    assert main([*args, "--whole", "0", "--min-psnr", "fp32=200"]) == 1  # impossible bound → exit 1
    assert "FAIL fp32" in capsys.readouterr().err


def test_toy_network_int8_and_fp16_parity(toy_sr_export, small_photos) -> None:
    """On a network with image-like output the bounds are tight: measured int8 48.8 dB (max calibration),
    fp16 72.7 dB, fp32 92 dB; two unrelated tiles differ by 10 dB."""
    from engine_build.gendr.model import UnitRangeAdapter
    from engine_build.quantize.quantizer import quantize_model

    net, res = toy_sr_export
    quantize_model(res.model_dir, "int8", calib="builtin", n_tiles=8, method="max")
    rep = verify_model(
        res.model_dir, photos=small_photos, n_tiles=4, n_images=1, reference=UnitRangeAdapter(net)
    )
    w = rep.worst()
    assert w["fp32"]["min_psnr_db"] >= 50.0, rep.table()
    assert w["fp16"]["min_psnr_db"] >= 60.0, rep.table()
    assert w["int8"]["min_psnr_db"] >= 40.0, rep.table()


def test_metrics_and_helpers(tmp_path: Path, small_photos) -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    assert compare(a, a) == {"max_abs_err": 0, "mean_abs_err": 0.0, "psnr_db": math.inf}
    b = a.copy()
    b[0, 0, 0] = 255  # mse = 255² / 48 → PSNR = 10·log10(48)
    assert compare(a, b)["psnr_db"] == pytest.approx(10 * math.log10(48))
    t1 = graph_input_tiles(small_photos, 64, 1, 4, n=3, seed=1)
    assert t1.shape == (3, 64, 64, 3) and t1.dtype == np.uint8
    assert np.array_equal(t1, graph_input_tiles(small_photos, 64, 1, 4, n=3, seed=1))
    assert parse_thresholds(["fp32=50", "int8=20.5"]) == {"fp32": 50.0, "int8": 20.5}
    with pytest.raises(ValueError):
        parse_thresholds(["fp32"])
    rep = VerifyReport("m", "ref")
    assert failures(rep, {}) == []
    assert failures(rep, {"fp32": 50}) == ["fp32: not verified (no rows; asked --min-psnr fp32=50)"]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    Image.fromarray(t1[0]).save(tmp_path / "ok.png")
    names = [n for n, _ in load_photos(tmp_path)]
    assert names == ["ok.png"]  # unreadable files are skipped with a warning
