"""Backends: ONNX Runtime CPU on the tiny GenDR, the PyTorch reference, the fake, auto-selection,
and the GPU backends failing cleanly where there is no GPU."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from runtime_helpers import fake_manifest, nearest

from service.backends import select
from service.backends.base import BackendUnavailable, check_output, tile_shapes
from service.backends.fake import FakeBackend, FakeBehaviour, FakeEngineError
from service.backends.onnxruntime import OnnxRuntimeBackend
from service.backends.tensorrt import TensorRTBackend
from service.hardware import tensorrt_version
from service.manifest import Engine, EngineProfile, ManifestError, make_artifact, read_manifest
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def real_tiles(photos: dict[str, np.ndarray], n: int, t: int = 64) -> np.ndarray:
    """n real-photo tiles (astronaut, coffee, chelsea…), t×t."""
    out = []
    for img in photos.values():
        for y in range(0, img.shape[0] - t, 97):
            for x in range(0, img.shape[1] - t, 131):
                out.append(img[y : y + t, x : x + t])
                if len(out) == n:
                    return np.stack(out)
    return np.stack(out)


@pytest.fixture(scope="module")
def ort_cpu(tiny_repo: Path) -> OnnxRuntimeBackend:
    m = read_manifest(tiny_repo / "tiny")
    be = OnnxRuntimeBackend(
        m, tiny_repo / "tiny", instances=2, intra_op_threads=1, max_batch=4, session_per_instance=True
    )
    be.load()
    return be


def test_onnxruntime_cpu_serves_every_batch_size(
    ort_cpu: OnnxRuntimeBackend, photos: dict[str, np.ndarray]
) -> None:
    info = ort_cpu.info
    assert info.name == "onnxruntime-cpu" and info.device == "cpu" and info.precision == "fp32"
    assert info.batch_sizes == (1, 2, 3, 4) and info.instances == 2 and len(info.engine_key) == 16
    timings = ort_cpu.warmup()
    assert sorted(timings) == [(64, 64, b) for b in (1, 2, 3, 4)] and all(v > 0 for v in timings.values())
    x = real_tiles(photos, 4)
    y = check_output(ort_cpu.manifest, x, ort_cpu.infer(1, x))
    assert y.shape == (4, 64, 64, 3)
    # the ONNX batch axis is dynamic and the kernels are batch-invariant: a tile's output does not
    # depend on its batch-mates (what lets the batcher mix requests and still be exact)
    one = np.concatenate([ort_cpu.infer(0, x[i : i + 1]) for i in range(4)])
    np.testing.assert_array_equal(y, one)
    assert ort_cpu.healthy()


def test_onnxruntime_matches_the_reference_network(
    ort_cpu: OnnxRuntimeBackend, photos: dict[str, np.ndarray]
) -> None:
    """fp32 ORT vs the same network in numpy (tiny_onnx.reference) on 8 real-photo tiles: both compute in
    fp32 and differ by ~1e-6 before the final ×127.5 and rounding, so a pixel can only flip by one LSB
    where its value sits within ~1e-4 of a rounding boundary: max |Δ| ≤ 1 and < 0.5 % of values differ.
    (ONNX vs the PyTorch model it was exported from: tests/engine_build/test_export.py.)"""
    from tiny_onnx import reference

    x = real_tiles(photos, 8)
    ref = reference(x)
    got = ort_cpu.infer(0, x[:4])
    got = np.concatenate([got, ort_cpu.infer(1, x[4:])])
    d = np.abs(got.astype(np.int16) - ref)
    assert d.max() <= 1
    assert (d > 0).mean() < 5e-3


def test_session_per_instance_or_shared_give_the_same_result(
    tiny_repo: Path, ort_cpu: OnnxRuntimeBackend, photos: dict[str, np.ndarray]
) -> None:
    m = read_manifest(tiny_repo / "tiny")
    shared = OnnxRuntimeBackend(m, tiny_repo / "tiny", instances=2, intra_op_threads=1)
    assert not shared.session_per_instance  # one thread per instance: one shared session is enough
    assert OnnxRuntimeBackend(m, tiny_repo / "tiny", instances=2, intra_op_threads=4).session_per_instance
    shared.load()
    assert shared.info.extra["sessions"] == "1" and ort_cpu.info.extra["sessions"] == "2"
    x = real_tiles(photos, 2)
    np.testing.assert_array_equal(shared.infer(1, x), ort_cpu.infer(0, x))
    shared.close()


def test_onnxruntime_refuses_a_tampered_graph(tiny_repo: Path, tmp_path: Path) -> None:
    d = tmp_path / "tiny"
    shutil.copytree(tiny_repo / "tiny", d)
    m = read_manifest(d)
    graph = d / m.onnx["fp32"].graph.path
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    graph.write_bytes(bytes(data))
    be = OnnxRuntimeBackend(m, d)
    with pytest.raises(ManifestError, match="sha256"):
        be.load()


def test_onnxruntime_explains_what_is_missing(tiny_repo: Path) -> None:
    m = read_manifest(tiny_repo / "tiny")
    with pytest.raises(BackendUnavailable, match="no int8 ONNX graph"):
        OnnxRuntimeBackend(m, tiny_repo / "tiny", precision="int8")
    be = OnnxRuntimeBackend(m, tiny_repo / "tiny", provider="cuda")
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
        be.load()


def test_fake_backend_behaviours() -> None:
    be = FakeBackend(fake_manifest(tile=16, overlap=4, scale=2), instances=2, behaviour=FakeBehaviour())
    be.load()
    x = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), np.uint8)
    np.testing.assert_array_equal(be.infer(0, x), np.stack([nearest(t, 2) for t in x]))
    be.behaviour.fail_next = 1
    with pytest.raises(FakeEngineError):
        be.infer(1, x)
    be.infer(1, x)
    be.behaviour.wrong_count = True
    assert be.infer(0, x).shape[0] == 2
    with pytest.raises(ValueError):
        be.infer(0, np.zeros((5, 16, 16, 3), np.uint8))  # not a batch size it runs
    with pytest.raises(ValueError, match="scale"):
        FakeBackend(fake_manifest(scale=2), scale=4)


def test_check_output_catches_count_shape_and_dtype() -> None:
    m = fake_manifest(tile=16, overlap=4, scale=2)
    x = np.zeros((2, 16, 16, 3), np.uint8)
    assert tile_shapes(m) == (16, 32)
    check_output(m, x, np.zeros((2, 32, 32, 3), np.uint8))
    for bad in (
        np.zeros((1, 32, 32, 3), np.uint8),
        np.zeros((2, 16, 16, 3), np.uint8),
        np.zeros((2, 32, 32, 3), np.float32),
        [1, 2],
    ):
        with pytest.raises(RuntimeError):
            check_output(m, x, bad)


# ------------------------------------------------------------------------ GPU backends, cleanly absent


@pytest.mark.skipif(tensorrt_version() is not None, reason="TensorRT is installed here")
def test_tensorrt_backend_fails_cleanly_without_tensorrt(tiny_repo: Path) -> None:
    m = read_manifest(tiny_repo / "tiny")
    be = TensorRTBackend(m, tiny_repo / "tiny", instances=2, max_batch=4)
    assert be.info.name == "tensorrt"  # describable before load
    with pytest.raises(BackendUnavailable, match="tensorrt is not installed"):
        be.load()
    be.close()


@pytest.mark.gpu
def test_tensorrt_backend_on_gpu(tiny_repo: Path, photos: dict[str, np.ndarray]) -> None:
    """Needs an engine for this GPU in the repository (gendr-build engine); skipped where there is none."""
    if tensorrt_version() is None:
        pytest.skip("needs TensorRT")
    gpu = select.gpu_info(0)
    m = read_manifest(tiny_repo / "tiny")
    if gpu is None or select.find_engine(m, gpu, "auto", tensorrt_version()) is None:
        pytest.skip("no TensorRT engine built for this GPU in the test repository")
    be = TensorRTBackend(m, tiny_repo / "tiny", instances=2, max_batch=4, cuda_graphs=True)
    be.load()
    be.warmup()
    ort = OnnxRuntimeBackend(m, tiny_repo / "tiny")
    ort.load()
    x = real_tiles(photos, 4)
    assert np.abs(be.infer(1, x).astype(int) - ort.infer(0, x)).mean() < 3
    be.close()


def test_service_never_imports_torch_at_module_level() -> None:
    code = (
        "import sys\n"
        "import service.runtime, service.scheduling.batcher, service.backends.select\n"
        "import service.backends.onnxruntime\n"
        "import service.backends.tensorrt, service.backends.fake, service.hardware, service.http.app\n"
        "bad = [m for m in ('torch', 'tensorrt', 'engine_build') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------------- auto selection


def _engine(m, d: Path, cc: str, precision: str = "fp16", tile: int = 64) -> Engine:
    f = d / "engines" / f"sm{cc.replace('.', '')}" / precision / f"model-t{tile}.plan"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"plan")
    return Engine(
        plan=make_artifact(d, f),
        precision=precision,
        onnx_sha256="0" * 64,
        tensorrt_version="10.9.0",
        compute_capability=cc,
        gpu_name="test",
        profile=EngineProfile(batch_sizes=[1, 2, 4], tile=tile),
        key="k",
    )


def test_auto_without_gpu_picks_onnxruntime_cpu_and_says_why(tiny_repo: Path, monkeypatch) -> None:
    monkeypatch.setattr(select, "gpu_info", lambda device_id=0: None)
    m = read_manifest(tiny_repo / "tiny")
    be, reason = select.create_backend(m, tiny_repo / "tiny", Settings(model_repository=tiny_repo))
    assert be.info.name == "onnxruntime-cpu"
    assert "no NVIDIA GPU visible" in reason
    be2, reason2 = select.create_backend(
        m, tiny_repo / "tiny", Settings(model_repository=tiny_repo, backend="fake")
    )
    assert be2.info.name == "fake" and "configured" in reason2


def test_auto_prefers_tensorrt_when_an_engine_matches_the_gpu(
    tiny_repo: Path, tmp_path: Path, monkeypatch
) -> None:
    d = tmp_path / "tiny"
    shutil.copytree(tiny_repo / "tiny", d)
    m = read_manifest(d)
    m = m.model_copy(update={"engines": [_engine(m, d, "8.6"), _engine(m, d, "8.9", "int8")]})
    h100 = select.GpuInfo(0, "NVIDIA H100", "9.0", 80 << 30)
    a10 = select.GpuInfo(0, "NVIDIA A10", "8.6", 24 << 30)
    monkeypatch.setattr(select, "tensorrt_version", lambda: "10.9.0")
    s = Settings(model_repository=tmp_path)
    monkeypatch.setattr(select, "gpu_info", lambda device_id=0: a10)
    name, reason = select.choose(m, s)
    assert name == "tensorrt" and "sm_86" in reason
    be, _ = select.create_backend(m, d, s)
    assert be.info.name == "tensorrt"
    # an H100 with no engine for sm_90 falls back to ORT CUDA when onnxruntime-gpu is there …
    monkeypatch.setattr(select, "gpu_info", lambda device_id=0: h100)
    monkeypatch.setattr(select, "ort_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    name, reason = select.choose(m, s)
    assert name == "onnxruntime-cuda" and "no TensorRT engine for sm_90" in reason
    # … and to the CPU when it is not
    monkeypatch.setattr(select, "ort_providers", lambda: ["CPUExecutionProvider"])
    name, reason = select.choose(m, s)
    assert name == "onnxruntime-cpu" and "onnxruntime-gpu not installed" in reason
    assert select.find_engine(m, a10, "int8") is None
    assert select.find_engine(m, select.GpuInfo(0, "L20", "8.9", 0), "auto").precision == "int8"
    # a plan only loads in the TensorRT that built it: another version is skipped, and said so
    monkeypatch.setattr(select, "gpu_info", lambda device_id=0: a10)
    monkeypatch.setattr(select, "tensorrt_version", lambda: "10.13.0")
    name, reason = select.choose(m, s)
    assert name == "onnxruntime-cpu" and "built by TensorRT 10.9.0, runtime is 10.13.0" in reason
    assert "tensorrt" not in [c.name for c in select.candidates(m, s)]


def test_auto_without_onnx_uses_torch_or_explains(tiny_repo: Path, monkeypatch) -> None:
    from service.manifest import Artifact

    monkeypatch.setattr(select, "gpu_info", lambda device_id=0: None)
    m = read_manifest(tiny_repo / "tiny").model_copy(update={"onnx": {}})
    with_weights = m.model_copy(
        update={"checkpoint": [Artifact(path="w.safetensors", sha256="0" * 64, size=1)]}
    )
    s = Settings(model_repository=tiny_repo)
    if select.has_package("torch") and select.has_package("engine_build"):
        name, reason = select.choose(with_weights, s)
        assert name == "torch" and "lists no ONNX graph" in reason
    else:  # the serve-only install: no torch backend to fall back to
        with pytest.raises(BackendUnavailable, match="lists no ONNX graph"):
            select.choose(with_weights, s)
    with pytest.raises(BackendUnavailable, match="no backend can serve"):
        select.choose(m.model_copy(update={"checkpoint": []}), s)


def test_onnxruntime_tensorrt_ep_caches_outside_the_model_and_gives_each_instance_a_session(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """The model repository is a read-only mount in Kubernetes, and the TensorRT EP serialises Run()
    on one session: its engine cache goes to GENDR_ORT_TRT_CACHE_DIR, and instances get sessions."""
    m = read_manifest(tiny_repo / "tiny")
    s = Settings(model_repository=tiny_repo, instances_per_device=2, ort_trt_cache_dir=tmp_path / "ortcache")
    be = select.build("onnxruntime-trt", m, tiny_repo / "tiny", s)
    assert be.session_per_instance and be.cache_dir == tmp_path / "ortcache" / "tiny"
    trt_opts = dict(be._providers()[0][1])
    assert trt_opts["trt_engine_cache_path"] == str(tmp_path / "ortcache" / "tiny")
    assert not str(be.cache_dir).startswith(str(tiny_repo))
    default = select.build("onnxruntime-trt", m, tiny_repo / "tiny", Settings(model_repository=tiny_repo))
    assert not str(default.cache_dir).startswith(str(tiny_repo))
    cuda = select.build("onnxruntime-cuda", m, tiny_repo / "tiny", s)
    assert not cuda.session_per_instance  # the CUDA EP runs concurrent Run() calls on one session


def test_auto_ranks_every_precision_and_chooses_by_the_primary_tile_plan(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """One precision list (service.manifest.PRECISIONS), ranked by select's policy; a precision whose
    only plan is a shape bucket's cannot serve (the primary tile holds what fits no bucket)."""
    from service.manifest import PRECISIONS

    assert set(select.ENGINE_ORDER) == set(PRECISIONS)
    assert select.engine_preference() == ["fp16", "bf16", "int8", "fp8", "fp32"]
    d = tmp_path / "tiny"
    shutil.copytree(tiny_repo / "tiny", d)
    m = read_manifest(d)
    bucket_only = _engine(m, d, "8.6", "fp16", tile=32)
    m = m.model_copy(
        update={"engines": [bucket_only, _engine(m, d, "8.6", "int8"), _engine(m, d, "8.6", "fp32")]}
    )
    a10 = select.GpuInfo(0, "NVIDIA A10", "8.6", 24 << 30)
    ok, why = select.engines_for(m, a10, "auto", "10.9.0")
    assert [(e.precision, e.profile.tile) for e in ok] == [("int8", 64), ("fp32", 64)] and not why
    assert select.find_engine(m, a10, "fp16") is None
    _, why = select.engines_for(m, a10, "auto", "10.13.0")
    assert len(why) == 2 and all("built by TensorRT 10.9.0, runtime is 10.13.0" in w for w in why)
