"""Cost-aware planning: shape buckets, whole images, the measured cost table. Pure functions of sizes and a
cost table the test writes (the a + b·n model of one GPU), so nothing depends on the machine."""

from __future__ import annotations

import pytest

from service.scheduling.costs import CostTable
from service.scheduling.planner import EngineShapes, choose

A, B, T = 0.015, 0.004, 128  # a + b·n per call of n 128² tiles (the cost model)


def linear_costs(
    tiles: tuple[int, ...], sizes: tuple[int, ...] = (1, 2, 4, 8), dynamic: bool = False
) -> CostTable:
    timings = {(t, t, b): A + B * b * t * t / (T * T) for t in tiles for b in sizes}
    if dynamic:
        timings.update({(s, s, 1): A + B * s * s / (T * T) for s in (128, 256)})
    return CostTable(timings, sizes)


def shapes(tiles: tuple[int, ...], dynamic: bool = False, budget: int = 0) -> EngineShapes:
    return EngineShapes(
        tiles, overlap=16, scale=4, size_multiple=8, dynamic=dynamic, max_call_pixels=budget, max_batch=8
    )


def test_without_measurements_the_primary_tile() -> None:
    p = choose(300, 300, shapes((32, 64, 128)), None)
    assert p.shape == (128, 128)


@pytest.mark.parametrize(("side", "tile"), [(20, 32), (32, 32), (33, 64), (64, 64), (100, 128), (128, 128)])
def test_a_small_image_runs_as_one_tile_of_the_smallest_bucket_that_holds_it(side: int, tile: int) -> None:
    s = shapes((32, 64, 128))
    p = choose(side, side, s, linear_costs(s.tiles))
    assert p.n_tiles == 1 and p.shape == (tile, tile)


def test_a_large_image_on_static_tiles_uses_the_primary_tile() -> None:
    s = shapes((32, 64, 128))
    p = choose(1000, 1000, s, linear_costs(s.tiles))
    assert p.shape == (128, 128)  # fewer overlaps and calls than 64² tiles


def test_whole_image_on_a_dynamic_engine_when_cheapest() -> None:
    s = shapes((32, 64, 128), dynamic=True, budget=1 << 20)
    costs = linear_costs(s.tiles, dynamic=True)
    p = choose(1000, 750, s, costs)
    assert p.n_tiles == 1 and p.shape == (1000, 752)  # rounded up to the size multiple
    tiled = choose(1000, 750, shapes((32, 64, 128)), costs)
    # 81 tiles of 128² in 11 calls vs one call: the whole image pays the per-call cost once
    assert costs.call_s(1000, 752, 1) < costs.request_s(128, 128, tiled.n_tiles, 8)
    # a tiny image still prefers the static bucket (it batches with other requests' tiles)
    assert choose(60, 60, s, costs).shape == (64, 64)


def test_above_the_call_budget_the_fewest_equal_rectangles_under_it() -> None:
    budget = 300_000
    s = shapes((128,), dynamic=True, budget=budget)
    p = choose(1000, 1000, s, linear_costs(s.tiles, dynamic=True))
    th, tw = p.shape
    assert th * tw <= budget and p.n_tiles == 4  # 2 × 2 of ≈ 516²
    assert p.ys[0] == 0 and p.ys[-1] + th == p.padded_h and p.xs[-1] + tw == p.padded_w


def test_cost_table_estimates_unmeasured_shapes_by_a_line_through_batch_one() -> None:
    c = linear_costs((64, 128))
    assert c.call_s(128, 128, 4) == pytest.approx(A + 4 * B)  # measured
    assert c.call_s(512, 512, 1) == pytest.approx(A + 16 * B, rel=1e-6)  # fitted a + b·pixels
    c.observe(512, 512, 1, 1.0)
    assert c.call_s(512, 512, 1) == pytest.approx(1.0)  # a new shape gets its own entry
    c.observe(128, 128, 4, 1.0)  # EWMA: one slow call moves an entry by its weight, not all the way
    assert A + 4 * B < c.call_s(128, 128, 4) < 0.5


def test_cost_table_stays_bounded_whatever_sizes_clients_send() -> None:
    from service.scheduling.costs import MAX_ENTRIES

    c = linear_costs((128,), dynamic=True)
    for i in range(2 * MAX_ENTRIES):
        c.observe(8 * (i + 1), 8, 1, 0.01)
    assert len(c.entries()) == MAX_ENTRIES
    assert c.call_s(128, 128, 1) == pytest.approx(A + B)  # measured entries are untouched


def test_batch_size_by_cost_per_useful_tile() -> None:
    c = linear_costs((128,))
    assert c.batch_for(128, 128, 8) == (8, 8)
    assert c.batch_for(128, 128, 5) == (4, 4)  # a padded 8 costs 9.4 ms/tile, 4 now 7.75 ms/tile
    assert c.batch_for(128, 128, 3) == (3, 4)  # padded 4: 7.75 ms/tile beats 2 at 11.5 ms/tile
    assert c.batch_for(128, 128, 1) == (1, 1)
    flat = CostTable({(128, 128, b): 0.05 for b in (1, 2, 4, 8)}, (1, 2, 4, 8))
    assert flat.batch_for(128, 128, 5) == (5, 8)  # a GPU with room to spare: padding is free
    assert c.request_s(128, 128, 9, 8) == pytest.approx((A + 8 * B) + (A + B))
