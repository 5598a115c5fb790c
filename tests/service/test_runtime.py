"""The runtime contract (docs/runtime-api.md): the tiny GenDR through ONNX Runtime, and every failure
mode with the fake backend. Async tests run their own event loop with asyncio.run."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_helpers import nearest, write_fake_repo

from service.backends.fake import FakeBackend, FakeBehaviour
from service.errors import BadRequest, DeadlineExceeded, Draining, EngineFailure, ModelNotFound, NotReady
from service.metrics import Metrics
from service.pixels.imageops import resize_rgb
from service.pixels.pipeline import make_plan, run_sync
from service.runtime import ModelRuntime, Runtime, UpscaleJob, UpscaleOutcome
from service.settings import Settings


def arun(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(fn(), 120))


async def upscale(
    m: ModelRuntime,
    img: np.ndarray,
    oh: int,
    ow: int,
    *,
    color_fix: str | None = "none",
    deadline_s: float = 60.0,
    rid: str = "r",
) -> UpscaleOutcome:
    """What the HTTP layer does: plan from the header size, reserve, then upscale the decoded image."""
    res = m.reserve(m.plan(img.shape[0], img.shape[1], oh, ow))
    return await m.upscale(UpscaleJob(img, oh, ow, color_fix, time.monotonic() + deadline_s, rid), res)


def fake_runtime(
    tmp_path: Path, behaviour: FakeBehaviour | None = None, *, scale: int = 2, **settings: Any
) -> Runtime:
    repo = write_fake_repo(tmp_path, name="fake", tile=32, overlap=8, scale=scale)
    s = Settings(model_repository=repo, **{"max_queue_delay_ms": 5.0, **settings})

    def factory(m, d, st):
        return FakeBackend(
            m, d, instances=st.instances_per_device, max_batch=st.max_batch, behaviour=behaviour
        ), "test"

    return Runtime.from_settings(s, Metrics(), backend_factory=factory)


def expected_fake(img: np.ndarray, oh: int, ow: int, m: ModelRuntime) -> np.ndarray:
    g = m.manifest.tile.graph_scale
    p = make_plan(img.shape[0], img.shape[1], oh, ow, m.manifest.tile, m.settings.max_output_pixels)
    return resize_rgb(nearest(resize_rgb(img, p.pre_h, p.pre_w), g), oh, ow)


def assert_no_leak(m: ModelRuntime) -> None:
    s = m.batcher.stats()
    assert (
        s["queued_tiles"],
        s["queued_requests"],
        s["active_requests"],
        s["reserved_tiles"],
        s["reservations"],
    ) == (0, 0, 0, 0, 0), s
    assert m.metrics.queue_tiles.labels(m.name)._value.get() == 0
    assert m.metrics.queue_requests.labels(m.name)._value.get() == 0


# ------------------------------------------------------------------------------ the real model


REQUESTS = [  # (photo, crop h, crop w, out h, out w): mixed sizes, scales and aspect ratios
    ("astronaut", 48, 48, 192, 192),  # ×4
    ("chelsea", 60, 90, 120, 180),  # ×2
    ("coffee", 100, 150, 100, 150),  # ×1 restoration
    ("rocket", 17, 33, 68, 132),  # ×4, odd sizes
    ("astronaut", 20, 20, 60, 60),  # one tile
    ("coffee", 40, 25, 160, 100),  # portrait
]


def test_concurrent_mixed_requests_get_exactly_their_own_pixels(
    tiny_repo: Path, photos: dict[str, np.ndarray]
) -> None:
    """The tiny model through ONNX Runtime CPU, 2 instances, tiles of all requests batched together.

    Against run_sync with the same ONNX Runtime session, one request at a time: identical (ORT's kernels are
    batch-invariant, checked in test_backends). Against the same network in numpy: ≤ 1 LSB (fp32 vs fp32
    rounding flips, see test_backends), which blending cannot grow (a convex combination, rounded once).
    """
    from tiny_onnx import reference

    s = Settings(model_repository=tiny_repo, instances_per_device=2, intra_op_threads=1, max_batch=4)

    async def go() -> tuple[Runtime, list[UpscaleOutcome]]:
        rt = Runtime.from_settings(s, Metrics())
        await rt.start()
        m = rt.get(None)
        jobs = [
            upscale(m, photos[n][:h, :w], oh, ow, color_fix=cf, rid=f"r{i}")
            for i, (n, h, w, oh, ow) in enumerate(REQUESTS)
            for cf in ("none", None)
        ]
        outs = await asyncio.gather(*jobs)
        assert rt.ready and rt.healthy
        assert await rt.drain(5)
        return rt, outs

    rt, outs = arun(go)
    m = rt.get("tiny")
    assert m.metrics.tiles.labels("tiny")._value.get() == sum(o.tiles for o in outs)
    assert m.metrics.batch_size.labels("tiny")._sum.get() == sum(o.tiles for o in outs)
    for k, out in enumerate(outs):
        n, h, w, oh, ow = REQUESTS[k // 2]
        img = photos[n][:h, :w]
        cf = "none" if k % 2 == 0 else m.default_color_fix
        assert out.image.shape == (oh, ow, 3) and out.model == "tiny" and out.backend == "onnxruntime-cpu"
        assert (
            out.tiles == m.plan(h, w, oh, ow).n_tiles
            and out.compute_s > 0
            and out.runtime_s >= out.queue_s >= 0
        )
        same = run_sync(img, oh, ow, m.manifest.tile, lambda b: m.backend.infer(0, b), batch=1, color_fix=cf)
        np.testing.assert_array_equal(out.image, same, err_msg=f"request {k}")
        if cf == "none":
            ref = run_sync(img, oh, ow, m.manifest.tile, reference, batch=4)
            d = np.abs(out.image.astype(np.int16) - ref)
            assert d.max() <= 1 and (d > 0).mean() < 5e-3, f"request {k}: {d.max()} {(d > 0).mean()}"
    assert_no_leak(m)
    assert m.metrics.output_megapixels.labels("tiny")._value.get() == pytest.approx(
        sum(oh * ow for *_, oh, ow in REQUESTS) * 2 / 1e6
    )
    d = m.describe()
    assert d["backend"] == "onnxruntime-cpu" and d["instances"] == 2 and d["batch_sizes"] == [1, 2, 3, 4]
    assert d["kind"] == "gendr" and d["tile"]["input"] == 64 and "selection_reason" in d
    arun(rt.close)


# ------------------------------------------------------------------------------ fake backend: the contract


def test_mixed_sizes_on_the_fake_are_exact(tmp_path: Path, photos: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    sizes = [(1, 1, 4, 4), (7, 300, 14, 600), (64, 64, 256, 256), (90, 37, 135, 55), (33, 70, 260, 560)]

    async def go() -> None:
        rt = fake_runtime(tmp_path, FakeBehaviour(delay_s=0.002), instances_per_device=3)
        await rt.start()
        m = rt.get(None)
        imgs = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w, _, _ in sizes] + [photos["chelsea"]]
        outs = [(h2, w2) for *_, h2, w2 in sizes] + [(600, 902)]
        res = await asyncio.gather(*(upscale(m, im, oh, ow) for im, (oh, ow) in zip(imgs, outs, strict=True)))
        for im, (oh, ow), r in zip(imgs, outs, res, strict=True):
            np.testing.assert_array_equal(r.image, expected_fake(im, oh, ow, m))
        assert_no_leak(m)
        await rt.close()

    arun(go)


def test_not_ready_before_start_and_unknown_models(tmp_path: Path) -> None:
    async def go() -> None:
        rt = fake_runtime(tmp_path)
        m = rt.get(None)
        assert not rt.ready and m.describe()["ready"] is False
        with pytest.raises(NotReady):
            m.reserve(m.plan(8, 8, 16, 16))
        with pytest.raises(ModelNotFound):
            rt.get("nope")
        await rt.start()
        assert rt.ready and rt.get("fake") is m
        await rt.close()

    arun(go)


def test_deadline_passed_while_queued_or_running(tmp_path: Path) -> None:
    hang = threading.Event()

    async def go() -> None:
        rt = fake_runtime(tmp_path, FakeBehaviour(hang=hang))
        await rt.start()
        m = rt.get(None)
        img = np.zeros((40, 40, 3), np.uint8)
        with pytest.raises(DeadlineExceeded):
            await upscale(m, img, 80, 80, deadline_s=-1)  # already late: nothing is queued
        hang.set()
        blocked = asyncio.create_task(upscale(m, img, 80, 80, deadline_s=0.3))  # its batch hangs
        queued = asyncio.create_task(upscale(m, img, 80, 80, deadline_s=0.2))  # waits behind it
        for t in (blocked, queued):
            with pytest.raises(DeadlineExceeded):
                await t
        assert_no_leak(m)
        hang.clear()
        ok = await upscale(m, img, 80, 80)
        assert ok.image.shape == (80, 80, 3)
        await rt.close()

    arun(go)


def test_cancelling_1000_requests_frees_every_slot(tmp_path: Path) -> None:
    hang = threading.Event()
    hang.set()
    rng = np.random.default_rng(1)

    async def go() -> None:
        rt = fake_runtime(
            tmp_path, FakeBehaviour(hang=hang), queue_capacity_tiles=100_000, instances_per_device=2
        )
        await rt.start()
        m = rt.get(None)
        tasks = [
            asyncio.create_task(
                upscale(m, rng.integers(0, 256, (int(h), int(w), 3), np.uint8), 2 * int(h), 2 * int(w))
            )
            for h, w in rng.integers(1, 60, (1000, 2))
        ]
        while m.batcher.stats()["active_requests"] < 1000:  # all planned, prepared and queued
            await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
        res = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in res)
        assert_no_leak(m)
        hang.clear()
        ok = await upscale(m, np.full((30, 30, 3), 7, np.uint8), 60, 60)
        assert (ok.image == 7).all()
        assert_no_leak(m)
        await rt.close()

    arun(go)


def test_one_failing_request_does_not_fail_the_others(tmp_path: Path) -> None:
    poison = 13

    async def go() -> None:
        beh = FakeBehaviour(fail_if=lambda i, x: bool((x[:, 16, 16, 0] == poison).any()))
        rt = fake_runtime(tmp_path, beh, max_batch=1, unhealthy_after_failures=1000)
        await rt.start()
        m = rt.get(None)
        good = [upscale(m, np.full((40, 40, 3), 100 + i, np.uint8), 80, 80) for i in range(6)]
        bad = upscale(m, np.full((40, 40, 3), poison, np.uint8), 80, 80)
        res = await asyncio.gather(bad, *good, return_exceptions=True)
        assert isinstance(res[0], EngineFailure)
        assert all(isinstance(r, UpscaleOutcome) for r in res[1:])
        assert rt.healthy and rt.ready
        assert_no_leak(m)
        await rt.close()

    arun(go)


def test_failing_instance_turns_health_false(tmp_path: Path) -> None:
    async def go() -> None:
        rt = fake_runtime(
            tmp_path, FakeBehaviour(fail_instances={0, 1}), instances_per_device=2, unhealthy_after_failures=2
        )
        await rt.start()
        m = rt.get(None)
        for _ in range(4):
            with pytest.raises((EngineFailure, NotReady)):
                await upscale(m, np.zeros((40, 40, 3), np.uint8), 80, 80)
        assert not rt.healthy and not rt.ready
        with pytest.raises(NotReady):
            m.reserve(m.plan(8, 8, 16, 16))
        await rt.close()

    arun(go)


def test_drain_finishes_admitted_work(tmp_path: Path) -> None:
    async def go() -> None:
        rt = fake_runtime(tmp_path, FakeBehaviour(delay_s=0.02))
        await rt.start()
        m = rt.get(None)
        tasks = [
            asyncio.create_task(upscale(m, np.full((60, 60, 3), i, np.uint8), 120, 120)) for i in range(4)
        ]
        await asyncio.sleep(0)  # let them reserve
        await asyncio.sleep(0.01)
        drained = asyncio.create_task(rt.drain(30))
        await asyncio.sleep(0.01)
        assert rt.draining and not rt.ready
        with pytest.raises(Draining):
            m.reserve(m.plan(8, 8, 16, 16))
        assert await drained
        for i, t in enumerate(tasks):
            assert ((await t).image == i).all()
        await rt.close()

    arun(go)


def test_drain_times_out_when_work_hangs(tmp_path: Path) -> None:
    hang = threading.Event()
    hang.set()

    async def go() -> None:
        rt = fake_runtime(tmp_path, FakeBehaviour(hang=hang))
        await rt.start()
        m = rt.get(None)
        t = asyncio.create_task(upscale(m, np.zeros((40, 40, 3), np.uint8), 80, 80, deadline_s=30))
        await asyncio.sleep(0.05)
        assert not await rt.drain(0.1)
        t.cancel()
        hang.clear()
        await rt.close()

    arun(go)


def test_bad_inputs_are_bad_requests_and_release_the_reservation(tmp_path: Path) -> None:
    async def go() -> None:
        rt = fake_runtime(tmp_path)
        await rt.start()
        m = rt.get(None)
        img = np.zeros((10, 10, 3), np.uint8)
        with pytest.raises(BadRequest):
            await upscale(m, img, 20, 20, color_fix="sepia")
        with pytest.raises(BadRequest):
            await upscale(m, np.zeros((10, 10, 4), np.uint8), 20, 20)
        with pytest.raises(BadRequest):
            m.plan(10, 10, 0, 20)
        # the decoded image needs more tiles than the header promised: the reservation grows
        res = m.reserve(m.plan(10, 10, 20, 20))
        out = await m.upscale(
            UpscaleJob(np.zeros((100, 100, 3), np.uint8), 200, 200, None, time.monotonic() + 30, "g"), res
        )
        assert out.tiles > 1 and res.released
        assert_no_leak(m)
        await rt.close()

    arun(go)


def test_default_colour_fix_comes_from_the_manifest(tmp_path: Path, photos: dict[str, np.ndarray]) -> None:
    async def go() -> None:
        rt = fake_runtime(tmp_path)
        await rt.start()
        m = rt.get(None)
        assert m.default_color_fix == "none"  # a single-network model has no pipeline colour fix
        d = m.describe()
        assert d["color_fix_default"] == "none" and d["backend"] == "fake" and d["limits"]["max_batch"] == 4
        await rt.close()

    arun(go)
