"""Tile planner and stitcher: coverage, exact reassembly, and tiled vs untiled on real photos."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from runtime_helpers import nearest

from service.manifest import TileGeometry
from service.pixels.pipeline import make_plan, prepare_input
from service.pixels.tiling import Stitcher, _ramp_weights, pad_image, plan_tiles, tiles_of

SIZES = [(1, 1), (1, 300), (7, 5), (64, 64), (65, 65), (100, 37), (333, 517), (48, 1000)]


@pytest.mark.parametrize(("h", "w"), SIZES)
@pytest.mark.parametrize(("tile", "overlap"), [(64, 16), (32, 8), (128, 48)])
def test_plan_covers_the_image_with_overlapping_tiles(h: int, w: int, tile: int, overlap: int) -> None:
    p = plan_tiles(h, w, tile, overlap)
    assert p.padded_h >= h + 2 * p.margin_y and p.padded_w >= w + 2 * p.margin_x
    for starts, length in ((p.ys, p.padded_h), (p.xs, p.padded_w)):
        assert starts[0] == 0 and starts[-1] == length - tile  # both borders covered
        assert list(starts) == sorted(set(starts))
        for a, b in itertools.pairwise(starts):
            assert b - a <= tile - overlap  # neighbours overlap by at least `overlap`
    assert 0 < p.occupancy <= 1


def test_small_images_are_one_padded_tile() -> None:
    p = plan_tiles(20, 30, 64, 16)
    assert p.n_tiles == 1 and (p.padded_h, p.padded_w) == (64, 64)
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
    padded = pad_image(img, p)
    assert padded.shape == (64, 64, 3)
    my, mx = p.margin_y, p.margin_x
    np.testing.assert_array_equal(padded[my : my + 20, mx : mx + 30], img)
    # reflect padding: the pixel left of the image mirrors the one right of its first column
    np.testing.assert_array_equal(padded[my, mx - 1], img[0, 1])


@pytest.mark.parametrize(("tile", "overlap"), [(128, 16), (96, 16), (512, 64), (64, 16)])
def test_an_image_that_fits_a_tile_costs_one_tile(tile: int, overlap: int) -> None:
    """The border margin must not push an image that fits one tile into four (the 2×2 tile tax)."""
    for side in (tile - overlap, tile - overlap // 2 + 1, tile - 1, tile):
        p = plan_tiles(side, side, tile, overlap)
        assert p.n_tiles == 1, (side, p.ys, p.xs)
        assert 0 <= p.margin_y <= overlap // 2 and p.padded_h == tile
    wide = plan_tiles(tile, 3 * tile, tile, overlap)
    assert len(wide.ys) == 1 and wide.margin_y == 0 and wide.margin_x == overlap // 2
    assert plan_tiles(tile + 1, tile + 1, tile, overlap).n_tiles == 4


def test_one_tile_result_is_the_tile_crop() -> None:
    rng = np.random.default_rng(1)
    p = plan_tiles(50, 60, 64, 16, 2)
    out = rng.integers(0, 256, (128, 128, 3), np.uint8)
    st = Stitcher(p)
    st.add(0, out)
    my, mx = 2 * p.margin_y, 2 * p.margin_x
    np.testing.assert_array_equal(st.result(), out[my : my + 100, mx : mx + 120])


def test_rectangular_plan_for_a_whole_image() -> None:
    p = plan_tiles(100, 70, (112, 80), 16, 4)
    assert p.n_tiles == 1 and p.shape == (112, 80) and (p.margin_y, p.margin_x) == (6, 5)
    img = np.random.default_rng(2).integers(0, 256, (100, 70, 3), np.uint8)
    padded = pad_image(img, p)
    assert padded.shape == (112, 80, 3)
    np.testing.assert_array_equal(padded[6:106, 5:75], img)
    with pytest.raises(ValueError, match="no square tile edge"):
        _ = p.tile


def test_one_pixel_axis_is_edge_padded() -> None:
    img = np.arange(9, dtype=np.uint8).reshape(1, 3, 3)
    p = plan_tiles(1, 3, 16, 4)
    padded = pad_image(img, p)
    assert padded.shape == (16, 16, 3)
    assert (padded[:, p.margin_x] == img[0, 0]).all()


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_weights_are_a_partition_of_unity(scale: int) -> None:
    p = plan_tiles(333, 517, 64, 24, scale)
    ot, s = 64 * scale, scale
    for starts, length in ((p.ys, p.padded_h), (p.xs, p.padded_w)):
        ws = _ramp_weights([a * s for a in starts], ot, length * s, 24 * s)
        total = np.zeros(length * s)
        for a, w in zip(starts, ws, strict=True):
            assert (w > 0).all()
            total[a * s : a * s + ot] += w
        np.testing.assert_allclose(total, 1.0, rtol=1e-6)


@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_stitching_reassembles_every_pixel_exactly(
    photos: dict[str, np.ndarray], name: str, scale: int
) -> None:
    """With a network that is exact pixel by pixel (nearest ×s), blended overlaps agree, so tiling is
    lossless: any tile in the wrong place, a transposition or a weight not summing to 1 shows up here."""
    img = photos[name][:150, :211]
    p = plan_tiles(img.shape[0], img.shape[1], 32, 12, scale)
    st = Stitcher(p)
    for (i, _, _), t in zip(p.positions(), tiles_of(pad_image(img, p), p), strict=True):
        st.add(i, nearest(t, scale))
    np.testing.assert_array_equal(st.result(), nearest(img, scale))


def test_stitcher_refuses_missing_duplicate_and_misshapen_tiles() -> None:
    p = plan_tiles(100, 100, 32, 8)
    st = Stitcher(p)
    with pytest.raises(ValueError, match="expected"):
        st.add(0, np.zeros((16, 16, 3), np.uint8))
    st.add(0, np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="twice"):
        st.add(0, np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(RuntimeError, match="missing"):
        st.result()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("name", ["astronaut", "chelsea"])
def test_tiled_matches_untiled_within_the_per_tile_bound(
    tiny_net, torch_one_thread, photos: dict[str, np.ndarray], name: str
) -> None:
    """Tiled vs untiled GenDR (tiny model, real photos), with a bound derived from the stitcher's maths.

    The stitched value at a pixel is a convex combination (feathered weights ≥ 0 that sum to 1, checked
    above) of the outputs of the tiles covering it, rounded once. So it can differ from the untiled
    reference by at most the largest difference among those tiles, plus ½ LSB of rounding:
        |stitched(p) − untiled(p)| ≤ max_i |tile_i(p) − untiled(p)| + 1.
    The per-tile differences themselves are the network's context dependence (GroupNorm statistics and
    attention over a tile instead of the whole image); the random tiny GenDR has a lot of it, a trained
    one less. Blending must never add error on top, and must reduce it on average (mean < per-tile max).
    """
    from engine_build.gendr.reference import upscale_untiled
    from engine_build.verify.runners import torch_runner

    img = photos[name][100:164, 100:180]
    oh, ow = 128, 160  # ×2: GenDR works at output resolution
    geo = TileGeometry(tile=64, overlap=24, graph_scale=1, size_multiple=16)
    run = torch_runner(tiny_net)
    ref = upscale_untiled(tiny_net, img, oh, ow).astype(np.int16)

    plan = make_plan(img.shape[0], img.shape[1], oh, ow, geo)
    p = plan.tiles
    padded = prepare_input(img, plan)
    st = Stitcher(p)
    worst = np.zeros((oh, ow), np.int16)  # max over covering tiles of |tile − untiled|
    for (i, y, x), t in zip(p.positions(), tiles_of(padded, p), strict=True):
        out = run(t[None])[0].astype(np.int16)
        st.add(i, out.astype(np.uint8))
        y0, x0, y1, x1 = y - p.margin_y, x - p.margin_x, y - p.margin_y + p.tile, x - p.margin_x + p.tile
        cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, oh), min(x1, ow)
        d = np.abs(out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] - ref[cy0:cy1, cx0:cx1]).max(axis=2)
        worst[cy0:cy1, cx0:cx1] = np.maximum(worst[cy0:cy1, cx0:cx1], d)
    tiled = st.result()
    err = np.abs(tiled.astype(np.int16) - ref).max(axis=2)
    assert (err <= worst + 1).all(), f"stitching added error at {int((err > worst + 1).sum())} pixels"
    assert err.mean() < worst.mean()
    # Figures for docs/runtime.md: PSNR of tiled vs untiled for the random tiny model.
    print(
        f"{name}: tiled vs untiled PSNR {_psnr(tiled, ref.astype(np.uint8)):.1f} dB, "
        f"mean |err| {err.mean():.1f}, per-tile bound mean {worst.mean():.1f}"
    )


def _whole_canvas(p, outs: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """The straightforward float64 whole-image canvas (the exact blend, rounded half to even)."""
    s, ot, my, mx = p.scale, p.tile * p.scale, p.margin_y * p.scale, p.margin_x * p.scale
    oh, ow = p.out_size
    wy = _ramp_weights([y * s for y in p.ys], ot, p.padded_h * s, p.overlap * s)
    wx = _ramp_weights([x * s for x in p.xs], ot, p.padded_w * s, p.overlap * s)
    canvas = np.zeros((oh, ow, 3), np.float64)
    for i, t in outs:
        r, c = divmod(i, len(p.xs))
        y0, x0 = p.ys[r] * s, p.xs[c] * s
        cy0, cy1, cx0, cx1 = max(y0, my), min(y0 + ot, my + oh), max(x0, mx), min(x0 + ot, mx + ow)
        if cy0 < cy1 and cx0 < cx1:
            w = (
                wy[r][cy0 - y0 : cy1 - y0, None, None].astype(np.float64)
                * wx[c][None, cx0 - x0 : cx1 - x0, None]
            )
            canvas[cy0 - my : cy1 - my, cx0 - mx : cx1 - mx] += (
                t[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] * w
            )
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("h", "w", "scale", "band"), [(150, 211, 1, 64), (77, 50, 4, 16), (20, 300, 2, 7)])
def test_stitching_is_exact_and_independent_of_tile_order(h: int, w: int, scale: int, band: int) -> None:
    """Integer weights: the same request gives the same bytes whatever order its tiles finish in (several
    engine instances), and agrees with a float whole-image canvas up to ties in rounding (≤ 1 LSB)."""
    rng = np.random.default_rng(h * w)
    p = plan_tiles(h, w, 32, 12, scale)
    outs = [(i, rng.integers(0, 256, (32 * scale, 32 * scale, 3), np.uint8)) for i in range(p.n_tiles)]
    results = []
    for order in ("raster", "shuffled", "reversed"):
        seq = {
            "raster": outs,
            "shuffled": [outs[k] for k in rng.permutation(len(outs))],
            "reversed": outs[::-1],
        }[order]
        st = Stitcher(p, band_rows=band)
        peak = 0
        for i, t in seq:
            st.add(i, t)
            peak = max(peak, st.float_rows)
        results.append(st.result().copy())
        assert st.float_rows == 0
        if order == "raster":  # about one tile row of accumulator rows, not the whole image
            assert peak <= (32 * scale + 2 * band)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    # vs the exact (float64) blend: never more than one LSB, only where the exact value sits within the
    # 2⁻¹¹ weight step of a .5 tie. Random tiles disagreeing by up to 255 in every overlap are the
    # worst case; tiles that agree within a few LSB, as a real network's neighbours do, are the usual:
    d = np.abs(results[0].astype(np.int16) - _whole_canvas(p, outs))
    assert d.max() <= 1 and (d > 0).mean() < 0.05
    img = np.tile(np.linspace(0, 255, w * scale, dtype=np.float32), (h * scale, 1))[..., None].repeat(3, 2)
    padded = np.pad(img, ((p.margin_y * scale,) * 2, (p.margin_x * scale,) * 2, (0, 0)), mode="reflect")
    padded = np.pad(
        padded,
        ((0, p.padded_h * scale - padded.shape[0]), (0, p.padded_w * scale - padded.shape[1]), (0, 0)),
        mode="edge",
    )
    t = 32 * scale
    near = [
        (
            i,
            np.clip(
                padded[y * scale : y * scale + t, x * scale : x * scale + t] + rng.normal(0, 1, (t, t, 3)),
                0,
                255,
            ).astype(np.uint8),
        )
        for i, y, x in p.positions()
    ]
    st = Stitcher(p)
    for i, tile in near:
        st.add(i, tile)
    d = np.abs(st.result().astype(np.int16) - _whole_canvas(p, near))
    assert d.max() <= 1 and (d > 0).mean() < 1e-2  # measured ≈0.3 %, as much as a float32 canvas
    st = Stitcher(p)
    for wts, length in ((st._wy, p.padded_h * scale), (st._wx, p.padded_w * scale)):
        starts = [a * scale for a in (p.ys if wts is st._wy else p.xs)]
        total = np.zeros(length, np.int64)
        for a, q in zip(starts, wts, strict=True):
            total[a : a + len(q)] += q
        assert (total == 1 << 11).all()


def test_band_flushing_keeps_float_memory_to_a_tile_row() -> None:
    p = plan_tiles(2000, 500, 128, 32, 1)
    st = Stitcher(p)
    peak = 0
    for i, _, _ in p.positions():
        st.add(i, np.zeros((128, 128, 3), np.uint8))
        peak = max(peak, st.float_rows)
    assert peak <= 128 + 2 * 64 < 2000 // 4
