"""TensorRT engine build: clean one-line failures on CPU machines; the real build on a GPU (marker `gpu`)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

import engine_build.trt_build as tb
from engine_build.trt_build import Gpu, TrtBuildError, build_engine, check_target
from service.manifest import read_manifest

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_no_gpu_is_a_clear_one_line_error(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(tb, "detect_gpu", lambda device_id=0: None)
    with pytest.raises(TrtBuildError, match="no NVIDIA GPU visible"):
        build_engine(tiny_repo, "fp16")
    from engine_build.cli import main

    assert main(["engine", "--model", str(tiny_repo), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no NVIDIA GPU visible")


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
    ],
)
def test_target_gpu_matrix(target: str, gpu: Gpu, precision: str, ok: bool) -> None:
    if ok:
        check_target(target, gpu, precision)
    else:
        with pytest.raises(TrtBuildError):
            check_target(target, gpu, precision)


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
    assert tb._profiles([1, 2, 4], "per-batch", 1, None) == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    with pytest.raises(TrtBuildError):
        tb._profiles([1, 2], "shared", 1, 8)


# ------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs the tensorrt package")
def test_engine_build_parity_and_idempotency(repo_copy: Path, small_photos) -> None:
    from engine_build.trt_build import TrtTileRunner
    from engine_build.verify import OrtTileRunner, compare, graph_input_tiles

    res = build_engine(repo_copy, "fp16", batch_sizes=[1, 2, 4], profiles=2, progress=False)
    assert not res.skipped
    m = read_manifest(repo_copy, verify=True)
    (e,) = m.engines
    assert e.precision == "fp16" and e.profile.batch_sizes == [1, 2, 4] and e.profile.count == 2
    assert e.onnx_sha256 == m.onnx["fp16"].graph.sha256 and e.plan.path.startswith("engines/sm")
    assert (repo_copy / "engines" / f"sm{e.compute_capability.replace('.', '')}" / "timing.cache").is_file()
    again = build_engine(repo_copy, "fp16", batch_sizes=[1, 2, 4], profiles=2, progress=False)
    assert again.skipped
    tiles = graph_input_tiles(small_photos, 64, 1, 4, n=4)
    ref = OrtTileRunner(repo_copy / "onnx" / "fp32" / "model.onnx")(tiles)
    got = TrtTileRunner(repo_copy / e.plan.path)(tiles)
    assert compare(got, ref)["psnr_db"] >= 40.0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
