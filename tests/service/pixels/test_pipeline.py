"""service.pixels.pipeline: where resizing happens, and run_sync (the inline reference) end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
from runtime_helpers import nearest

from service.manifest import TileGeometry
from service.pixels.imageops import resize_rgb
from service.pixels.pipeline import finish, make_plan, prepare_input, run_sync

G1 = TileGeometry(tile=64, overlap=16, graph_scale=1, size_multiple=16)
G4 = TileGeometry(tile=32, overlap=8, graph_scale=4, size_multiple=1)


def test_scale_one_graph_works_at_output_resolution() -> None:
    p = make_plan(100, 150, 400, 600, G1)
    assert (p.pre_h, p.pre_w) == (400, 600) and p.stitched_size == (400, 600) and not p.needs_post_resize


def test_scaling_graph_runs_on_the_input_when_it_reaches_the_target() -> None:
    p = make_plan(100, 150, 300, 450, G4)  # ×3 requested from a ×4 graph: run ×4, resize down once
    assert (p.pre_h, p.pre_w) == (100, 150) and p.stitched_size == (400, 600) and p.needs_post_resize


def test_scaling_graph_pre_resizes_when_the_target_is_larger() -> None:
    p = make_plan(100, 150, 800, 1200, G4)  # ×8 from a ×4 graph
    assert (p.pre_h, p.pre_w) == (200, 300) and p.stitched_size == (800, 1200)
    p = make_plan(101, 151, 803, 1201, G4)
    assert (p.pre_h, p.pre_w) == (math.ceil(803 / 4), math.ceil(1201 / 4))


def test_stitch_limit_forces_a_pre_resize() -> None:
    p = make_plan(1000, 1000, 1000, 1000, G4, max_stitch_pixels=2_000_000)  # native would stitch 4000²
    assert (p.pre_h, p.pre_w) == (250, 250)


def test_plan_is_cheap_and_counts_tiles() -> None:
    p = make_plan(4000, 4000, 4000, 4000, G1)
    assert p.n_tiles == len(p.tiles.ys) * len(p.tiles.xs) > 1000


@pytest.mark.parametrize("bad", [(0, 10, 10, 10), (10, 10, 0, 10)])
def test_plan_rejects_empty_sizes(bad: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        make_plan(*bad, G1)


def test_prepare_input_checks_the_image() -> None:
    p = make_plan(10, 10, 10, 10, G1)
    with pytest.raises(ValueError):
        prepare_input(np.zeros((10, 11, 3), np.uint8), p)


@pytest.mark.parametrize("geo", [G1, G4])
@pytest.mark.parametrize(
    ("name", "out"), [("chelsea", (600, 902)), ("coffee", (250, 300)), ("rocket", (427, 640))]
)
def test_run_sync_with_an_exact_network(
    photos: dict[str, np.ndarray], geo: TileGeometry, name: str, out: tuple[int, int]
) -> None:
    """With nearest ×g as the network, the request's result is resize(nearest(resize(image))) exactly."""
    img = photos[name]
    g = geo.graph_scale
    seen: list[int] = []
    res = run_sync(
        img, *out, geo, lambda b: b.repeat(g, axis=1).repeat(g, axis=2), batch=3, progress=seen.append
    )
    p = make_plan(img.shape[0], img.shape[1], *out, geo)
    expected = resize_rgb(nearest(resize_rgb(img, p.pre_h, p.pre_w), g), *out)
    np.testing.assert_array_equal(res, expected)
    assert sum(seen) == p.n_tiles and max(seen) <= 3


def test_run_sync_checks_the_engine_output_count(photos: dict[str, np.ndarray]) -> None:
    with pytest.raises(RuntimeError, match="returned"):
        run_sync(photos["coffee"][:100, :100], 100, 100, G1, lambda b: b[:-1], batch=4)


@pytest.mark.parametrize("method", ["none", "adain", "wavelet"])
def test_finish_resizes_and_colour_fixes_once(photos: dict[str, np.ndarray], method: str) -> None:
    img = photos["coffee"][:60, :80]
    p = make_plan(60, 80, 120, 160, G1)
    stitched = np.full((120, 160, 3), 128, np.uint8)  # a flat grey "restoration"
    out = finish(stitched, img, p, method)
    assert out.shape == (120, 160, 3) and out.dtype == np.uint8
    if method == "none":
        assert (out == 128).all()
    else:  # colour and tone come back from the bicubic input
        ref = resize_rgb(img, 120, 160).astype(np.float64)
        assert abs(out.mean() - ref.mean()) < 2.0
