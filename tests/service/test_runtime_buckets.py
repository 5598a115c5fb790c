"""Shape buckets and whole images through the real runtime, on the fake backend's a + b·n cost model
(its warm-up table is computed from the model, not timed, so the planner's choices are deterministic)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
from prometheus_client import generate_latest
from runtime_helpers import nearest, write_fake_repo

from service.backends.fake import FakeBackend
from service.metrics import Metrics
from service.pixels.imageops import resize_rgb
from service.runtime import Runtime, UpscaleJob
from service.settings import Settings


def bucket_runtime(tmp_path: Path, **settings: object) -> tuple[Runtime, list[FakeBackend]]:
    repo = write_fake_repo(tmp_path, name="fake", tile=32, overlap=8, scale=2)
    s = Settings(
        model_repository=repo,
        **{
            "max_queue_delay_ms": 0.0,
            "fake_tiles": [16],
            "fake_dynamic": True,
            "whole_image_max_pixels": 64 * 64,
            "fake_delay_s": 0.02,  # large against sleep overshoot on a loaded machine: choices stay put
            "fake_per_tile_s": 0.01,
            **settings,
        },
    )
    made: list[FakeBackend] = []

    def factory(m, d, st):
        be = FakeBackend.from_settings("fake", m, d, st)
        made.append(be)
        return be, "test"

    return Runtime.from_settings(s, Metrics(), backend_factory=factory), made


def test_each_size_runs_on_the_cheapest_shape_and_comes_out_exact(tmp_path: Path) -> None:
    async def go() -> None:
        rt, made = bucket_runtime(tmp_path)
        await rt.start()
        m = rt.get(None)
        be = made[-1]
        rng = np.random.default_rng(3)
        cases = {  # input size → (expected engine input shape, calls)
            (10, 10): ((16, 16), 1),  # fits the 16 bucket: one tile, not a padded 32
            (30, 30): ((32, 32), 1),  # fits the primary tile: one tile (no 2×2 tile tax)
            (60, 52): ((64, 56), 1),  # whole image in one dynamic call beats 9 tiles of 32
            (150, 100): (None, 6),  # above the 64² budget: 3 × 2 equal rectangles under it
        }
        for (h, w), (shape, calls) in cases.items():
            img = rng.integers(0, 256, (h, w, 3), np.uint8)
            plan = m.plan(h, w, 2 * h, 2 * w)
            before = len(be.shapes)
            with m.reserve(plan) as res:
                out = await m.upscale(UpscaleJob(img, 2 * h, 2 * w, "none", time.monotonic() + 30, "b"), res)
            ran = be.shapes[before:]
            np.testing.assert_array_equal(out.image, nearest(img, 2))
            assert len(ran) == calls and out.tiles == plan.n_tiles, ((h, w), ran)
            if shape is not None:
                assert {(hh, ww) for _, hh, ww in ran} == {shape}
            else:
                assert all(b == 1 and hh * ww <= 64 * 64 for b, hh, ww in ran)
        d = m.describe()
        assert d["shapes"] == {"tiles": [16, 32], "dynamic": True, "whole_image_max_pixels": 4096}
        rows = {(r["height"], r["width"], r["batch"]): r["seconds"] for r in d["cost_table"]}
        assert rows[(16, 16, 1)] < rows[(32, 32, 1)] < rows[(32, 32, 4)]
        text = generate_latest(rt.metrics.registry).decode()
        assert 'gendr_engine_call_seconds{batch="1",model="fake",shape="16x16"}' in text
        assert 'gendr_plan_shape_total{model="fake",shape="dynamic"} 2.0' in text
        await rt.close()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_a_decoded_image_larger_than_its_header_is_replanned_and_admitted(tmp_path: Path) -> None:
    async def go() -> None:
        rt, _ = bucket_runtime(tmp_path)
        await rt.start()
        m = rt.get(None)
        res = m.reserve(m.plan(8, 8, 16, 16))
        assert res.tiles == 1
        img = np.full((200, 200, 3), 9, np.uint8)
        out = await m.upscale(UpscaleJob(img, 400, 400, "none", time.monotonic() + 30, "g"), res)
        assert res.released and res.tiles > 1 and (out.image == 9).all()
        assert m.batcher.stats()["reserved_tiles"] == 0
        await rt.close()

    asyncio.run(asyncio.wait_for(go(), 60))


def test_stitched_whole_image_grid_matches_the_reference_resize(tmp_path: Path) -> None:
    """×2 through the dynamic grid, then a post-resize to a non-native size: the same pixels as the
    nearest-neighbour reference through the same resizes."""

    async def go() -> None:
        rt, _ = bucket_runtime(tmp_path)
        await rt.start()
        m = rt.get(None)
        img = np.random.default_rng(5).integers(0, 256, (90, 70, 3), np.uint8)
        with m.reserve(m.plan(90, 70, 150, 117)) as res:
            out = await m.upscale(UpscaleJob(img, 150, 117, "none", time.monotonic() + 30, "r"), res)
        np.testing.assert_array_equal(out.image, resize_rgb(nearest(img, 2), 150, 117))
        await rt.close()

    asyncio.run(asyncio.wait_for(go(), 60))
