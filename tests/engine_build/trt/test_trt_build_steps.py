"""The TensorRT build step on the CPU: the runtime double (tests/service/trt_double.py) plus a minimal
builder whose plans are double plans, so the step logic — one engine per tile, keys, skip, rebuild,
stale and orphan removal, manifest records — runs without TensorRT or a GPU."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

import engine_build.trt.build as tb
from engine_build.trt.build import Gpu, TrtBuildError, build_engine
from service.manifest import read_manifest


def _fake_builder(monkeypatch: pytest.MonkeyPatch, scale: int) -> tuple[object, list[int], list[int]]:
    """The runtime double plus a minimal TensorRT builder whose plans are double plans of the profile's
    tile: (double, builds (one 1 per build), tiles built in order)."""
    import json

    sys.path.insert(0, str(Path(__file__).parents[2] / "service"))
    from trt_double import EngineSpec, install

    dbl = install(monkeypatch)
    builds: list[int] = []
    tiles: list[int] = []

    class Config:
        builder_optimization_level = 3
        progress_monitor = None
        profiling_verbosity = None

        def set_memory_pool_limit(self, *a: object) -> None: ...
        def clear_flag(self, *a: object) -> None: ...
        def add_optimization_profile(self, p: object) -> int:
            return 0

        def create_timing_cache(self, data: bytes) -> bytes:
            return bytes(data)

        def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
            return True

        def get_timing_cache(self) -> object:
            return types.SimpleNamespace(serialize=lambda: b"tactics")

    class Builder:
        def __init__(self, logger: object) -> None:
            self.tile = 0

        def create_network(self, flags: int) -> object:
            return types.SimpleNamespace(get_input=lambda i: types.SimpleNamespace(name="lr_tile"))

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> object:
            def set_shape(name: str, mn: object, opt: object, mx: object) -> None:
                self.tile = mn[1]  # type: ignore[index]

            return types.SimpleNamespace(set_shape=set_shape)

        def build_serialized_network(self, network: object, config: object) -> bytes:
            builds.append(1)
            tiles.append(self.tile)
            return EngineSpec(tile=self.tile, scale=scale, profiles=[(1, 4, 4)]).plan()

    inspector = json.dumps({"Layers": [{"Name": "conv", "Outputs": [{"Format/Datatype": "Half"}]}]})
    trt = dbl.trt
    for name, value in {
        "Builder": Builder,
        "OnnxParser": lambda net, logger: types.SimpleNamespace(parse_from_file=lambda p: True, num_errors=0),
        "NetworkDefinitionCreationFlag": types.SimpleNamespace(STRONGLY_TYPED=0),
        "MemoryPoolType": types.SimpleNamespace(WORKSPACE=0),
        "BuilderFlag": types.SimpleNamespace(),
        "ProfilingVerbosity": types.SimpleNamespace(DETAILED=2),
        "LayerInformationFormat": types.SimpleNamespace(JSON=1),
        "IProgressMonitor": type("IProgressMonitor", (), {"__init__": lambda self: None}),
    }.items():
        monkeypatch.setattr(trt, name, value, raising=False)
    monkeypatch.setattr(
        type(dbl.trt.Runtime(dbl.trt.Logger()).deserialize_cuda_engine(EngineSpec().plan())),
        "create_engine_inspector",
        lambda self: types.SimpleNamespace(get_engine_information=lambda fmt: inspector),
        raising=False,
    )
    monkeypatch.setattr(tb, "detect_gpu", lambda device_id=0: Gpu(0, "NVIDIA H100 80GB HBM3", "9.0"))
    return dbl, builds, tiles


def test_build_records_the_engine_and_skips_a_second_time(
    tiny_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole build step on the CPU with the runtime double plus a minimal builder: the plan, its
    layer report and the timing cache land in the repository, the manifest records the engine, and
    the same inputs skip the build (the step primitive's key → verify-or-skip)."""
    import json
    import shutil

    repo = tmp_path / "tiny"
    shutil.copytree(tiny_repo, repo)
    m = read_manifest(repo)
    dbl, builds, _ = _fake_builder(monkeypatch, m.tile.graph_scale)
    from trt_double import EngineSpec

    spec = EngineSpec(tile=m.tile.tile, scale=m.tile.graph_scale, profiles=[(1, 4, 4)])
    inspector = json.dumps({"Layers": [{"Name": "conv", "Outputs": [{"Format/Datatype": "Half"}]}]})
    trt = dbl.trt  # type: ignore[attr-defined]
    res = build_engine(repo, "fp16", batch_sizes=[1, 2, 4], progress=False)
    assert not res.skipped and builds == [1]
    e = read_manifest(repo, verify=True).engines[0]
    assert e.tensorrt_version == trt.__version__ and e.profile.batch_sizes == [1, 2, 4]
    assert (repo / e.plan.path).read_bytes() == spec.plan() and e.build["layer_precisions"] == {"Half": 1}
    assert (repo / e.build["layers_json"]).read_text() == inspector
    assert (repo / "engines" / "sm90" / f"timing-trt{trt.__version__}.cache").read_bytes() == b"tactics"
    assert not list((repo / "engines").glob(".tmp-*"))  # the step's temporary folder is gone
    again = build_engine(repo, "fp16", batch_sizes=[1, 2, 4], progress=False)
    assert again.skipped and builds == [1] and again.engine == e
    (repo / e.plan.path).write_bytes(b"damaged")  # a damaged plan fails its sha256: rebuilt
    assert not build_engine(repo, "fp16", batch_sizes=[1, 2, 4], progress=False).skipped and builds == [1, 1]


def _add_bucket(repo: Path, tile: int) -> None:
    """A `tile`-px fp16 shape bucket (the primary graph's bytes: the fake parser does not read it)."""
    import shutil

    from service.manifest import ShapeGraph, make_artifact, write_manifest

    m = read_manifest(repo)
    v = m.onnx["fp16"]
    dst = repo / "onnx" / "fp16" / f"t{tile}" / "model.onnx"
    dst.parent.mkdir(parents=True)
    shutil.copyfile(repo / v.graph.path, dst)
    sg = ShapeGraph(tile=tile, graph=make_artifact(repo, dst), key=f"bucket-{tile}")
    write_manifest(
        repo, m.model_copy(update={"onnx": {**m.onnx, "fp16": v.model_copy(update={"shapes": [sg]})}})
    )


def test_one_engine_per_tile_each_skipped_rebuilt_and_dropped_on_its_own(
    tiny_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 32-px bucket beside the 64-px primary: two plans, two manifest engines (files apart), each tile
    checked against TensorRT's rules at its own size; a second run skips both; a damaged bucket plan
    rebuilds the bucket only; `--tile` builds one; a bucket the graphs lose loses its engine."""
    import shutil

    repo = tmp_path / "tiny"
    shutil.copytree(tiny_repo, repo)
    _add_bucket(repo, 32)
    g = read_manifest(repo).tile.graph_scale
    _, builds, tiles = _fake_builder(monkeypatch, g)
    from trt_double import EngineSpec

    checked: list[tuple[int, int]] = []
    monkeypatch.setattr(
        tb, "require_trt_compatible", lambda path, tile, out_tile: checked.append((tile, out_tile))
    )
    res = build_engine(repo, "fp16", batch_sizes=[1, 2, 4], progress=False)
    assert [(t.tile, t.skipped) for t in res.tiles] == [(32, False), (64, False)] and tiles == [32, 64]
    assert checked == [(32, 32 * g), (64, 64 * g)] and res.engine.profile.tile == 64
    m = read_manifest(repo, verify=True)
    by_tile = {e.profile.tile: e for e in m.engines}
    assert sorted(by_tile) == [32, 64] and by_tile[32].plan.path != by_tile[64].plan.path
    assert by_tile[32].onnx_sha256 == m.shape_graph("fp16", 32).graph.sha256  # type: ignore[union-attr]
    for t, e in by_tile.items():
        assert (repo / e.plan.path).read_bytes() == EngineSpec(tile=t, scale=g, profiles=[(1, 4, 4)]).plan()
        assert m.engine_for("fp16", "9.0", e.tensorrt_version, tile=t) == e
    again = build_engine(repo, "fp16", batch_sizes=[1, 2, 4], progress=False)
    assert again.skipped and len(builds) == 2
    (repo / by_tile[32].plan.path).write_bytes(b"damaged")
    res = build_engine(repo, "fp16", batch_sizes=[1, 2, 4], progress=False)
    assert [(t.tile, t.skipped) for t in res.tiles] == [(32, False), (64, True)] and tiles == [32, 64, 32]
    only = build_engine(repo, "fp16", batch_sizes=[1, 2], tile=32, progress=False)  # new sizes: new key
    assert [t.tile for t in only.tiles] == [32] and tiles[-1] == 32 and len(builds) == 4
    m = read_manifest(repo, verify=True)
    assert (
        len(m.engines) == 2 and m.engine_for("fp16", "9.0", only.engine.tensorrt_version, 32) == only.engine
    )
    old32 = by_tile[32].plan.path
    assert not (repo / old32).exists()  # the stale plan of that tile went with its entry
    v = m.onnx["fp16"]
    bucket_plan = repo / only.engine.plan.path
    from service.manifest import write_manifest

    write_manifest(
        repo, m.model_copy(update={"onnx": {**m.onnx, "fp16": v.model_copy(update={"shapes": []})}})
    )
    res = build_engine(repo, "fp16", batch_sizes=[1, 2, 4], progress=False)
    assert [t.tile for t in res.tiles] == [64] and res.skipped
    assert [e.profile.tile for e in read_manifest(repo).engines] == [64] and not bucket_plan.exists()
    with pytest.raises(TrtBuildError, match=r"exported for 64-px tiles; re-export with --tile 32"):
        build_engine(repo, "fp16", tile=32)
