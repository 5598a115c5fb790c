"""The production TensorRT backend's logic on the CPU, on the stub-checked TensorRT/CUDA double:
batch sizes the batcher uses, profiles, version rule, context memory, device selection, fallback, and
shape buckets (a plan per tile, a context per tile and batch size, one shared memory block per instance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cuda_double import FakeGpu
from runtime_helpers import photo_crop
from trt_double import VERSION, EngineSpec, TrtDouble, install
from trt_repo import nearest_up, write_engine_repo

from service.backends import select
from service.backends.base import BackendUnavailable, IntegrityError
from service.backends.tensorrt import TensorRTBackend
from service.hardware import gpu_info
from service.manifest import Manifest, read_manifest
from service.metrics import Metrics
from service.pixels.tiling import Stitcher, pad_image, plan_tiles
from service.scheduling.batcher import TileBatcher
from service.settings import Settings


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


@pytest.mark.parametrize("old", ["10.0.1.6", "9.3.0.1"])
def test_tensorrt_older_than_10_1_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, old: str
) -> None:
    """10.0 lacks set_device_memory(ptr, size) and get_device_memory_size_for_profile_v2: the backend,
    `auto` and the engine build refuse it up front instead of failing on the first missing call."""
    dbl = install(monkeypatch, version=old)
    model_dir = write_engine_repo(tmp_path, EngineSpec(tensorrt_version=old), batch_sizes=[1, 2])
    m = read_manifest(model_dir)
    with pytest.raises(BackendUnavailable, match=rf"TensorRT {old} is older than 10\.1") as err:
        TensorRTBackend(m, model_dir).load()
    assert "\n" not in str(err.value) and not dbl.calls.of("deserialize_cuda_engine")
    with pytest.raises(BackendUnavailable, match=rf"TensorRT {old} is older than 10\.1"):
        select.candidates(m, Settings(model_repository=tmp_path))  # no ONNX, no checkpoint: nothing else
    tools = pytest.importorskip("engine_build.trt.tools")
    with pytest.raises(tools.TrtBuildError, match=rf"TensorRT {old} is older than 10\.1"):
        tools.import_tensorrt()


def test_the_tensorrt_floor_is_the_same_in_pyproject_and_the_code() -> None:
    import tomllib

    from service.hardware import TENSORRT_MIN, tensorrt_too_old

    extra = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    pins = [p for p in extra["project"]["optional-dependencies"]["trt"] if p.startswith("tensorrt")]
    assert pins == ["tensorrt>={}.{}".format(*TENSORRT_MIN)] == ["tensorrt>=10.1"]
    assert tensorrt_too_old("10.1.0.27") is None and tensorrt_too_old("11.4.0.106") is None
    assert tensorrt_too_old("10.0.1.6") and tensorrt_too_old("garbage")


def test_context_memory_is_sized_for_the_sizes_served_not_the_profile_max(
    dbl: TrtDouble, tmp_path: Path
) -> None:
    spec = EngineSpec(profiles=[(1, 8, 8)], memory_base=1000, memory_per_sample=1 << 20)
    model_dir = write_engine_repo(tmp_path, spec, batch_sizes=[1, 2, 4, 8])
    be = TensorRTBackend(read_manifest(model_dir), model_dir, instances=2, max_batch=4)
    be.load()
    sizes = [c.args[2] for c in dbl.calls.of("set_device_memory")]
    assert sizes == [spec.memory(4)] * 2 * 3 and spec.memory(4) < spec.memory(8)  # instances × sizes
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


# ------------------------------------------------------------------------------ shape buckets (issue 12)


def test_every_tile_runs_on_its_own_context_over_one_shared_memory_block(
    dbl: TrtDouble, tmp_path: Path
) -> None:
    """A 64-px primary plan and a 32-px bucket plan: both load, each instance gets a context per tile,
    a batch runs on the context of its tile, and an instance's contexts share one activation block
    sized for the larger need of the two (here the bucket's, so sizing by the primary alone would fail)."""
    primary = EngineSpec(tile=64, profiles=[(1, 4, 8)], memory_base=1 << 16, memory_per_sample=1 << 20)
    bucket = EngineSpec(tile=32, profiles=[(1, 4, 8)], memory_base=5 << 20, memory_per_sample=1 << 18)
    model_dir = write_engine_repo(tmp_path, primary, batch_sizes=[1, 2, 4, 8], buckets=[bucket])
    be = TensorRTBackend(read_manifest(model_dir), model_dir, instances=2, max_batch=4)
    be.load()
    try:
        assert (be.info.tiles, be.info.dynamic, be.info.batch_sizes) == ((32, 64), False, (1, 2, 4))
        assert sorted(e._spec.tile for e in dbl.engines) == [32, 64]
        assert [len(e._contexts) for e in dbl.engines] == [6, 6]  # a context per instance × batch size
        need = max(primary.memory(4), bucket.memory(4))
        assert need == bucket.memory(4) > primary.memory(4)
        mem = [c.args[1:] for c in dbl.calls.of("set_device_memory")]
        assert len(mem) == 12 and {size for _, size in mem} == {need}
        assert len({ptr for ptr, _ in mem}) == 2  # one block per instance, shared by its six contexts
        assert [c.args[0] for c in dbl.calls.of("cudaMalloc")].count(need) == 2
        for inst in (0, 1):
            for t in (32, 64):
                for bs in be.info.batch_sizes:
                    start = len(dbl.calls)
                    x = _tiles(bs, t, seed=t + bs + inst)
                    y = be.infer(inst, x)
                    assert y.shape == (bs, 2 * t, 2 * t, 3)
                    np.testing.assert_array_equal(y, nearest_up(x, 2))
                    (run,) = [c for c in dbl.calls[start:] if c.fn == "execute_async_v3"]
                    assert run.args[1] == (bs, t, t, 3)  # the double refuses a shape of another tile
        buf = be.input_buffer(1, 2, 32)  # pinned per (instance, tile): gathered into, no extra copy
        assert buf.shape == (2, 32, 32, 3) and buf.ctypes.data != be.input_buffer(1, 2, 64).ctypes.data
        buf[:] = _tiles(2, 32, seed=7)
        np.testing.assert_array_equal(be.infer(1, buf), nearest_up(_tiles(2, 32, seed=7), 2))
        with pytest.raises(ValueError, match="not served"):
            be.infer(0, _tiles(1, 48))
        timings = be.warmup()
        assert set(timings) == {(t, t, b) for t in (32, 64) for b in (1, 2, 4)}
    finally:
        be.close()
    assert dbl.cuda.allocated() == 0 and not dbl.cuda.host_mem


def test_bucket_plans_that_cannot_serve_are_left_out_and_logged(
    dbl: TrtDouble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """48 px has a good plan; 32 px has a graph but no plan; 16 px a plan of another TensorRT version; 40 px
    a plan whose profile stops at batch 2 while 1, 2, 4 are served. Only 48 joins the primary, each
    refusal logged (none of these is an integrity failure: the plans are the ones the manifest lists)."""
    ok = EngineSpec(tile=48, profiles=[(1, 4, 8)])
    other_version = EngineSpec(tile=16, profiles=[(1, 4, 8)])
    short = EngineSpec(tile=40, profiles=[(1, 2, 2)])
    model_dir = write_engine_repo(
        tmp_path,
        EngineSpec(tile=64, profiles=[(1, 4, 8)]),
        batch_sizes=[1, 2, 4],
        buckets=[ok, 32, other_version, short],
    )
    m = read_manifest(model_dir)
    plan = model_dir / m.engine_for("fp16", "9.0", VERSION, tile=16).plan.path
    plan.write_bytes(EngineSpec(tile=16, tensorrt_version="11.3.0.1").plan())
    m = _rehash(model_dir, m)
    be = TensorRTBackend(m, model_dir, max_batch=4)
    with caplog.at_level("WARNING", logger="service.backends.trt_plans"):
        be.load()
    try:
        assert be.info.tiles == (48, 64) and be.info.batch_sizes == (1, 2, 4)
        left_out = {r.getMessage().split("shape bucket ")[1].split(" ")[0] for r in caplog.records}
        assert left_out == {"16", "32", "40"}
        assert "no fp16 plan for 32-px tiles" in caplog.text and "could not deserialise" in caplog.text
        assert "profiles run batch 1..2" in caplog.text
        x = _tiles(4, 48)
        np.testing.assert_array_equal(be.infer(0, x), nearest_up(x, 2))
        with pytest.raises(ValueError, match="not served"):
            be.infer(0, _tiles(1, 32))
    finally:
        be.close()


def _rehash(model_dir: Path, m: Manifest) -> Manifest:
    """The manifest with every engine's plan hash recomputed (a plan replaced by its owner, not tampered)."""
    from service.manifest import make_artifact, write_manifest

    engines = [
        e.model_copy(update={"plan": make_artifact(model_dir, model_dir / e.plan.path)}) for e in m.engines
    ]
    m = m.model_copy(update={"engines": engines})
    write_manifest(model_dir, m)
    return m


@pytest.mark.parametrize("tile", [64, 32])
def test_a_tampered_plan_refuses_the_model_primary_or_bucket(
    dbl: TrtDouble, tmp_path: Path, tile: int
) -> None:
    """A plan that fails its sha256 is not left out like a plan this TensorRT cannot load: the model
    is refused (IntegrityError names the file and the check), so no other backend serves it either."""
    model_dir = write_engine_repo(
        tmp_path, EngineSpec(tile=64), batch_sizes=[1, 2], buckets=[EngineSpec(tile=32)]
    )
    m = read_manifest(model_dir)
    plan = model_dir / m.engine_for("fp16", "9.0", VERSION, tile=tile).plan.path
    data = bytearray(plan.read_bytes())
    data[-2] ^= 0x01  # same size
    plan.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"engine-t{tile}-fake.plan failed the sha256 check") as err:
        TensorRTBackend(m, model_dir, max_batch=2).load()
    assert err.value.check == "sha256" and err.value.file.endswith(f"engine-t{tile}-fake.plan")
    assert dbl.cuda.allocated() == 0


def test_the_primary_tile_plan_is_required(dbl: TrtDouble, tmp_path: Path) -> None:
    """A bucket plan alone serves nothing: the primary tile holds every image that fits no bucket."""
    bucket = EngineSpec(tile=32, profiles=[(1, 4, 8)])
    model_dir = write_engine_repo(tmp_path, EngineSpec(tile=64), buckets=[bucket])
    m = read_manifest(model_dir)
    m = m.model_copy(update={"engines": [e for e in m.engines if e.profile.tile == 32]})
    with pytest.raises(BackendUnavailable, match="no TensorRT engine for sm_90"):
        TensorRTBackend(m, model_dir).load()
    with pytest.raises(BackendUnavailable, match="built for 32-px tiles, the primary is 64"):
        TensorRTBackend(m, model_dir, engine=m.engines[0]).load()
    assert select.find_engine(m, select.GpuInfo(0, "H100", "9.0"), "auto", VERSION) is None
    assert not dbl.cuda.allocated()


def test_cuda_graphs_are_captured_per_tile_and_batch(dbl: TrtDouble, tmp_path: Path) -> None:
    bucket = EngineSpec(tile=32, profiles=[(1, 4, 8)])
    model_dir = write_engine_repo(
        tmp_path, EngineSpec(tile=64, profiles=[(1, 4, 8)]), batch_sizes=[1, 2, 4], buckets=[bucket]
    )
    be = TensorRTBackend(read_manifest(model_dir), model_dir, instances=2, max_batch=4, cuda_graphs=True)
    be.load()
    try:
        be.warmup()
        for inst in (0, 1):
            assert be.graph_sizes(inst, 32) == be.graph_sizes(inst, 64) == (1, 2, 4)
        assert len(dbl.calls.of("cudaStreamBeginCapture")) == 2 * 2 * 3  # instances × tiles × sizes
        for t in (64, 32, 64):  # alternating tiles replay their own graphs
            x = _tiles(2, t, seed=t)
            np.testing.assert_array_equal(be.infer(1, x), nearest_up(x, 2))
            assert dbl.calls[-2].fn == "cudaGraphLaunch"
    finally:
        be.close()
    assert dbl.cuda.allocated() == 0
