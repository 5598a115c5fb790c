"""Tile planner and stitcher: any image size becomes fixed-shape overlapping tiles and back.

The image is first reflect-padded by `margin` on every side (so tiles touching the border still see
context instead of the network's zero padding), and to at least one tile; an axis that fits one tile
keeps one tile (its margin shrinks), so an image that fits a tile costs one tile run. Tiles sit on a
grid whose positions are spread evenly so neighbours overlap by at least `overlap`. Blending weights are
separable ramps across each overlap; because the tiles form a grid, the normaliser is separable too,
so no whole-image weight canvas is needed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


def _positions(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - overlap) / stride)
    if n <= 1:
        return [0]
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _ramp_weights(starts: list[int], tile: int, length: int, ramp: int) -> list[np.ndarray]:
    """Per-tile 1-D weights (length `tile`), ramping only where a neighbour overlaps.

    Within an overlap of length L the weight is 0 on the outer L/4 (where the tile's own border
    effects live: the network's zero padding), rises linearly over the middle L/2 and is 1 beyond.
    So a network whose receptive-field radius is ≤ L/4 stitches exactly.
    """
    eps = 1e-6
    out = []
    u = np.arange(tile, dtype=np.float32) + 0.5
    for i, s in enumerate(starts):
        w = np.ones(tile, dtype=np.float32)
        if ramp > 0:
            if i > 0:
                ov = starts[i - 1] + tile - s  # overlap with the previous tile
                w = np.minimum(w, np.clip((u - ov / 4) / max(ov / 2, 1), eps, 1.0))
            if i < len(starts) - 1:
                ov = s + tile - starts[i + 1]
                w = np.minimum(w, np.clip((tile - u - ov / 4) / max(ov / 2, 1), eps, 1.0))
        out.append(w)
    # normalise so the weights of all tiles covering a coordinate sum to 1
    total = np.zeros(length, dtype=np.float32)
    for s, w in zip(starts, out, strict=True):
        total[s : s + tile] += w
    return [w / total[s : s + tile] for s, w in zip(starts, out, strict=True)]


WEIGHT_BITS = 11  # per axis; 2 axes → 22 bits, and 255 · 2²² < 2³¹: int32 accumulators cannot overflow


def _int_weights(
    starts: list[int], weights: list[np.ndarray], length: int, bits: int = WEIGHT_BITS
) -> list[np.ndarray]:
    """Fixed-point copies of normalised weights whose sum at every coordinate is exactly 2**bits.

    Integer accumulation makes the stitched result independent of the order tiles arrive in (float
    sums are not associative: with several engine instances the order varies, and a float canvas
    could then flip a pixel by one LSB between two runs of the same request).
    """
    one = 1 << bits
    q = [np.rint(w * one).astype(np.int32) for w in weights]
    total = np.zeros(length, dtype=np.int64)
    best = np.full(length, -1, dtype=np.int64)  # tile with the largest weight at each coordinate
    best_w = np.full(length, -1, dtype=np.int64)
    for i, (s, w) in enumerate(zip(starts, q, strict=True)):
        total[s : s + len(w)] += w
        better = w > best_w[s : s + len(w)]
        best[s : s + len(w)][better] = i
        best_w[s : s + len(w)][better] = w[better]
    residue = one - total  # a few units where rounding did not sum to exactly 2**bits
    for x in np.nonzero(residue)[0]:
        i = int(best[x])
        q[i][x - starts[i]] += residue[x]
    return q


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image lie, in input pixels of the reflect-padded image.

    Tiles are `tile_h × tile_w` (square for static tile graphs; a whole image on a dynamic graph is
    one rectangular tile). The margin is per axis: an axis that fits one tile keeps one tile.
    """

    height: int
    width: int
    tile_h: int
    tile_w: int
    overlap: int
    scale: int
    margin_y: int
    margin_x: int
    padded_h: int
    padded_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def tile(self) -> int:
        """The square tile edge (static tile graphs); a rectangular plan has no single edge."""
        if self.tile_h != self.tile_w:
            raise ValueError(f"a {self.tile_w}×{self.tile_h} plan has no square tile edge")
        return self.tile_h

    @property
    def shape(self) -> tuple[int, int]:
        return self.tile_h, self.tile_w

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def out_size(self) -> tuple[int, int]:
        return self.height * self.scale, self.width * self.scale

    @property
    def computed_pixels(self) -> int:
        """Input pixels the engine computes for this plan (overlap and padding included)."""
        return self.n_tiles * self.tile_h * self.tile_w

    @property
    def occupancy(self) -> float:
        """Share of computed tile pixels that are real image pixels (the rest is padding/overlap)."""
        return (self.height * self.width) / self.computed_pixels

    def positions(self) -> Iterator[tuple[int, int, int]]:
        i = 0
        for y in self.ys:
            for x in self.xs:
                yield i, y, x
                i += 1


def _axis(length: int, tile: int, margin: int) -> tuple[int, int]:
    """(margin, padded length) of one axis: an axis that fits a tile keeps one tile (the margin
    shrinks to what the tile has room for), a longer one is reflect-padded by the full margin."""
    if length <= tile:
        return min(margin, (tile - length) // 2), tile
    return margin, length + 2 * margin


def plan_tiles(
    height: int,
    width: int,
    tile: int | tuple[int, int],
    overlap: int,
    scale: int = 1,
    margin: int | None = None,
) -> TilePlan:
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1×1, got {width}×{height}")
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    if not 0 <= 2 * overlap < min(th, tw) and (height > th or width > tw):
        raise ValueError(f"overlap {overlap} must be in [0, tile/2) for tile {th}×{tw}")
    m = overlap // 2 if margin is None else margin
    my, ph = _axis(height, th, m)
    mx, pw = _axis(width, tw, m)
    return TilePlan(
        height=height,
        width=width,
        tile_h=th,
        tile_w=tw,
        overlap=overlap,
        scale=scale,
        margin_y=my,
        margin_x=mx,
        padded_h=ph,
        padded_w=pw,
        ys=tuple(_positions(ph, th, overlap)),
        xs=tuple(_positions(pw, tw, overlap)),
    )


def pad_image(image: np.ndarray, plan: TilePlan) -> np.ndarray:
    """Reflect-pad an HWC image to the plan's padded size (image sits at (margin_y, margin_x))."""
    h, w = image.shape[:2]
    if (h, w) != (plan.height, plan.width):
        raise ValueError(f"image is {w}×{h}, plan is for {plan.width}×{plan.height}")
    my, mx = plan.margin_y, plan.margin_x
    pad = ((my, plan.padded_h - h - my), (mx, plan.padded_w - w - mx), (0, 0))
    if not any(a or b for a, b in pad):
        return image
    # numpy's reflect needs ≥2 pixels; a 1-pixel axis can only be repeated.
    mode = "reflect" if min(h, w) > 1 else "edge"
    return np.pad(image, pad, mode=mode)


def tiles_of(padded: np.ndarray, plan: TilePlan) -> Iterator[np.ndarray]:
    th, tw = plan.shape
    for _, y, x in plan.positions():
        yield padded[y : y + th, x : x + tw]


def _segments(
    starts: list[int], weights: list[np.ndarray], crop0: int, crop1: int
) -> list[tuple[int, int, tuple[int, ...]]]:
    """One axis cut into runs of coordinates with the same set of tiles of non-zero weight, within
    [crop0, crop1) and shifted to start at 0: (start, end, tiles). A run of one tile is that tile's."""
    cuts = {crop0, crop1}
    spans = []
    for i, (s, w) in enumerate(zip(starts, weights, strict=True)):
        nz = np.flatnonzero(w)
        if not len(nz):
            continue  # a tile every neighbour outweighs everywhere contributes nothing
        a, b = s + int(nz[0]), s + int(nz[-1]) + 1  # a ramp is monotone: its support is one run
        spans.append((i, a, b))
        cuts.update(c for c in (a, b) if crop0 < c < crop1)
    edges = sorted(cuts)
    out = []
    for a, b in itertools.pairwise(edges):
        tiles = tuple(i for i, s0, s1 in spans if s0 <= a < s1)
        out.append((a - crop0, b - crop0, tiles))
    return out


@dataclass
class _Region:
    """A rectangle of the output blended from several tiles: its accumulator lives until they all came.

    `axes`: "x" when its tiles differ only by column (one tile row: every row weight is 2¹¹), "y" only by
    row, "xy" both (the corners). A one-axis blend is Σ v·w with w ≤ 2¹¹: below 2²⁴, so float32 holds
    it exactly and divides by 2¹¹ exactly, and rint rounds half to even as the integer version did;
    a corner needs 22 bits of weight, so float64."""

    y0: int
    y1: int
    x0: int
    x1: int
    waiting: int
    axes: str
    acc: np.ndarray | None = None


@dataclass
class Stitcher:
    """Blends scaled tile outputs with feathered weights straight into the uint8 result.

    Exact and order-independent: weights are fixed-point (2×11 bits, summing to exactly 2²² at
    every pixel) and their sums are exact (integers held exactly in float32 or float64, see _Region),
    so a request's result does not depend on which engine instance finished first, and a pixel all
    tiles agree on comes out unchanged.

    Only where two or more tiles have weight is anything blended: the output is cut into rectangles by
    the runs of tiles covering each row and column; a rectangle one tile owns (most of every tile:
    the outer quarter of each overlap has weight 0, the inner quarter weight 1) is copied from the
    tile into the result, and each shared rectangle gets an accumulator that is rounded into the
    result and freed once its last tile arrived. Tiles arriving in raster order keep about one overlap
    strip of accumulator rows alive; a one-tile plan is its crop, with no copy at all.
    """

    plan: TilePlan
    channels: int = 3
    band_rows: int = 64  # kept for callers; memory is bounded by the overlap strips now
    _wy: list[np.ndarray] = field(init=False, repr=False)
    _wx: list[np.ndarray] = field(init=False, repr=False)
    _done: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        p, s = self.plan, self.plan.scale
        oth, otw = p.tile_h * s, p.tile_w * s
        ramp = p.overlap * s
        ys, xs = [y * s for y in p.ys], [x * s for x in p.xs]
        oh, ow = p.out_size
        self._done = np.zeros(p.n_tiles, dtype=bool)
        self._single: np.ndarray | None = None
        if p.n_tiles == 1:  # one tile: its crop is the result, no weights or accumulator
            return
        self._out = np.empty((oh, ow, self.channels), dtype=np.uint8)
        self._wy = _int_weights(ys, _ramp_weights(ys, oth, p.padded_h * s, ramp), p.padded_h * s)
        self._wx = _int_weights(xs, _ramp_weights(xs, otw, p.padded_w * s, ramp), p.padded_w * s)
        my, mx = p.margin_y * s, p.margin_x * s
        rows = _segments(ys, self._wy, my, my + oh)
        cols = _segments(xs, self._wx, mx, mx + ow)
        self._fy = [w.astype(np.float32) for w in self._wy]  # exact: weights are ≤ 2¹¹
        self._fx = [w.astype(np.float32) for w in self._wx]
        ncol = len(p.xs)
        # per tile: (region or None for a rectangle it owns, y0, y1, x0, x1) in output coordinates
        self._parts: list[list[tuple[_Region | None, int, int, int, int]]] = [[] for _ in range(p.n_tiles)]
        for y0, y1, rt in rows:
            for x0, x1, ct in cols:
                tiles = [r * ncol + c for r in rt for c in ct]
                axes = ("y" if len(rt) > 1 else "") + ("x" if len(ct) > 1 else "")
                region = _Region(y0, y1, x0, x1, len(tiles), axes[::-1]) if len(tiles) > 1 else None
                for t in tiles:
                    self._parts[t].append((region, y0, y1, x0, x1))

    def add(self, index: int, tile_out: np.ndarray) -> None:
        p, s = self.plan, self.plan.scale
        oth, otw = p.tile_h * s, p.tile_w * s
        if tile_out.shape[:2] != (oth, otw):
            raise ValueError(f"tile {index}: output {tile_out.shape[:2]} but expected {(oth, otw)}")
        if self._done[index]:
            raise ValueError(f"tile {index} added twice")
        my, mx = p.margin_y * s, p.margin_x * s
        oh, ow = p.out_size
        self._done[index] = True
        if p.n_tiles == 1:
            self._single = tile_out[my : my + oh, mx : mx + ow]
            return
        row, col = divmod(index, len(p.xs))
        ty, tx = p.ys[row] * s - my, p.xs[col] * s - mx  # the tile's origin in output coordinates
        for region, y0, y1, x0, x1 in self._parts[index]:
            src = tile_out[y0 - ty : y1 - ty, x0 - tx : x1 - tx]
            if region is None:
                self._out[y0:y1, x0:x1] = src
                continue
            if region.axes == "x":
                w = self._fx[col][None, x0 - tx : x1 - tx, None]
            elif region.axes == "y":
                w = self._fy[row][y0 - ty : y1 - ty, None, None]
            else:
                wy = self._wy[row][y0 - ty : y1 - ty].astype(np.float64)
                w = (wy[:, None] * self._wx[col][None, x0 - tx : x1 - tx])[:, :, None]
            if region.acc is None:
                region.acc = np.multiply(src, w, dtype=w.dtype)
            else:
                region.acc += src * w
            region.waiting -= 1
            if region.waiting == 0:
                self._finish(region)

    def _finish(self, region: _Region) -> None:
        acc = region.acc
        assert acc is not None
        acc *= 2.0 ** -(WEIGHT_BITS * len(region.axes))  # a power of two: exact
        np.rint(acc, out=acc)  # half to even (ties are common: 50/50 weights mid-ramp); ≤ 255: convex
        self._out[region.y0 : region.y1, region.x0 : region.x1] = acc
        region.acc = None

    @property
    def float_rows(self) -> int:
        """Output rows currently covered by accumulators (memory diagnostics)."""
        if self.plan.n_tiles == 1:
            return 0
        rows: set[int] = set()
        for parts in self._parts:
            for region, *_ in parts:
                if region is not None and region.acc is not None:
                    rows.update(range(region.y0, region.y1))
        return len(rows)

    @property
    def complete(self) -> bool:
        return bool(self._done.all())

    def result(self) -> np.ndarray:
        """The stitched image (a one-tile plan: a view of that tile's output, not a copy)."""
        if not self.complete:
            missing = int((~self._done).sum())
            raise RuntimeError(f"{missing} of {self.plan.n_tiles} tiles missing")
        if self._single is not None:
            return self._single
        return self._out
