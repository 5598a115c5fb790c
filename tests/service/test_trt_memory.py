"""A plan served on another GPU product of its architecture only when its measured memory fits (issue 26,
item 3), `GENDR_INSTANCES_PER_DEVICE=auto` sized from that memory — on the stub-checked TensorRT double."""

from __future__ import annotations

from pathlib import Path

import pytest
from cuda_double import FakeGpu
from trt_double import EngineSpec, install
from trt_repo import write_engine_repo

from service.backends.base import BackendUnavailable
from service.backends.tensorrt import TensorRTBackend
from service.backends.trt_memory import MAX_AUTO_INSTANCES, fit_instances
from service.manifest import read_manifest

L20 = FakeGpu("NVIDIA L20", (8, 9), 48 << 30, "0000:17:00.0")
L4 = FakeGpu("NVIDIA L4", (8, 9), 24 << 30, "0000:17:00.0")


def _repo(tmp_path: Path, built_on: FakeGpu) -> Path:
    return write_engine_repo(
        tmp_path, EngineSpec(profiles=[(1, 4, 8)]), batch_sizes=[1, 2, 4, 8], gpu=built_on
    )


def test_a_plan_built_on_another_product_is_served_when_it_fits_and_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    install(monkeypatch, gpus=(L4,))
    model_dir = _repo(tmp_path, L20)
    be = TensorRTBackend(read_manifest(model_dir), model_dir, instances=2, max_batch=4)
    be.load()
    try:
        assert be.instances == 2
        assert "built on NVIDIA L20, served on NVIDIA L4 (same sm_89)" in be.placement
        assert be.info.extra["placement"] == be.placement
    finally:
        be.close()


def test_instances_that_do_not_fit_the_gpu_are_refused_with_the_figures(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tiny = FakeGpu("NVIDIA L4", (8, 9), 24 << 20, "0000:17:00.0")  # 24 MiB: one instance, not sixteen
    install(monkeypatch, gpus=(tiny,))
    model_dir = _repo(tmp_path, L20)
    be = TensorRTBackend(read_manifest(model_dir), model_dir, instances=16, max_batch=4)
    with pytest.raises(
        BackendUnavailable, match=r"16 instances need .* MiB .* lower GENDR_INSTANCES_PER_DEVICE"
    ):
        be.load()
    be.close()


def test_auto_instances_follow_the_free_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    counts = {}
    for mib in (12, 24, 1 << 16):
        gpu = FakeGpu("NVIDIA L20", (8, 9), mib << 20, "0000:17:00.0")
        install(monkeypatch, gpus=(gpu,))
        model_dir = _repo(tmp_path / str(mib), L20)
        be = TensorRTBackend(read_manifest(model_dir), model_dir, instances="auto", max_batch=4)
        be.load()
        counts[mib] = be.instances
        assert be.placement.startswith("instances auto:")
        be.close()
    assert 1 <= counts[12] <= counts[24] <= counts[1 << 16] == MAX_AUTO_INSTANCES
    assert counts[12] < MAX_AUTO_INSTANCES


def test_the_fit_arithmetic() -> None:
    mib = 1 << 20
    f = fit_instances(1000 * mib, 900 * mib, 800 * mib, 3, auto=False)  # plans 100, one instance 100
    assert (f.instances, f.per_instance, f.weights) == (3, 100 * mib, 100 * mib)
    assert fit_instances(1000 * mib, 900 * mib, 800 * mib, 1, auto=True).instances == 8  # 1 + 720 // 100
    with pytest.raises(BackendUnavailable):
        fit_instances(1000 * mib, 900 * mib, 800 * mib, 9, auto=False)
