"""TensorRT engine build: clean one-line failures on CPU machines; the real build on a GPU (marker `gpu`)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

import engine_build.trt.build as tb
from engine_build.trt.build import Gpu, TrtBuildError, build_engine, check_target
from service.hardware import tensorrt_version
from service.manifest import read_manifest

HAS_TRT = tensorrt_version() is not None  # a real runtime: tensorrt-stubs alone does not count


def test_no_gpu_is_a_clear_one_line_error(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(tb, "detect_gpu", lambda device_id=0: None)
    with pytest.raises(TrtBuildError, match="no NVIDIA GPU at CUDA index 0"):
        build_engine(tiny_repo, "fp16")
    from engine_build.cli import main

    assert main(["engine", "--model", str(tiny_repo), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no NVIDIA GPU at CUDA index 0")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_missing_tensorrt_is_a_clear_one_line_error(
    tiny_repo: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(tb, "detect_gpu", lambda device_id=0: Gpu(0, "NVIDIA L20", "8.9"))
    from engine_build.cli import main

    assert main(["engine", "--model", str(tiny_repo), "--precision", "fp16", "--target-gpu", "l20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TensorRT is not installed" in err[0] and "gendr-serve[trt]" in err[0]


def test_missing_graph_and_wrong_tile_are_refused_before_any_gpu_work(tiny_repo: Path) -> None:
    with pytest.raises(TrtBuildError, match=r"no int8 ONNX graph .* run `gendr-build quantize`"):
        build_engine(tiny_repo, "int8")
    with pytest.raises(TrtBuildError, match=r"exported for 64-px tiles; re-export with --tile 128"):
        build_engine(tiny_repo, "fp16", tile=128)


@pytest.mark.parametrize(
    ("target", "gpu", "precision", "ok"),
    [
        ("auto", Gpu(0, "NVIDIA A10", "8.6"), "fp16", True),
        ("a10", Gpu(0, "NVIDIA A10", "8.6"), "int8", True),
        ("a10", Gpu(0, "NVIDIA A10", "8.6"), "fp8", False),  # fp8 needs sm_89
        ("auto", Gpu(0, "NVIDIA A10", "8.6"), "fp8", False),
        ("l20", Gpu(0, "NVIDIA L20", "8.9"), "fp8", True),
        ("h100", Gpu(0, "NVIDIA H100 80GB HBM3", "9.0"), "fp8", True),
        ("l20", Gpu(0, "NVIDIA A10", "8.6"), "fp16", False),  # wrong node pool
        ("h100", Gpu(0, "NVIDIA L20", "8.9"), "fp16", False),
        ("a10", Gpu(0, "NVIDIA A10", "8.6"), "bf16", True),  # bf16 tensor cores from Ampere on
        ("auto", Gpu(0, "Tesla T4", "7.5"), "bf16", False),
    ],
)
def test_target_gpu_matrix(target: str, gpu: Gpu, precision: str, ok: bool) -> None:
    if ok:
        check_target(target, gpu, precision)
    else:
        with pytest.raises(TrtBuildError):
            check_target(target, gpu, precision)


def test_every_precision_has_a_build_rule_and_a_cli_choice() -> None:
    """The one precision list (service.manifest.PRECISIONS) is what the engine build accepts."""
    from engine_build.cli import build_parser
    from service.manifest import PRECISIONS

    assert set(tb.PRECISION_MIN_CC) == set(PRECISIONS)
    for p in PRECISIONS:
        assert build_parser().parse_args(["engine", "--model", "m", "--precision", p]).precision == p
    with pytest.raises(SystemExit):
        build_parser().parse_args(["engine", "--model", "m", "--precision", "int4"])


def test_progress_monitor_drives_tqdm(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    fake = types.SimpleNamespace(
        IProgressMonitor=type("IProgressMonitor", (), {"__init__": lambda self: None})
    )
    mon = tb.make_progress_monitor(fake, enabled=True)
    mon.phase_start("Building engine", None, 3)
    mon.phase_start("Tactic selection", "Building engine", 2)
    assert mon.step_complete("Tactic selection", 0) is True and mon.step_complete("Tactic selection", 1)
    mon.phase_finish("Tactic selection")
    for i in range(3):
        assert mon.step_complete("Building engine", i)
    mon.phase_finish("Building engine")
    assert "Building engine" in capsys.readouterr().err


def test_profiles() -> None:
    assert tb._profiles([4, 1, 2], "shared", 2, None) == [(1, 4, 4), (1, 4, 4)]
    with pytest.raises(tb.TrtBuildError, match="per-batch"):  # refused: a context is pinned to a profile
        tb._profiles([1, 2, 4], "per-batch", 1, None)
    with pytest.raises(TrtBuildError):
        tb._profiles([1, 2], "shared", 1, 8)


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs the tensorrt package")
def test_engine_build_parity_and_idempotency(repo_copy: Path, small_photos) -> None:
    from engine_build.verify.parity import compare, graph_input_tiles, onnx_runner
    from engine_build.verify.runners import tensorrt_runner

    res = build_engine(repo_copy, "fp16", batch_sizes=[1, 2, 4], profiles=2, progress=False)
    assert not res.skipped
    m = read_manifest(repo_copy, verify=True)
    (e,) = m.engines
    assert e.precision == "fp16" and e.profile.batch_sizes == [1, 2, 4] and e.profile.count == 2
    assert e.onnx_sha256 == m.onnx["fp16"].graph.sha256 and e.plan.path.startswith("engines/sm")
    sm = f"sm{e.compute_capability.replace('.', '')}"
    assert (repo_copy / "engines" / sm / f"timing-trt{e.tensorrt_version}.cache").is_file()
    again = build_engine(repo_copy, "fp16", batch_sizes=[1, 2, 4], profiles=2, progress=False)
    assert again.skipped
    tiles = graph_input_tiles(small_photos, 64, 1, 4, n=4)
    ref = onnx_runner(repo_copy, "fp32")(tiles)
    got = tensorrt_runner(repo_copy, "fp16")(tiles)
    assert compare(got, ref)["psnr_db"] >= 40.0
    assert (repo_copy / e.build["layers_json"]).is_file() and sum(e.build["layer_precisions"].values()) > 0


# --------------------------------------------------------------- build logic on CPU (no TensorRT needed)


def test_the_builder_runs_on_the_probed_device(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--device 1` must build on CUDA device 1, not on whatever is current (device 0)."""
    events: list[str] = []
    monkeypatch.setattr(tb, "detect_gpu", lambda device_id=0: Gpu(device_id, "NVIDIA L20", "8.9"))
    monkeypatch.setattr(tb, "set_cuda_device", lambda i: events.append(f"set_device {i}"))

    class Builder:
        def __init__(self, logger: object) -> None:
            events.append("builder")
            raise RuntimeError("stop here")

    fake = types.SimpleNamespace(
        __version__="10.13.0",
        Logger=type("Logger", (), {"WARNING": 1, "__init__": lambda self, level=0: None}),
        Builder=Builder,
    )
    monkeypatch.setattr(tb, "import_tensorrt", lambda: fake)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(RuntimeError, match="stop here"):
        build_engine(tiny_repo, "fp16", device_id=1, progress=False)
    assert events == ["set_device 1", "builder"]


class _Config:
    """The two IBuilderConfig calls the timing cache uses; rejects caches not made by `accept`."""

    def __init__(self, accept: bytes = b"", corrupt_raises: bool = False) -> None:
        self.accept, self.corrupt_raises = accept, corrupt_raises
        self.cache: object = None

    def create_timing_cache(self, data: bytes) -> object:
        if data and self.corrupt_raises and data != self.accept:
            raise RuntimeError("Error Code 1: corrupt timing cache")
        return ("cache", bytes(data))

    def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return ignore_mismatch or cache[1] in (b"", self.accept)  # type: ignore[index]


def test_timing_cache_is_per_tensorrt_version_and_a_rejected_one_starts_fresh(tmp_path: Path) -> None:
    a = tb.timing_cache_path(tmp_path, "sm90", "10.13.0.35")
    assert a != tb.timing_cache_path(tmp_path, "sm90", "10.9.0") and "10.13.0.35" in a.name
    a.parent.mkdir(parents=True)
    a.write_bytes(b"good")
    cfg = _Config(accept=b"good")
    assert tb.load_timing_cache(cfg, a) == (("cache", b"good"), True)
    a.write_bytes(b"from another version")
    for cfg in (_Config(accept=b"good"), _Config(accept=b"good", corrupt_raises=True)):
        cache, reused = tb.load_timing_cache(cfg, a)  # mismatch → False, or TensorRT raising: no crash
        assert not reused and cache == ("cache", b"") and cfg.cache == cache
    assert tb.load_timing_cache(_Config(), tmp_path / "missing.cache") == (("cache", b""), False)


def test_layer_precisions_count_what_the_engine_really_runs() -> None:
    info = {
        "Layers": [
            {"Name": "conv1", "Outputs": [{"Format/Datatype": "Int8 NC/32HW32"}]},
            {"Name": "conv2", "Outputs": [{"Format/Datatype": "Int8 NC/32HW32"}]},
            {"Name": "softmax", "Outputs": [{"Format/Datatype": "Half format"}]},
            {"Name": "norm", "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
            {"Name": "q", "Outputs": [{"Format/Datatype": "FP8 format"}]},
        ]
    }
    import json

    assert tb.layer_precisions(json.dumps(info)) == {"FP8": 1, "Float": 1, "Half": 1, "Int8": 2}
    assert tb.layer_precisions("not json") == {}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def _permute_first_graph(tile: int) -> object:
    """uint8 → Transpose → Cast: what format-1 exports were, and what TensorRT refuses."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Transpose", ["lr_tile"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["t"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["f"], ["o"], perm=[0, 2, 3, 1]),
        helper.make_node("Cast", ["o"], ["sr_tile"], to=TensorProto.UINT8),
    ]
    g = helper.make_graph(
        nodes,
        "bad",
        [helper.make_tensor_value_info("lr_tile", TensorProto.UINT8, ["batch", tile, tile, 3])],
        [helper.make_tensor_value_info("sr_tile", TensorProto.UINT8, ["batch", tile, tile, 3])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_a_graph_that_breaks_tensorrts_rules_is_refused_before_any_gpu_work(
    repo_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import onnx

    from engine_build.export.onnx_graph import ExportError, check_io
    from service.manifest import make_artifact, write_manifest

    m = read_manifest(repo_copy)
    path = repo_copy / m.onnx["fp16"].graph.path
    onnx.save_model(_permute_first_graph(m.tile.tile), str(path))
    v = m.onnx["fp16"].model_copy(update={"graph": make_artifact(repo_copy, path), "external_data": None})
    write_manifest(repo_copy, m.model_copy(update={"onnx": {**m.onnx, "fp16": v}}))
    monkeypatch.setattr(tb, "detect_gpu", lambda device_id=0: pytest.fail("probed the GPU"))
    with pytest.raises(
        TrtBuildError, match=r"breaks TensorRT's rules.*feeds Transpose|breaks TensorRT's rules"
    ):
        build_engine(repo_copy, "fp16")
    # the export: GenDR graphs must pass; a community network only warns (ONNX Runtime serves it)
    with pytest.raises(ExportError, match="breaks TensorRT's rules"):
        check_io(path, m.tile.out_tile)
    check_io(path, m.tile.out_tile, trt_strict=False)
    assert "TensorRT cannot build this graph" in caplog.text
