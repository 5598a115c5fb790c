"""Tile planner and stitcher: any image size becomes fixed-shape overlapping tiles and back.

The image is first reflect-padded by `margin` on every side (so tiles touching the border still see
context instead of the network's zero padding), and to at least one tile. Tiles sit on a grid whose
positions are spread evenly so neighbours overlap by at least `overlap`. Blending weights are
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


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image lie, in input pixels of the reflect-padded image."""

    height: int
    width: int
    tile: int
    overlap: int
    scale: int
    margin: int
    padded_h: int
    padded_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def out_size(self) -> tuple[int, int]:
        return self.height * self.scale, self.width * self.scale

    @property
    def occupancy(self) -> float:
        """Share of computed tile pixels that are real image pixels (the rest is padding/overlap)."""
        return (self.height * self.width) / (self.n_tiles * self.tile * self.tile)

    def positions(self) -> Iterator[tuple[int, int, int]]:
        i = 0
        for y in self.ys:
            for x in self.xs:
                yield i, y, x
                i += 1


def plan_tiles(height: int, width: int, tile: int, overlap: int, scale: int = 1, margin: int | None = None) -> TilePlan:
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1×1, got {width}×{height}")
    if not 0 <= 2 * overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile/2) for tile {tile}")
    m = overlap // 2 if margin is None else margin
    ph = max(height + 2 * m, tile)
    pw = max(width + 2 * m, tile)
    return TilePlan(
        height=height, width=width, tile=tile, overlap=overlap, scale=scale, margin=m, padded_h=ph, padded_w=pw,
        ys=tuple(_positions(ph, tile, overlap)), xs=tuple(_positions(pw, tile, overlap)),
    )


def pad_image(image: np.ndarray, plan: TilePlan) -> np.ndarray:
    """Reflect-pad an HWC image to the plan's padded size (image sits at (margin, margin))."""
    h, w = image.shape[:2]
    if (h, w) != (plan.height, plan.width):
        raise ValueError(f"image is {w}×{h}, plan is for {plan.width}×{plan.height}")
    m = plan.margin
    pad = ((m, plan.padded_h - h - m), (m, plan.padded_w - w - m), (0, 0))
    # numpy's reflect needs ≥2 pixels; a 1-pixel axis can only be repeated.
    mode = "reflect" if min(h, w) > 1 else "edge"
    return np.pad(image, pad, mode=mode)


def tiles_of(padded: np.ndarray, plan: TilePlan) -> Iterator[np.ndarray]:
    t = plan.tile
    for _, y, x in plan.positions():
        yield padded[y : y + t, x : x + t]


@dataclass
class Stitcher:
    """Accumulates scaled tile outputs with feathered weights into the output canvas."""

    plan: TilePlan
    channels: int = 3
    _canvas: np.ndarray = field(init=False, repr=False)
    _wy: list[np.ndarray] = field(init=False, repr=False)
    _wx: list[np.ndarray] = field(init=False, repr=False)
    _done: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        p, s = self.plan, self.plan.scale
        ot = p.tile * s
        ramp = p.overlap * s
        self._wy = _ramp_weights([y * s for y in p.ys], ot, p.padded_h * s, ramp)
        self._wx = _ramp_weights([x * s for x in p.xs], ot, p.padded_w * s, ramp)
        oh, ow = p.out_size
        self._canvas = np.zeros((oh, ow, self.channels), dtype=np.float32)
        self._done = np.zeros(p.n_tiles, dtype=bool)

    def add(self, index: int, tile_out: np.ndarray) -> None:
        p, s = self.plan, self.plan.scale
        ot = p.tile * s
        if tile_out.shape[:2] != (ot, ot):
            raise ValueError(f"tile {index}: output {tile_out.shape[:2]} but expected {(ot, ot)}")
        if self._done[index]:
            raise ValueError(f"tile {index} added twice")
        row, col = divmod(index, len(p.xs))
        y0, x0 = p.ys[row] * s, p.xs[col] * s
        m = p.margin * s
        oh, ow = p.out_size
        # intersect the tile with the un-padded output region
        cy0, cy1 = max(y0, m), min(y0 + ot, m + oh)
        cx0, cx1 = max(x0, m), min(x0 + ot, m + ow)
        if cy0 < cy1 and cx0 < cx1:
            wy = self._wy[row][cy0 - y0 : cy1 - y0, None, None]
            wx = self._wx[col][None, cx0 - x0 : cx1 - x0, None]
            block = tile_out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].astype(np.float32)
            self._canvas[cy0 - m : cy1 - m, cx0 - m : cx1 - m] += block * (wy * wx)
        self._done[index] = True

    @property
    def complete(self) -> bool:
        return bool(self._done.all())

    def result(self) -> np.ndarray:
        if not self.complete:
            missing = int((~self._done).sum())
            raise RuntimeError(f"{missing} of {self.plan.n_tiles} tiles missing")
        return np.clip(np.rint(self._canvas), 0, 255).astype(np.uint8)
