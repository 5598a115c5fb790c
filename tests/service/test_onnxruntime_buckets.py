"""ONNX Runtime serving shape buckets and a dynamic (whole-image) graph: one session set per graph, the
planner's choice per size, and outputs equal to the network run on the same padded input (numpy)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_onnx import reference, write_bucket_repo

from service.backends.base import IntegrityError
from service.backends.onnxruntime import OnnxRuntimeBackend
from service.manifest import read_manifest
from service.metrics import Metrics
from service.pixels.tiling import pad_image
from service.runtime import Runtime, UpscaleJob
from service.scheduling.costs import CostTable
from service.settings import Settings


def test_backend_loads_a_session_per_shape_and_times_each(tmp_path: Path) -> None:
    d = write_bucket_repo(tmp_path)
    be = OnnxRuntimeBackend(read_manifest(d), d, max_batch=2, intra_op_threads=1, max_call_pixels=96 * 96)
    be.load()
    info = be.info
    assert info.tiles == (32, 64) and info.dynamic and info.extra["sessions"] == "3"
    t = be.warmup()
    assert {(32, 32, 1), (32, 32, 2), (64, 64, 1), (64, 64, 2), (64, 64, 1)} <= t.keys()
    assert any(h == w == 96 for h, w, b in t)  # a whole-image sample above the primary tile
    x = np.random.default_rng(0).integers(0, 256, (1, 48, 80, 3), np.uint8)
    np.testing.assert_array_equal(be.infer(0, x), reference(x))  # a non-square whole image
    with pytest.raises(ValueError, match="no graph"):
        OnnxRuntimeBackend(read_manifest(d), d, max_call_pixels=0).infer(0, x)
    be.close()


def test_a_static_graph_listed_as_dynamic_is_refused(tmp_path: Path) -> None:
    d = write_bucket_repo(tmp_path)
    m = read_manifest(d)
    dyn = m.shape_graph("fp32", None)
    assert dyn is not None
    (d / dyn.graph.path).write_bytes((d / m.onnx["fp32"].graph.path).read_bytes())
    bad = m.model_copy(
        update={
            "onnx": {
                "fp32": m.onnx["fp32"].model_copy(
                    update={
                        "shapes": [
                            s
                            if s.tile is not None
                            else s.model_copy(update={"graph": _artifact(d, dyn.graph.path)})
                            for s in m.onnx["fp32"].shapes
                        ]
                    }
                )
            }
        }
    )
    with pytest.raises(
        IntegrityError, match="failed the io check: the dynamic-shape graph has a static input"
    ):
        OnnxRuntimeBackend(bad, d).load()  # the graph is not what the manifest says: refused, not fallen back


def _artifact(d: Path, rel: str):
    from service.manifest import make_artifact

    return make_artifact(d, d / rel)


def test_runtime_runs_each_size_on_its_cheapest_graph_exactly(tmp_path: Path) -> None:
    write_bucket_repo(tmp_path)
    s = Settings(
        model_repository=tmp_path, backend="onnxruntime-cpu", max_batch=2, whole_image_max_pixels=96 * 96
    )

    async def go() -> None:
        rt = Runtime.from_settings(s, Metrics())
        await rt.start()
        m = rt.get(None)
        assert m.batcher.costs is not None and len(m.batcher.costs.rows()) >= 5  # measured at warm-up
        # The planner's choice follows the measured table, which depends on this machine's speed and
        # load; the test fixes it to an a + b·pixels table so the choice is the same everywhere.
        m.batcher.costs = CostTable(
            {(h, w, b): 0.005 + 1e-6 * b * h * w for h, w, b in (m.batcher.costs.entries())},
            m.batcher.batch_sizes,
        )
        rng = np.random.default_rng(1)
        for h, w in ((20, 25), (60, 40), (90, 70)):
            img = rng.integers(0, 256, (h, w, 3), np.uint8)
            plan = m.plan(h, w, h, w)
            with m.reserve(plan) as res:
                out = await m.upscale(UpscaleJob(img, h, w, "none", time.monotonic() + 60, "o"), res)
            assert plan.n_tiles == 1, (h, w, plan.tiles.shape)  # each fits one call
            p = plan.tiles
            want = reference(pad_image(img, p)[None])[0][
                p.margin_y : p.margin_y + h, p.margin_x : p.margin_x + w
            ]
            np.testing.assert_array_equal(out.image, want)
        assert m.plan(20, 25, 20, 25).tiles.shape == (32, 32)  # the 32 bucket, not the 64 tile
        assert m.plan(90, 70, 90, 70).tiles.shape == (96, 80)  # whole image, rounded to 16
        await rt.close()

    asyncio.run(asyncio.wait_for(go(), 120))
