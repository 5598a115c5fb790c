"""The tile batcher with the fake backend: batching across requests, deadlines, cancellation,
failure containment, instance health, admission, drain. No timing assertions: only outcomes."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
import pytest
from runtime_helpers import fake_manifest, nearest

from service.backends.fake import FakeBackend, FakeBehaviour
from service.errors import DeadlineExceeded, Draining, EngineFailure, NotReady, Overloaded
from service.metrics import BusyMeter, Metrics
from service.pixels.tiling import Stitcher, pad_image, plan_tiles
from service.scheduling.batcher import TileBatcher
from service.scheduling.tickets import Ticket

TILE, OVERLAP = 32, 8


def make(
    instances: int = 1,
    *,
    scale: int = 1,
    max_batch: int = 4,
    batch_sizes: tuple[int, ...] | None = None,
    behaviour: FakeBehaviour | None = None,
    **kw: object,
) -> tuple[TileBatcher, FakeBackend]:
    be = FakeBackend(
        fake_manifest(tile=TILE, overlap=OVERLAP, scale=scale),
        instances=instances,
        max_batch=max_batch,
        batch_sizes=batch_sizes,
        behaviour=behaviour,
    )
    be.load()
    kw.setdefault("max_queue_delay_s", 0.005)
    b = TileBatcher(be, model="fake", metrics=Metrics(), max_batch=max_batch, **kw)  # type: ignore[arg-type]
    b.start(be.warmup())
    return b, be


class Req:
    """One request submitted straight to the batcher, stitched as the runtime does."""

    def __init__(self, b: TileBatcher, img: np.ndarray, deadline_s: float = 30.0, scale: int = 1) -> None:
        self.img = img
        self.scale = scale
        self.plan = plan_tiles(img.shape[0], img.shape[1], TILE, OVERLAP, scale)
        self.st = Stitcher(self.plan)
        self.res = b.reserve(self.plan.n_tiles)
        self.ticket: Ticket = b.submit(
            pad_image(img, self.plan), self.plan, time.monotonic() + deadline_s, self.sink
        )

    def sink(self, idx, tiles) -> None:
        for i, t in zip(idx, tiles, strict=True):
            self.st.add(i, t)

    def result(self, timeout: float = 30.0) -> np.ndarray:
        try:
            self.ticket.future.result(timeout)
        finally:
            self.res.release()
        return self.st.result()


def rand_img(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), np.uint8)


def test_mixed_size_requests_share_batches_and_get_their_own_pixels(photos: dict[str, np.ndarray]) -> None:
    b, be = make(instances=2, scale=2, max_batch=8)
    rng = np.random.default_rng(1)
    sizes = [(5, 7), (20, 20), (33, 70), (64, 64), (1, 90), (100, 37), (150, 211)]
    imgs = [rand_img(rng, h, w) for h, w in sizes] + [
        photos["chelsea"][:90, :120],
        photos["coffee"][:48, :300],
    ]
    reqs = [Req(b, im, scale=2) for im in imgs]
    for r in reqs:
        np.testing.assert_array_equal(r.result(), nearest(r.img, 2))
    assert max(n for _, n in be.calls) > 1  # tiles of different requests were batched together
    s = b.stats()
    assert s["queued_tiles"] == s["reserved_tiles"] == s["active_requests"] == 0
    b.close()


def test_small_requests_batch_together() -> None:
    """Twelve one-tile requests queued while the engine is busy leave in full batches of four."""
    hang = threading.Event()
    hang.set()
    b, be = make(max_batch=4, behaviour=FakeBehaviour(hang=hang))
    first = Req(b, np.zeros((10, 10, 3), np.uint8))
    while not be.calls:
        time.sleep(0.001)
    rng = np.random.default_rng(2)
    reqs = [Req(b, rand_img(rng, 10, 10)) for _ in range(12)]
    hang.clear()
    first.result()
    for r in reqs:
        np.testing.assert_array_equal(r.result(), r.img)
    assert [n for _, n in be.calls] == [1, 4, 4, 4]
    b.close()


def test_batches_are_padded_to_the_engine_batch_sizes() -> None:
    b, be = make(max_batch=8, batch_sizes=(1, 2, 4, 8), max_queue_delay_s=0.0)
    r = Req(b, rand_img(np.random.default_rng(3), 60, 60))  # 3×3 = 9 tiles → 8 + 1
    np.testing.assert_array_equal(r.result(), r.img)
    assert sorted(n for _, n in be.calls) == [1, 8]
    r = Req(b, rand_img(np.random.default_rng(4), 40, 60))  # 2×3 = 6 tiles → padded to 8
    np.testing.assert_array_equal(r.result(), r.img)
    assert be.calls[-1][1] == 8
    b.close()


def test_batch_sizes_come_from_the_loaded_engine_not_the_description_before_load() -> None:
    """A TensorRT plan's sizes (1,2,4) are known only after load(); before, the backend says 1..4.
    The batcher is built before load (the runtime builds it with the model): padding 3 tiles to 3
    would fail every such batch and, three in a row, mark the instance unhealthy."""
    be = FakeBackend(fake_manifest(tile=TILE, overlap=OVERLAP), max_batch=4, loaded_batch_sizes=(1, 2, 4))
    assert be.info.batch_sizes == (1, 2, 3, 4)
    b = TileBatcher(be, model="fake", metrics=Metrics(), max_batch=4, max_queue_delay_s=0.05)
    be.load()
    b.start(be.warmup())
    assert b.batch_sizes == (1, 2, 4)
    for seed in range(4):  # 3 tiles each (1×3 grid) → padded to 4, never sent as 3
        r = Req(b, rand_img(np.random.default_rng(seed), 20, 60))
        np.testing.assert_array_equal(r.result(), r.img)
    assert {n for _, n in be.calls} <= {1, 2, 4} and 4 in {n for _, n in be.calls}
    assert b.healthy
    b.close()


def test_deadline_expires_queued_tiles() -> None:
    hang = threading.Event()
    hang.set()
    b, be = make(behaviour=FakeBehaviour(hang=hang))
    blocker = Req(b, np.zeros((10, 10, 3), np.uint8))
    while not be.calls:
        time.sleep(0.001)
    late = Req(b, np.zeros((100, 100, 3), np.uint8), deadline_s=0.05)
    ok = Req(b, np.zeros((10, 10, 3), np.uint8))
    time.sleep(0.1)
    hang.clear()
    with pytest.raises(DeadlineExceeded):
        late.result()
    blocker.result()
    ok.result()
    assert sum(n for _, n in be.calls) == 2  # none of the expired request's tiles ran
    s = b.stats()
    assert s["queued_tiles"] == 0 and s["active_requests"] == 0 and s["reservations"] == 0
    b.close()


def test_cancelling_1000_requests_leaks_nothing() -> None:
    hang = threading.Event()
    hang.set()
    b, be = make(instances=2, behaviour=FakeBehaviour(hang=hang), capacity_tiles=100_000)
    rng = np.random.default_rng(5)
    reqs = [Req(b, rand_img(rng, int(rng.integers(1, 80)), int(rng.integers(1, 80)))) for _ in range(1000)]
    while len(be.calls) < 2:
        time.sleep(0.001)
    for r in reqs:
        b.cancel(r.ticket)
        r.res.release()
        r.res.release()  # idempotent
    s = b.stats()
    assert s == {
        **s,
        "queued_tiles": 0,
        "queued_requests": 0,
        "active_requests": 0,
        "reserved_tiles": 0,
        "reservations": 0,
    }
    hang.clear()  # the two batches that were running finish; their outputs are discarded
    time.sleep(0.05)
    assert all(r.ticket.future.cancelled() for r in reqs)
    after = Req(b, rand_img(rng, 50, 50))
    np.testing.assert_array_equal(after.result(), after.img)
    assert b.stats()["active_requests"] == 0
    b.close()


def test_a_failing_batch_fails_only_its_own_requests() -> None:
    poison = 13  # any batch holding a tile whose corner pixel is 13 fails
    be_kw = FakeBehaviour(fail_if=lambda i, x: bool((x[:, 0, 0, 0] == poison).any()))
    b, _be = make(max_batch=1, behaviour=be_kw, unhealthy_after=100)
    rng = np.random.default_rng(6)
    good = [Req(b, rand_img(rng, 40, 40) // 2 + 100) for _ in range(5)]  # pixel values ≥ 100
    bad = Req(b, np.full((40, 40, 3), poison, np.uint8))
    more = [Req(b, rand_img(rng, 30, 50) // 2 + 100) for _ in range(5)]
    with pytest.raises(EngineFailure):
        bad.result()
    for r in good + more:
        np.testing.assert_array_equal(r.result(), r.img)
    assert b.healthy  # one failure resets on the next success
    b.close()


def test_batch_mates_of_a_failure_fail_together_and_others_survive() -> None:
    b, _be = make(
        max_batch=4, behaviour=FakeBehaviour(fail_next=1), unhealthy_after=100, max_queue_delay_s=0.2
    )
    a = Req(b, np.zeros((10, 10, 3), np.uint8))  # one tile each: both in the first (failing) batch
    c = Req(b, np.zeros((10, 10, 3), np.uint8))
    for r in (a, c):
        with pytest.raises(EngineFailure):
            r.result()
    d = Req(b, np.zeros((10, 10, 3), np.uint8))
    d.result()
    b.close()


@pytest.mark.parametrize("what", ["wrong_count", "wrong_shape"])
def test_malformed_outputs_are_failures(what: str) -> None:
    b, be = make(scale=2, behaviour=FakeBehaviour(**{what: True}), unhealthy_after=100)
    r = Req(b, np.zeros((10, 10, 3), np.uint8), scale=2)
    with pytest.raises(EngineFailure):
        r.result()
    setattr(be.behaviour, what, False)
    ok = Req(b, np.ones((10, 10, 3), np.uint8), scale=2)
    np.testing.assert_array_equal(ok.result(), nearest(ok.img, 2))
    b.close()


def test_repeatedly_failing_instance_turns_unhealthy_and_others_carry_on() -> None:
    b, _be = make(instances=2, max_batch=1, behaviour=FakeBehaviour(fail_instances={0}), unhealthy_after=2)
    rng = np.random.default_rng(7)
    outcomes = []
    for _ in range(20):
        r = Req(b, rand_img(rng, 10, 10))
        try:
            outcomes.append(np.array_equal(r.result(), r.img))
        except EngineFailure:
            outcomes.append(False)
    assert outcomes.count(False) <= 2  # at most N failures before instance 0 is taken out
    assert all(outcomes[-10:])
    assert not b.healthy
    insts = b.stats()["instances"]
    assert [i["healthy"] for i in insts] == [False, True]  # type: ignore[index]
    b.close()


def test_all_instances_failing_fails_queued_work_and_refuses_new() -> None:
    hang = threading.Event()
    hang.set()
    b, _be = make(instances=2, behaviour=FakeBehaviour(fail_instances={0, 1}, hang=hang), unhealthy_after=1)
    reqs = [Req(b, np.zeros((100, 100, 3), np.uint8)) for _ in range(3)]
    hang.clear()
    for r in reqs:
        with pytest.raises(EngineFailure):
            r.result()
    assert not b.healthy
    with pytest.raises(NotReady):
        b.reserve(1)
    assert b.stats()["active_requests"] == 0
    b.close()


def test_work_spreads_over_instances() -> None:
    b, be = make(instances=3, max_batch=2, behaviour=FakeBehaviour(delay_s=0.03))
    rng = np.random.default_rng(8)
    reqs = [Req(b, rand_img(rng, 60, 60)) for _ in range(4)]  # 36 tiles → 18 batches
    for r in reqs:
        np.testing.assert_array_equal(r.result(), r.img)
    assert {i for i, _ in be.calls} == {0, 1, 2}
    assert be.max_concurrency == 3
    b.close()


def test_admission_is_equal_chance_with_retry_after() -> None:
    """A request is admitted while the backlog is under the capacity, whatever its own size (so at
    overload large and small requests see the same share of 503s); past it, a 503 with an estimate."""
    b, _be = make(capacity_tiles=10, behaviour=FakeBehaviour(per_tile_s=0.5))
    r1 = b.reserve(6)
    r2 = b.reserve(6)  # 6 < 10 in use when it arrived: admitted, overshooting by itself
    assert b.stats()["reserved_tiles"] == 12
    for size in (1, 6):
        with pytest.raises(Overloaded) as e:
            b.reserve(size)  # 12 ≥ 10: refused, small or large alike
        # warm-up measured 0.5 s per tile: the backlog is 2 + min(size, 10) tiles over → that many × 0.5 s
        assert e.value.retry_after_s == pytest.approx((2 + size) * 0.5, rel=0.01)
    r1.release()
    small = b.reserve(1)  # 7 in use < 10
    r2.release()
    small.release()
    big = b.reserve(50)  # bigger than the whole capacity: admitted into a backlog under it
    with pytest.raises(Overloaded):
        b.reserve(1)
    big.release()
    assert b.stats()["reserved_tiles"] == 0
    b.close()


def test_reservation_can_grow_and_release_is_idempotent() -> None:
    b, _ = make(capacity_tiles=10)
    r = b.reserve(3)
    r.grow(2)
    assert b.stats()["reserved_tiles"] == 5 and r.tiles == 5
    r.grow(20)  # the backlog was under the capacity: the decoded image's extra tiles are admitted
    with pytest.raises(Overloaded):
        r.grow(1)  # now it is over
    r.release()
    r.release()
    assert b.stats()["reserved_tiles"] == 0 and b.stats()["reservations"] == 0
    b.close()


def test_drain_finishes_admitted_work_and_refuses_new() -> None:
    b, _be = make(behaviour=FakeBehaviour(delay_s=0.01))
    reqs = [Req(b, np.zeros((60, 60, 3), np.uint8)) for _ in range(3)]
    b.start_drain()
    with pytest.raises(Draining):
        b.reserve(1)
    assert not b.wait_idle(0)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        idle = ex.submit(b.wait_idle, 30)
        for r in reqs:
            r.result()
        assert idle.result()
    b.close()
    with pytest.raises(Draining):
        b.reserve(1)


def test_close_fails_what_is_left() -> None:
    hang = threading.Event()
    hang.set()
    b, be = make(behaviour=FakeBehaviour(hang=hang))
    r = Req(b, np.zeros((100, 100, 3), np.uint8))
    while not be.calls:
        time.sleep(0.001)
    threading.Timer(0.2, hang.clear).start()
    b.close(timeout_s=5)
    with pytest.raises(Draining):
        r.result()


def test_a_stuck_instance_makes_health_false() -> None:
    hang = threading.Event()
    hang.set()
    b, _be = make(behaviour=FakeBehaviour(hang=hang), stuck_after_s=0.05)
    r = Req(b, np.zeros((10, 10, 3), np.uint8))
    time.sleep(0.2)
    assert not b.healthy
    hang.clear()
    r.result()
    assert b.healthy
    b.close()


def test_busy_meter() -> None:
    m = BusyMeter(window_s=10)
    m.start(100.0)
    m.stop(102.5)
    assert m.ratio(110.0) == pytest.approx(0.25)
    m.start(110.0)
    assert m.ratio(111.0) == pytest.approx((1.5 + 1.0) / 10)
    assert m.ratio(200.0) == pytest.approx(1.0)  # still busy: the whole window
    m.stop(200.0)
    assert m.ratio(300.0) == 0.0


def test_a_tiny_request_waits_for_one_call_whatever_is_queued() -> None:
    """Shortest remaining work first: a one-tile request queued behind eight 16-tile requests runs in the
    very next engine call, not after one batch per request ahead of it (round-robin by quantum)."""
    hang = threading.Event()
    hang.set()
    tiny_in: list[bool] = []

    def spy(instance: int, batch: np.ndarray) -> bool:
        tiny_in.append(bool((batch == 77).all(axis=(1, 2, 3)).any()))
        return False

    # 16 tiles × 10 ms of remaining work each, weighted 4×: the tiny one wins unless it came 0.6 s later
    behaviour = FakeBehaviour(hang=hang, per_tile_s=0.01, fail_if=spy)
    b, be = make(max_batch=4, behaviour=behaviour, work_weight=4.0)
    first = Req(b, np.zeros((10, 10, 3), np.uint8))
    while not be.calls:
        time.sleep(0.001)
    rng = np.random.default_rng(4)
    big = [Req(b, rand_img(rng, 100, 100)) for _ in range(8)]
    tiny = Req(b, np.full((10, 10, 3), 77, np.uint8))
    hang.clear()
    np.testing.assert_array_equal(tiny.result(), tiny.img)
    for r in (first, *big):
        r.result()
    assert tiny_in.index(True) == 1  # call 0 was already running
    b.close()
