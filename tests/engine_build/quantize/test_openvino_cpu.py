"""The OpenVINO CPU backend: same fp32 ONNX graph, same outputs as ONNX Runtime (fp32), bf16 within the
quality bound where the CPU has bf16 units, and `auto` choosing it only on such CPUs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("openvino")

from test_quantize_cpu import photo_repo  # noqa: F401  (the photo-like ×4 test network)

from engine_build.verify.parity import compare, graph_input_tiles, onnx_runner
from service.backends import select
from service.backends.base import BackendUnavailable, TileFunction
from service.backends.onnxruntime import INT8_MIN_PSNR_DB
from service.backends.openvino import OpenVinoBackend, bf16_flags, resolve_precision
from service.backends.select import openvino_candidate
from service.manifest import read_manifest
from service.settings import Settings


def _tiles(small_photos) -> np.ndarray:
    return graph_input_tiles(small_photos, 32, 4, 4, n=6, seed=3)


def test_fp32_matches_onnxruntime(photo_repo: Path, small_photos) -> None:  # noqa: F811
    m = read_manifest(photo_repo, verify=True)
    x = _tiles(small_photos)
    ov = TileFunction(OpenVinoBackend(m, photo_repo, precision="fp32", max_batch=2))
    assert ov.backend.info.name == "openvino-cpu" and ov.backend.info.precision == "fp32"
    ref = onnx_runner(photo_repo, "fp32")(x)
    out = ov(x)
    assert out.shape == ref.shape == (6, 128, 128, 3) and out.dtype == np.uint8
    c = compare(out, ref)
    assert c["psnr_db"] >= 50 and c["max_abs_err"] <= 2, c
    ov.close()


def test_instances_are_independent_streams_with_a_dynamic_batch(photo_repo: Path, small_photos) -> None:  # noqa: F811
    """Two instances (the batcher's workers) at once, batch sizes 1..3 on one compiled model."""
    import threading

    m = read_manifest(photo_repo, verify=True)
    be = OpenVinoBackend(m, photo_repo, precision="fp32", instances=2, intra_op_threads=1, max_batch=3)
    be.load()
    t = m.tile.tile
    assert be.warmup().keys() == {(t, t, 1), (t, t, 2), (t, t, 3)} and be.info.extra["streams"] == "2"
    x = _tiles(small_photos)
    ref = onnx_runner(photo_repo, "fp32")(x)
    got: dict[int, np.ndarray] = {}
    ths = [
        threading.Thread(target=lambda i=i: got.update({i: be.infer(i, x[3 * i : 3 * i + 3])}))
        for i in (0, 1)
    ]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert compare(np.concatenate([got[0], got[1]]), ref)["max_abs_err"] <= 2
    be.close()
    assert not be.healthy()


@pytest.mark.skipif(not bf16_flags(), reason="this CPU has no bf16 matrix unit (amx_bf16 / avx512_bf16)")
def test_bf16_within_the_quality_bound(photo_repo: Path, small_photos) -> None:  # noqa: F811
    m = read_manifest(photo_repo, verify=True)
    be = OpenVinoBackend(m, photo_repo, precision="auto", max_batch=1)
    assert be.info.precision == "bf16" and be.info.extra["inference_precision"] == "bf16"
    x = _tiles(small_photos)
    c = compare(TileFunction(be)(x), onnx_runner(photo_repo, "fp32")(x))
    assert c["psnr_db"] >= INT8_MIN_PSNR_DB and c["max_abs_err"] > 0, c  # bf16 really ran, within bound
    be.close()


def test_precision_follows_the_cpu_flags() -> None:
    assert resolve_precision("auto", {"avx2", "amx_bf16"}) == "bf16"
    assert resolve_precision("auto", {"avx2", "avx512f"}) == "fp32"
    assert resolve_precision("fp32", {"amx_bf16"}) == "fp32"
    with pytest.raises(BackendUnavailable, match="emulated"):
        resolve_precision("bf16", {"avx2"})
    with pytest.raises(BackendUnavailable, match="int8 graphs are served by onnxruntime-cpu"):
        resolve_precision("int8", {"amx_bf16"})


def test_auto_picks_openvino_only_on_bf16_cpus(photo_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    import service.backends.openvino as ovmod

    monkeypatch.setattr(select, "openvino_candidate", openvino_candidate)  # tests/conftest.py turns it off
    m = read_manifest(photo_repo, verify=False)
    monkeypatch.setattr(select, "gpu_info", lambda _i: None)
    monkeypatch.setattr(ovmod, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    names = [c.name for c in select.candidates(m, Settings(backend="auto"))]
    assert names[:2] == ["openvino-cpu", "onnxruntime-cpu"]  # ONNX Runtime stays the fallback
    assert "amx_bf16" in select.candidates(m, Settings(backend="auto"))[0].reason
    # an explicit int8 request is ONNX Runtime's; a CPU without bf16 units keeps ONNX Runtime first
    assert select.candidates(m, Settings(backend="auto", precision="int8"))[0].name == "onnxruntime-cpu"
    gendr = m.model_copy(update={"kind": "gendr"})  # bf16 quality measured for single networks only
    assert select.candidates(gendr, Settings(backend="auto"))[0].name == "onnxruntime-cpu"
    monkeypatch.setattr(ovmod, "cpu_flags", lambda: {"avx512f"})
    assert select.candidates(m, Settings(backend="auto"))[0].name == "onnxruntime-cpu"
    monkeypatch.setattr(select, "has_package", lambda name: name != "openvino")
    monkeypatch.setattr(ovmod, "cpu_flags", lambda: {"amx_bf16"})
    assert select.candidates(m, Settings(backend="auto"))[0].name == "onnxruntime-cpu"
