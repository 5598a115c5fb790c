"""Tile planner and stitcher: any image size becomes fixed-shape overlapping tiles and back.

The image is first reflect-padded by `margin` on every side (so tiles touching the border still see
context instead of the network's zero padding), and to at least one tile; an axis that fits one tile
keeps one tile (its margin shrinks), so an image that fits a tile costs one tile run. Tiles sit on a
grid whose positions are spread evenly so neighbours overlap by at least `overlap`. Blending weights are
separable ramps across each overlap; because the tiles form a grid, the normaliser is separable too,
so no whole-image weight canvas is needed.
"""

from __future__ import annotations

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


@dataclass
class Stitcher:
    """Accumulates scaled tile outputs with feathered weights and flushes finished rows to uint8.

    Exact and order-independent: weights are fixed-point (2×11 bits, summing to exactly 2²² at
    every pixel) and accumulate in int32, so a request's result does not depend on which engine
    instance finished first, and a pixel all tiles agree on comes out unchanged.

    Memory: the accumulator exists only for bands of `band_rows` output rows that some unfinished
    tile row still touches. Once tile rows 0..r are complete, every output row above the start of
    tile row r+1 is final: it is rounded into the uint8 result and its band freed. Tiles arriving in
    raster order (as the batcher cuts them) keep about one tile row of accumulator rows alive instead
    of a whole-image canvas (12 bytes per output pixel: 192 MB at 16 MP).
    """

    plan: TilePlan
    channels: int = 3
    band_rows: int = 64
    _wy: list[np.ndarray] = field(init=False, repr=False)
    _wx: list[np.ndarray] = field(init=False, repr=False)
    _done: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        p, s = self.plan, self.plan.scale
        oth, otw = p.tile_h * s, p.tile_w * s
        ramp = p.overlap * s
        ys, xs = [y * s for y in p.ys], [x * s for x in p.xs]
        oh, ow = p.out_size
        self._out = np.empty((oh, ow, self.channels), dtype=np.uint8)
        self._bands: dict[int, np.ndarray] = {}
        self._done = np.zeros(p.n_tiles, dtype=bool)
        self._row_left = [len(p.xs)] * len(p.ys)
        self._rows_complete = 0
        self._flushed = 0
        if p.n_tiles == 1:  # one tile: its crop is the result, no weights or accumulator
            return
        self._wy = _int_weights(ys, _ramp_weights(ys, oth, p.padded_h * s, ramp), p.padded_h * s)
        self._wx = _int_weights(xs, _ramp_weights(xs, otw, p.padded_w * s, ramp), p.padded_w * s)
        m = p.margin_y * s
        # output rows [0, final_after[r]) are final once tile rows 0..r are complete
        self._final_after = [min(oh, max(0, p.ys[r + 1] * s - m)) for r in range(len(p.ys) - 1)] + [oh]

    def add(self, index: int, tile_out: np.ndarray) -> None:
        p, s = self.plan, self.plan.scale
        oth, otw = p.tile_h * s, p.tile_w * s
        if tile_out.shape[:2] != (oth, otw):
            raise ValueError(f"tile {index}: output {tile_out.shape[:2]} but expected {(oth, otw)}")
        if self._done[index]:
            raise ValueError(f"tile {index} added twice")
        my, mx = p.margin_y * s, p.margin_x * s
        oh, ow = p.out_size
        if p.n_tiles == 1:
            self._out[:] = tile_out[my : my + oh, mx : mx + ow]
            self._done[index] = True
            self._flushed = oh
            return
        row, col = divmod(index, len(p.xs))
        y0, x0 = p.ys[row] * s, p.xs[col] * s
        # intersect the tile with the un-padded output region
        cy0, cy1 = max(y0, my), min(y0 + oth, my + oh)
        cx0, cx1 = max(x0, mx), min(x0 + otw, mx + ow)
        if cy0 < cy1 and cx0 < cx1:
            wy = self._wy[row][cy0 - y0 : cy1 - y0, None, None]
            wx = self._wx[col][None, cx0 - x0 : cx1 - x0, None]
            block = tile_out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].astype(np.int32)
            block *= wy * wx
            self._accumulate(cy0 - my, cy1 - my, cx0 - mx, cx1 - mx, block)
        self._done[index] = True
        self._row_left[row] -= 1
        while self._rows_complete < len(p.ys) and self._row_left[self._rows_complete] == 0:
            self._rows_complete += 1
        if self._rows_complete:
            self._flush(self._final_after[self._rows_complete - 1])

    def _accumulate(self, a: int, b: int, c0: int, c1: int, block: np.ndarray) -> None:
        oh, ow = self.plan.out_size
        br = self.band_rows
        y = a
        while y < b:
            k = y // br
            b0, b1 = k * br, min(k * br + br, oh)
            e = min(b, b1)
            band = self._bands.get(k)
            if band is None:
                band = self._bands[k] = np.zeros((b1 - b0, ow, self.channels), dtype=np.int32)
            band[y - b0 : e - b0, c0:c1] += block[y - a : e - a]
            y = e

    def _flush(self, upto: int) -> None:
        oh, ow = self.plan.out_size
        br = self.band_rows
        while self._flushed < oh:
            k = self._flushed // br
            b0, b1 = k * br, min(k * br + br, oh)
            if b1 > upto:
                return
            band = self._bands.pop(k, None)
            if band is None:  # cannot happen for a valid plan (every pixel is covered); stay correct anyway
                band = np.zeros((b1 - b0, ow, self.channels), dtype=np.int32)
            k = 2 * WEIGHT_BITS
            rem = band & ((1 << k) - 1)
            band >>= k
            half = 1 << (k - 1)  # round half to even, as np.rint (ties are common: 50/50 weights mid-ramp)
            band += (rem > half) | ((rem == half) & (band & 1 == 1))
            np.minimum(band, 255, out=band)
            self._out[b0:b1] = band
            self._flushed = b1

    @property
    def float_rows(self) -> int:
        """Output rows currently held in accumulators (memory diagnostics)."""
        return sum(b.shape[0] for b in self._bands.values())

    @property
    def complete(self) -> bool:
        return bool(self._done.all())

    def result(self) -> np.ndarray:
        if not self.complete:
            missing = int((~self._done).sum())
            raise RuntimeError(f"{missing} of {self.plan.n_tiles} tiles missing")
        self._flush(self.plan.out_size[0])
        return self._out
