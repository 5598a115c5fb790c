"""`quantize`: ModelOpt int8 Q/DQ that runs in ONNX Runtime CPU; fp8 in TensorRT form, refused below sm_89."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from engine_build.gpu_targets import Gpu
from engine_build.quantize.quantizer import DEFAULT_EXCLUDES, QuantizeError, check_fp8_target, quantize_model
from engine_build.verify.parity import graph_input_tiles, onnx_runner
from service.manifest import read_manifest


def _has_modelopt() -> bool:
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError:
        return False
    return True


# Only the tests that run ModelOpt skip without it: the fp8 refusal and the CLI's errors come first.
needs_modelopt = pytest.mark.skipif(not _has_modelopt(), reason="needs NVIDIA ModelOpt's ONNX quantizer")


@needs_modelopt
def test_int8_graph_in_repository(int8_repo) -> None:
    m = read_manifest(int8_repo.model_dir, verify=True)
    v = m.onnx["int8"]
    assert v.graph.path == "onnx/int8/model.onnx" and v.opset >= 19
    q = v.quantization
    assert q["base"] == "fp16" and q["n_tiles"] == 8 and q["method"] == "max"
    assert q["excludes"] == list(DEFAULT_EXCLUDES) and q["quantize_linear_nodes"] > 50
    assert len(q["calibration_sha256"]) == 64


@needs_modelopt
def test_excluded_layers_are_not_quantized(int8_repo) -> None:
    g = onnx.load(str(int8_repo.model_dir / "onnx" / "int8" / "model.onnx")).graph
    producers = {o: n for n in g.node for o in n.output}
    conv_like = [n for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul")]

    def quantized(n: onnx.NodeProto) -> bool:
        return any(
            producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input
        )

    excluded = [
        n for n in conv_like if any(k in n.name for k in ("conv_in", "conv_out", "time_emb", "proj_out"))
    ]
    assert excluded and not any(quantized(n) for n in excluded)
    assert sum(quantized(n) for n in conv_like) > 0.5 * len(conv_like)


@needs_modelopt
def test_int8_runs_in_onnxruntime_cpu(int8_repo, small_photos) -> None:
    tiles = graph_input_tiles(small_photos, 64, 1, 4, n=3)
    out = onnx_runner(int8_repo.model_dir, "int8")(tiles)
    assert out.shape == (3, 64, 64, 3) and out.dtype == np.uint8


@needs_modelopt
def test_second_quantize_is_skipped(int8_repo) -> None:
    graph = int8_repo.model_dir / int8_repo.manifest.onnx["int8"].graph.path
    before = graph.stat().st_mtime_ns
    res = quantize_model(int8_repo.model_dir, "int8", calib="builtin", n_tiles=8, method="max")
    assert res.skipped and graph.stat().st_mtime_ns == before  # nothing recomputed or rewritten
    assert res.manifest.onnx["int8"] == int8_repo.manifest.onnx["int8"]


def test_fp8_is_refused_below_compute_capability_8_9(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match=r"compute capability ≥ 8\.9.*A10 is 8\.6"):
        check_fp8_target("a10")
    assert "l20" in check_fp8_target("l20") and "h100" in check_fp8_target("h100")
    import engine_build.quantize.quantizer as q

    monkeypatch.setattr(q, "detect_gpu", lambda: Gpu(0, "NVIDIA A10", "8.6"))
    with pytest.raises(QuantizeError, match=r"NVIDIA A10 \(sm_86\) cannot run it"):
        check_fp8_target("auto")
    monkeypatch.setattr(q, "detect_gpu", lambda: Gpu(0, "NVIDIA L20", "8.9"))
    assert "L20" in check_fp8_target("auto")
    from engine_build.cli import main

    # the CLI refuses before reading anything: one line, exit 2
    assert (
        main(
            [
                "quantize",
                "--model",
                str(tmp_path),
                "--precision",
                "fp8",
                "--calib",
                "builtin",
                "--target-gpu",
                "a10",
            ]
        )
        == 2
    )


@needs_modelopt
def test_fp8_graph_in_tensorrt_form(repo_copy: Path) -> None:
    res = quantize_model(repo_copy, "fp8", calib="builtin", n_tiles=4, target_gpu="l20")
    v = res.manifest.onnx["fp8"]
    assert v.quantization["method"] == "max" and "l20" in v.quantization["target"]
    g = onnx.load(str(repo_copy / v.graph.path)).graph
    zp = {t.name: t.data_type for t in g.initializer}
    q = [n for n in g.node if n.op_type == "QuantizeLinear"]
    assert q and all(n.domain in ("", "ai.onnx") for n in q)  # standard ONNX Q/DQ, opset ≥ 19
    assert {zp.get(n.input[2]) for n in q if len(n.input) > 2} == {onnx.TensorProto.FLOAT8E4M3FN}


def test_quantize_cli_errors(tiny_repo: Path, tmp_path: Path, capsys) -> None:
    from engine_build.cli import main

    assert (
        main(["quantize", "--model", str(tmp_path / "nope"), "--precision", "int8", "--calib", "builtin"])
        == 2
    )
    assert main(["quantize", "--model", str(tiny_repo), "--precision", "int8", "--calib", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no manifest.json" in err[0] and "no readable images" in err[1]


def test_a_missing_tool_is_its_own_error_before_any_work(
    tiny_repo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ModelOpt (or scikit-image for `builtin` photos) not installed: QuantizeToolMissing, which a caller
    (the GPU check) skips with the reason, before calibration; nothing is written."""
    from engine_build.quantize.quantizer import QuantizeToolMissing

    before = (tiny_repo / "manifest.json").read_bytes()
    monkeypatch.setitem(sys.modules, "modelopt", None)  # as on a machine without it
    with pytest.raises(QuantizeToolMissing, match="NVIDIA ModelOpt is not installed"):
        quantize_model(tiny_repo, "int8", calib="builtin", n_tiles=4)
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(QuantizeToolMissing, match=r"scikit-image is not installed.*--calib DIR"):
        quantize_model(tiny_repo, "int8", calib="builtin", n_tiles=4, tool="ort")
    assert (tiny_repo / "manifest.json").read_bytes() == before


@needs_modelopt
def test_reexporting_the_base_graph_drops_its_quantized_graph(
    int8_repo, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import shutil

    from engine_build.export.exporter import Fp16Options, export_gendr

    repo = tmp_path / "tiny"
    shutil.copytree(int8_repo.model_dir, repo)
    export_gendr(tiny_checkpoint, repo, tile=64, overlap=16, fp16=Fp16Options(norms="fp16"))  # new fp16 graph
    m = read_manifest(repo, verify=True)
    assert set(m.onnx) == {"fp32", "fp16"} and not (repo / "onnx" / "int8").exists()
