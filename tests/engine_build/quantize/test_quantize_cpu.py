"""int8 for ONNX Runtime CPU (`gendr-build quantize --tool ort`): a quality bound on real photos, the parity
figure in the manifest, and `auto` precision on onnxruntime-cpu honouring it.

The network is small but photo-like: every output pixel goes through its (quantized) convolutions — an
identity path through each conv plus seeded random texture — so int8 error shows in the output, unlike a
random net whose output is nearly constant or one whose signal bypasses the convs. It is shallow on
purpose: each int8 requantization adds ~0.5 grey level of noise, and a deep network (Real-ESRGAN's 351
convolutions) accumulates more than the 40 dB bound allows (docs/benchmarks.md, "CPU efficiency").
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime.quantization")

from engine_build.quantize.quantizer import quantize_model  # noqa: E402
from engine_build.trt.rules import check_graph  # noqa: E402
from engine_build.verify.parity import compare, onnx_runner, run_whole  # noqa: E402
from service.backends.onnxruntime import INT8_MIN_PSNR_DB, OnnxRuntimeBackend  # noqa: E402
from service.manifest import read_manifest  # noqa: E402

TILE, OVERLAP = 32, 8


def _identity_conv(cin: int, cout: int, g: torch.Generator, noise: float) -> torch.nn.Conv2d:
    c = torch.nn.Conv2d(cin, cout, 3, padding=1)
    with torch.no_grad():
        c.weight.copy_(torch.randn(c.weight.shape, generator=g) * noise)
        for i in range(min(cin, cout, 3)):  # a 3×3 box per colour: no single tap dwarfs the texture weights
            c.weight[i, i] += 1.0 / 9
        c.bias.zero_()
    return c


class PhotoNet(torch.nn.Module):
    """×4: conv → residual conv block (LeakyReLU) → nearest ×4 → conv (LeakyReLU) → conv; [0,1] → [0,1]."""

    def __init__(self, seed: int = 0, width: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.first = _identity_conv(3, width, g, 0.05)
        self.body = _identity_conv(width, width, g, 0.05)
        self.up = _identity_conv(width, width, g, 0.03)
        self.last = _identity_conv(width, 3, g, 0.03)
        self.act = torch.nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.first(x)
        f = f + 0.2 * self.act(self.body(f))
        f = self.act(self.up(torch.nn.functional.interpolate(f, scale_factor=4, mode="nearest")))
        return self.last(f).clamp(0, 1)


@pytest.fixture(scope="module")
def photo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PhotoNet exported fp32-only (what a CPU repository holds), tile 32."""
    from engine_build.export.exporter import export_single
    from service.manifest import Source

    out = tmp_path_factory.mktemp("photonet") / "photonet"
    export_single(
        PhotoNet().eval(),
        4,
        out,
        "photonet",
        tile=TILE,
        overlap=OVERLAP,
        source=Source(description="photo-like ×4 test net"),
        precisions=("fp32",),
    )
    return out


@pytest.fixture(scope="module")
def int8_cpu(photo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("int8cpu") / "photonet"
    shutil.copytree(photo_repo, dst)
    quantize_model(dst, "int8", calib="builtin", n_tiles=16, parity_tiles=8)
    return dst


def test_int8_from_fp32_uses_ort_quantizer_and_records_parity(int8_cpu: Path) -> None:
    v = read_manifest(int8_cpu, verify=True).onnx["int8"]
    q = v.quantization or {}
    assert q["tool"] == "onnxruntime.quantization" and q["base"] == "fp32" and q["method"] == "minmax"
    parity = q["parity"]
    assert isinstance(parity, dict) and parity["reference"] == "fp32" and parity["n_tiles"] == 8
    assert parity["bound_db"] == INT8_MIN_PSNR_DB and parity["passes"] is True
    assert parity["psnr_db"] >= INT8_MIN_PSNR_DB and parity["worst_tile_psnr_db"] <= parity["psnr_db"]
    g = onnx.load(str(int8_cpu / v.graph.path))
    ops = {n.op_type for n in g.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # every conv weight is int8 per-channel behind a DequantizeLinear
    inits = {t.name: t for t in g.graph.initializer}
    dq_weights = [
        inits[n.input[0]] for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
    ]
    assert len([t for t in dq_weights if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]) == 4
    # asymmetric activations: TensorRT cannot build this graph, and the manifest says so
    problems = check_graph(g, tile=TILE, out_tile=TILE * 4)
    assert problems and all("only symmetric quantization" in p for p in problems), problems
    assert v.cpu_only and "asymmetric" in v.cpu_only and "zero point" in v.cpu_only


def test_engine_refuses_the_cpu_int8_graph_in_one_line(
    int8_cpu: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gendr-build engine` on the ORT graph: one line naming the reason and the fix, before any GPU work."""
    import engine_build.trt.build as tb
    from engine_build.cli import main

    monkeypatch.setattr(tb, "detect_gpu", lambda device_id=0: pytest.fail("probed the GPU"))
    assert main(["engine", "--model", str(int8_cpu), "--precision", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "for ONNX Runtime only" in err[0] and "symmetric" in err[0] and "--tool modelopt" in err[0]


def test_int8_quality_on_whole_real_photos(int8_cpu: Path, small_photos) -> None:
    """Independent of the recorded figure: whole photos through the service's tiling and stitching."""
    m = read_manifest(int8_cpu, verify=False)
    fp32, int8 = onnx_runner(int8_cpu, "fp32"), onnx_runner(int8_cpu, "int8")
    for name, img in small_photos[:2]:
        lr = np.ascontiguousarray(img[:96, :96])
        a = run_whole(lr, 384, 384, m.tile, fp32)
        b = run_whole(lr, 384, 384, m.tile, int8)
        c = compare(a, b)
        assert c["psnr_db"] >= INT8_MIN_PSNR_DB, (name, c)
        assert 0 < c["mean_abs_err"] < 2.0, (name, c)  # int8 really differs, and only slightly


def _precision(model_dir: Path, manifest, precision: str = "auto") -> str:
    return OnnxRuntimeBackend(manifest, model_dir, provider="cpu", precision=precision).variant.precision


def _with_parity(manifest, parity: object):
    v = manifest.onnx["int8"]
    q = dict(v.quantization or {})
    if parity is None:
        q.pop("parity", None)
    else:
        q["parity"] = parity
    onnx_map = dict(manifest.onnx) | {"int8": v.model_copy(update={"quantization": q})}
    return manifest.model_copy(update={"onnx": onnx_map})


def test_auto_on_cpu_picks_int8_only_when_the_parity_figure_passes(int8_cpu: Path) -> None:
    m = read_manifest(int8_cpu, verify=True)
    assert _precision(int8_cpu, m) == "int8"
    passing = dict(m.onnx["int8"].quantization["parity"])  # type: ignore[index, arg-type]
    assert _precision(int8_cpu, _with_parity(m, passing | {"psnr_db": 39.9})) == "fp32"
    assert _precision(int8_cpu, _with_parity(m, passing | {"psnr_db": 40.0})) == "int8"
    assert _precision(int8_cpu, _with_parity(m, None)) == "fp32"  # no figure: not trusted
    assert _precision(int8_cpu, _with_parity(m, passing | {"psnr_db": "high"})) == "fp32"
    failing = _with_parity(m, passing | {"psnr_db": 12.0})
    assert _precision(int8_cpu, failing, "int8") == "int8"  # an explicit choice is served as asked
    # GPUs keep their own order (fp16 first, absent here → fp32) regardless of the CPU figure
    assert OnnxRuntimeBackend(m, int8_cpu, provider="cuda").variant.precision == "fp32"


def test_int8_calibrated_on_the_wrong_photos_fails_the_bound(
    photo_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Calibrated on a near-black photo, activations clip on real ones: the figure says so and `auto`
    keeps fp32 — the check is not a rubber stamp."""
    from PIL import Image

    from engine_build.cli import main

    dark = tmp_path / "dark"
    dark.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 12, (64, 64, 3), dtype=np.uint8)).save(dark / "night.png")
    repo = tmp_path / "photonet"
    shutil.copytree(photo_repo, repo)
    args = ["quantize", "--model", str(repo), "--precision", "int8", "--calib", str(dark), "--tiles", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "FAILS the 40.0 dB bound" in out and "skips int8" in out
    m = read_manifest(repo, verify=True)
    parity = m.onnx["int8"].quantization["parity"]  # type: ignore[index]
    assert parity["passes"] is False and parity["psnr_db"] < INT8_MIN_PSNR_DB  # type: ignore[index, operator]
    assert parity["photos"] == "builtin"  # type: ignore[index]  # the held-out tiles are real photos
    assert _precision(repo, m) == "fp32"
