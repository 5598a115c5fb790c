"""The production TensorRT backend's logic on the CPU, on the stub-checked TensorRT/CUDA double:
batch sizes the batcher uses, profiles, version rule, context memory, device selection, fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cuda_double import FakeGpu
from runtime_helpers import photo_crop
from trt_double import VERSION, EngineSpec, TrtDouble, install
from trt_repo import nearest_up, write_engine_repo

from service.backends import select
from service.backends.base import BackendUnavailable
from service.backends.tensorrt import TensorRTBackend
from service.batcher import TileBatcher
from service.hardware import gpu_info
from service.manifest import read_manifest
from service.metrics import Metrics
from service.settings import Settings
from service.tiling import Stitcher, pad_image, plan_tiles


@pytest.fixture
def dbl(monkeypatch: pytest.MonkeyPatch) -> TrtDouble:
    return install(monkeypatch)


def _tiles(n: int, t: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, t, t, 3), dtype=np.uint8)


def test_the_batcher_only_offers_sizes_the_loaded_plan_runs(
    dbl: TrtDouble, tmp_path: Path, photos: dict[str, np.ndarray]
) -> None:
    """Built for 1,2,4,8 and served with max_batch 4: before load() the backend can only guess; the
    batcher (built before load, as the runtime does) must pad 3 tiles to 4, never send 3."""
    spec = EngineSpec(profiles=[(1, 8, 8)])
    model_dir = write_engine_repo(tmp_path, spec, batch_sizes=[1, 2, 4, 8])
    be = TensorRTBackend(read_manifest(model_dir), model_dir, instances=2, max_batch=4)
    b = TileBatcher(be, model="trt", metrics=Metrics(), max_batch=4, max_queue_delay_s=0.02)
    be.load()
    b.start(be.warmup())
    assert b.batch_sizes == (1, 2, 4)
    img = photo_crop(photos["coffee"], 10, 34)  # 1×3 tiles of 16 with overlap 4
    plan = plan_tiles(img.shape[0], img.shape[1], 16, 4, 2)
    st = Stitcher(plan)
    res = b.reserve(plan.n_tiles)

    def sink(idx, tiles) -> None:
        for i, t in zip(idx, tiles, strict=True):
            st.add(i, t)

    import time

    start = len(dbl.calls)  # after warm-up, which runs every size once
    b.submit(pad_image(img, plan), plan, time.monotonic() + 30, sink).future.result(30)
    res.release()
    np.testing.assert_array_equal(st.result(), nearest_up(img[None], 2)[0])
    executed = [c.args[1][0] for c in dbl.calls[start:] if c.fn == "execute_async_v3"]
    assert plan.n_tiles == 3 and executed == [4] and b.healthy  # padded up, in one call
    b.close()
    be.close()


def test_per_batch_profile_engines_are_refused_at_load(dbl: TrtDouble, tmp_path: Path) -> None:
    spec = EngineSpec(profiles=[(1, 1, 1), (2, 2, 2), (4, 4, 4)])
    model_dir = write_engine_repo(tmp_path, spec, batch_sizes=[1, 2, 4], mode="per-batch")
    be = TensorRTBackend(read_manifest(model_dir), model_dir, max_batch=4)
    with pytest.raises(BackendUnavailable, match="per-batch profile engines are not served"):
        be.load()
    be.close()


def test_profiles_that_do_not_all_cover_the_served_sizes_are_refused(dbl: TrtDouble, tmp_path: Path) -> None:
    """A context stays on its profile: each profile must run every size the batcher may send."""
    spec = EngineSpec(profiles=[(1, 4, 4), (4, 8, 8)])
    model_dir = write_engine_repo(tmp_path, spec, batch_sizes=[1, 2, 4, 8])
    be = TensorRTBackend(read_manifest(model_dir), model_dir, instances=2, max_batch=8)
    be.load()  # sizes in common: 4 only
    assert be.info.batch_sizes == (4,)
    be.close()
    be = TensorRTBackend(read_manifest(model_dir), model_dir, instances=2, max_batch=2)
    with pytest.raises(BackendUnavailable, match="in common"):
        be.load()
    be.close()


def test_a_plan_of_another_tensorrt_version_is_refused_and_skipped_by_auto(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dbl = install(monkeypatch, version="11.4.1.2")  # the runtime here; the plan says VERSION
    model_dir = write_engine_repo(tmp_path, EngineSpec(), batch_sizes=[1, 2, 4])
    m = read_manifest(model_dir)
    assert m.engines[0].tensorrt_version == VERSION != dbl.trt.__version__  # same major.minor
    with pytest.raises(BackendUnavailable, match="no TensorRT engine for sm_90"):
        TensorRTBackend(m, model_dir).load()
    with pytest.raises(BackendUnavailable, match="only loads in the exact version"):
        TensorRTBackend(m, model_dir, engine=m.engines[0]).load()
    with pytest.raises(BackendUnavailable, match=f"built by TensorRT {VERSION}, runtime is 11.4.1.2"):
        select.candidates(m, Settings(model_repository=tmp_path))  # no ONNX, no checkpoint: nothing else


def test_context_memory_is_sized_for_the_sizes_served_not_the_profile_max(
    dbl: TrtDouble, tmp_path: Path
) -> None:
    spec = EngineSpec(profiles=[(1, 8, 8)], memory_base=1000, memory_per_sample=1 << 20)
    model_dir = write_engine_repo(tmp_path, spec, batch_sizes=[1, 2, 4, 8])
    be = TensorRTBackend(read_manifest(model_dir), model_dir, instances=2, max_batch=4)
    be.load()
    sizes = [c.args[2] for c in dbl.calls.of("set_device_memory")]
    assert sizes == [spec.memory(4)] * 2 and spec.memory(4) < spec.memory(8)
    for bs in (1, 2, 4):  # and every served size runs in it
        x = _tiles(bs, seed=bs)
        np.testing.assert_array_equal(be.infer(1, x), nearest_up(x, 2))
    be.close()
    assert dbl.cuda.allocated() == 0


def test_cuda_index_maps_to_nvml_by_pci_bus_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA orders GPUs fastest first, NVML by PCI bus: CUDA index 0 here is NVML's GPU 1."""
    a10 = FakeGpu("NVIDIA A10", (8, 6), 24 << 30, "0000:17:00.0")
    h100 = FakeGpu("NVIDIA H100 80GB HBM3", (9, 0), 80 << 30, "0000:65:00.0")
    install(monkeypatch, gpus=(h100, a10))  # CUDA order

    by_bus = {"0000:17:00.0": a10, "0000:65:00.0": h100}

    class Nvml:  # PCI order: the A10 first
        @staticmethod
        def nvmlInit() -> None: ...

        @staticmethod
        def nvmlShutdown() -> None: ...

        @staticmethod
        def nvmlDeviceGetCount() -> int:
            return 2

        @staticmethod
        def nvmlDeviceGetHandleByIndex(i: int) -> FakeGpu:
            return [a10, h100][i]

        @staticmethod
        def nvmlDeviceGetHandleByPciBusId(bus: str) -> FakeGpu:
            return by_bus[bus.lower()]

        @staticmethod
        def nvmlDeviceGetCudaComputeCapability(h: FakeGpu) -> tuple[int, int]:
            return h.compute_capability

        @staticmethod
        def nvmlDeviceGetName(h: FakeGpu) -> str:
            return h.name

        @staticmethod
        def nvmlDeviceGetPciInfo(h: FakeGpu):
            return type("Pci", (), {"busId": h.pci_bus_id.encode()})()

        @staticmethod
        def nvmlDeviceGetMemoryInfo(h: FakeGpu):
            return type("Mem", (), {"total": h.memory})()

    import importlib.machinery
    import sys
    import types

    mod = types.ModuleType("pynvml")
    mod.__spec__ = importlib.machinery.ModuleSpec("pynvml", None)
    for k in dir(Nvml):
        if k.startswith("nvml"):
            setattr(mod, k, getattr(Nvml, k))
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    g0, g1 = gpu_info(0), gpu_info(1)
    assert g0 is not None and g1 is not None
    assert (g0.name, g0.compute_capability) == ("NVIDIA H100 80GB HBM3", "9.0")
    assert (g1.name, g1.compute_capability) == ("NVIDIA A10", "8.6")
    assert gpu_info(2) is None
