"""int8 for the CPU with OpenVINO's NNCF (`gendr-build quantize --tool nncf`): the graph and its parity in the
manifest, the float scope (first/last conv, upsampling path) left float, calibration photos disjoint from
the parity set, the accuracy-aware mode, OpenVINO serving the graph, and a one-line refusal without NNCF.

On the photo-like ×4 test network (test_quantize_cpu.PhotoNet). Timings are recorded, never asserted.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("nncf")
pytest.importorskip("openvino")

from test_quantize_cpu import TILE, photo_repo  # noqa: F401  (the photo-like ×4 test network)

from engine_build.quantize.calib import CALIBRATION_PHOTOS
from engine_build.quantize.quantizer import NncfOptions, quantize_model
from engine_build.verify.parity import BUILTIN_PHOTOS, compare, graph_input_tiles, onnx_runner
from service.backends.base import TileFunction
from service.backends.onnxruntime import INT8_MIN_PSNR_DB
from service.backends.openvino import OpenVinoBackend
from service.manifest import read_manifest


def _quantize(src: Path, dst: Path, **nncf: object) -> Path:
    shutil.copytree(src, dst)
    opts = NncfOptions(speed_reps=1, **nncf)  # type: ignore[arg-type]
    quantize_model(dst, "int8", calib="builtin", n_tiles=8, parity_tiles=4, tool="nncf", nncf=opts)
    return dst


@pytest.fixture(scope="module")
def nncf_repo(photo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    return _quantize(photo_repo, tmp_path_factory.mktemp("nncf") / "photonet")


def _float_convs(graph: Path) -> dict[str, bool]:
    """Conv name → whether it runs in float (no DequantizeLinear feeds its input or its weight)."""
    m = onnx.load(str(graph))
    dq_out = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name: not (set(n.input[:2]) & dq_out) for n in m.graph.node if n.op_type == "Conv"}


def test_nncf_graph_and_its_parity_in_the_manifest(nncf_repo: Path) -> None:
    v = read_manifest(nncf_repo, verify=True).onnx["int8"]
    q = v.quantization or {}
    assert q["tool"] == "nncf" and q["base"] == "fp32" and q["mode"] == "ptq" and q["preset"] == "mixed"
    assert q["weights"].endswith("8-bit range") and q["weight_bits"] == 8
    assert q["bias_correction"] == "fast" and q["quantize_linear_nodes"] > 0
    # equalized first: PhotoNet's residual stream (first conv, body conv through Mul/Add, the ×4 resize)
    # and its upsampling conv's LeakyReLU output
    assert q["equalization"]["groups"] == 2 and q["equalization"]["alpha"] == 0.5
    parity = q["parity"]
    assert isinstance(parity, dict) and parity["reference"] == "fp32" and parity["n_tiles"] == 4
    runtimes = parity["by_runtime"]
    assert set(runtimes) == {"openvino", "onnxruntime", "exact"}  # this CPU's kernels, and VNNI/AMX's sums
    assert parity["psnr_db"] == min(r["psnr_db"] for r in runtimes.values())  # the worst one counts
    assert parity["passes"] is True and parity["psnr_db"] >= INT8_MIN_PSNR_DB
    # calibrated on scikit-image photos outside the parity set
    assert q["calibration_photos"] == list(CALIBRATION_PHOTOS)
    assert not set(CALIBRATION_PHOTOS) & set(BUILTIN_PHOTOS) and parity["photos"] == "builtin"
    speed = q["speed"]
    assert {"ort-fp32", "ort-int8", "ov-fp32", "ov-int8"} <= set(speed["s_per_tile"]) and speed["family"]
    # asymmetric activations: for the CPU only, and the manifest says so
    assert v.cpu_only and v.cpu_only.startswith("NNCF")


def _weight_codes(graph: Path) -> list[np.ndarray]:
    """The int8 codes of every quantized weight (initializers read by a DequantizeLinear)."""
    from onnx import numpy_helper

    m = onnx.load(str(graph))
    inits = {t.name: t for t in m.graph.initializer}
    return [
        numpy_helper.to_array(inits[n.input[0]])
        for n in m.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    ]


def test_seven_bit_weights_and_no_equalization_on_request(
    nncf_repo: Path,
    photo_repo: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """`--weight-bits 7 --equalize 0`: NNCF's overflow-fix form (every code inside ±64, so AVX2's
    saturating u8×s8 pairs sum exactly), weights untouched by equalization; the default uses all 8 bits."""
    seven = _quantize(photo_repo, tmp_path / "w7", weight_bits=7, equalize=0.0)
    v = read_manifest(seven, verify=True).onnx["int8"]
    q = v.quantization or {}
    assert q["weight_bits"] == 7 and "7-bit" in q["weights"] and q["equalization"]["groups"] == 0
    codes7 = _weight_codes(seven / v.graph.path)
    assert codes7 and all(np.abs(c.astype(np.int16)).max() <= 64 for c in codes7)
    default = read_manifest(nncf_repo, verify=True).onnx["int8"]
    assert v.key != default.key  # the options are part of the step's key
    assert (
        max(int(np.abs(c.astype(np.int16)).max()) for c in _weight_codes(nncf_repo / default.graph.path)) > 64
    )


def test_the_float_scope_stays_float(nncf_repo: Path) -> None:
    """First and last conv, and everything from the ×4 resize on, run in float; the trunk is int8."""
    m = read_manifest(nncf_repo, verify=True)
    scope = m.onnx["int8"].quantization["float_scope"]  # type: ignore[index]
    assert scope["first_last"] == ["/net/first/Conv", "/net/last/Conv"]  # type: ignore[index]
    assert scope["upsampling_from"] == "/net/Resize"  # type: ignore[index]
    assert _float_convs(nncf_repo / m.onnx["int8"].graph.path) == {
        "/net/first/Conv": True,
        "/net/body/Conv": False,
        "/net/up/Conv": True,
        "/net/last/Conv": True,
    }


def test_quantizing_everything_and_the_accuracy_aware_mode(
    photo_repo: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """With the float scope off every conv is int8; the accuracy-aware mode then puts layers back into
    float until PSNR on validation tiles (calibration photos) reaches its target, and records how."""
    # the 7-bit, unequalized form: its plain PTQ leaves the accuracy-aware mode something to restore
    old = {"weight_bits": 7, "equalize": 0.0}
    everything = _quantize(photo_repo, tmp_path / "all", keep_ends=False, keep_upsampling=False, **old)
    m = read_manifest(everything, verify=True)
    assert not any(_float_convs(everything / m.onnx["int8"].graph.path).values())
    plain = m.onnx["int8"].quantization["parity"]["psnr_db"]  # type: ignore[index]
    aware = _quantize(
        photo_repo,
        tmp_path / "aware",
        keep_ends=False,
        keep_upsampling=False,
        accuracy_target_db=plain + 6,
        validation_tiles=4,
        max_iterations=4,
        **old,
    )
    ma = read_manifest(aware, verify=True)
    q = ma.onnx["int8"].quantization or {}
    assert q["mode"] == "accuracy-control" and q["validation_tiles"] == 4 and q["target_psnr_db"] == plain + 6
    assert any(_float_convs(aware / ma.onnx["int8"].graph.path).values())  # some layer went back to float
    assert q["parity"]["psnr_db"] > plain  # type: ignore[index]


def test_openvino_serves_the_nncf_graph(nncf_repo: Path, small_photos) -> None:
    m = read_manifest(nncf_repo, verify=True)
    be = OpenVinoBackend(m, nncf_repo, precision="int8", max_batch=1)
    assert be.info.precision == "int8" and be.variant.precision == "int8"
    assert be.info.extra["inference_precision"] == "f32"  # the float scope in fp32 on every CPU
    x = graph_input_tiles(small_photos, TILE, 4, 4, n=4, seed=3)
    out = TileFunction(be)(x)
    c = compare(out, onnx_runner(nncf_repo, "fp32")(x))
    assert c["psnr_db"] >= INT8_MIN_PSNR_DB and c["max_abs_err"] > 0, c  # int8 really ran, within bound
    be.close()
    assert np.array_equal(out.shape, (4, TILE * 4, TILE * 4, 3))


def test_a_missing_nncf_is_refused_in_one_line(
    photo_repo: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from engine_build.cli import main

    before = (photo_repo / "manifest.json").read_bytes()
    monkeypatch.setitem(sys.modules, "nncf", None)  # as on a machine without it
    args = ["quantize", "--model", str(photo_repo), "--precision", "int8", "--calib", "builtin"]
    assert main([*args, "--tool", "nncf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: NNCF is not installed") and "--tool ort" in err[0]
    assert (photo_repo / "manifest.json").read_bytes() == before


def _concat_qdq_conv() -> onnx.ModelProto:
    """Two signed int8 Q/DQ inputs → Concat → conv with int8 weights: an RRDB dense block in miniature."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(0.01, np.float32), "s"),
        numpy_helper.from_array(np.array(-20, np.int8), "z"),
        numpy_helper.from_array(rng.integers(-64, 65, (16, 96, 3, 3)).astype(np.int8), "W"),
        numpy_helper.from_array(np.full(16, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(16, np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["X", "s", "z"], ["Xq"]),
        helper.make_node("DequantizeLinear", ["Xq", "s", "z"], ["Xd"]),
        helper.make_node("QuantizeLinear", ["Y", "s", "z"], ["Yq"]),
        helper.make_node("DequantizeLinear", ["Yq", "s", "z"], ["Yd"]),
        helper.make_node("Concat", ["Xd", "Yd"], ["C"], axis=1),
        helper.make_node("DequantizeLinear", ["W", "ws", "wz"], ["Wd"], axis=0),
        helper.make_node("Conv", ["C", "Wd"], ["Z"], pads=[1, 1, 1, 1]),
    ]
    vi = helper.make_tensor_value_info
    g = helper.make_graph(
        nodes,
        "dense",
        [vi("X", T.FLOAT, [1, 64, 16, 16]), vi("Y", T.FLOAT, [1, 32, 16, 16])],
        [vi("Z", T.FLOAT, [1, 16, 16, 16])],
        inits,
        # NNCF declares its zero points and quantized tensors too: the rewrite must keep them consistent
        value_info=[
            vi("Xq", T.INT8, [1, 64, 16, 16]),
            vi("Yq", T.INT8, [1, 32, 16, 16]),
            vi("z", T.INT8, []),
        ],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_unsigned_activations_keep_the_grid_and_let_openvino_compute_it() -> None:
    """The uint8 rewrite changes no value in ONNX Runtime, and OpenVINO then agrees with it (its signed
    int8 Concat → conv path did not: 12–18 on outputs of ~20 in OpenVINO 2026.4)."""
    import onnxruntime as ort
    import openvino as ov

    from engine_build.quantize.nncf_ptq import unsigned_activations

    rng = np.random.default_rng(1)
    feed = {"X": rng.uniform(-0.3, 1.0, (1, 64, 16, 16)), "Y": rng.uniform(-0.3, 1.0, (1, 32, 16, 16))}
    feed = {k: v.astype(np.float32) for k, v in feed.items()}
    m = _concat_qdq_conv()

    def run_ort(model: onnx.ModelProto) -> np.ndarray:
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(None, feed)[0]

    before = run_ort(m)
    assert unsigned_activations(m) == 1  # one zero point, shared by both pairs
    onnx.checker.check_model(m, full_check=True)  # strict type inference: declared types follow
    assert np.array_equal(run_ort(m), before)
    compiled = ov.Core().compile_model(ov.Core().read_model(m.SerializeToString(), b""), "CPU")
    got = compiled([feed["X"], feed["Y"]])[0]
    assert np.abs(got - before).max() < 0.05 * np.abs(before).max()
