"""Cost-aware tile planning: which engine input shape runs a request, chosen by measured cost.

Candidates for a (graph-input) image of h × w:
- every static tile the backend serves (shape buckets): the smallest that holds a small image runs
  it as one tile, bigger ones cover large images with fewer overlaps;
- on a backend that takes dynamic shapes (a CNN on ONNX Runtime / PyTorch): the whole image as one
  call, or, above the per-call pixel budget, the fewest equal rectangular tiles under it — memory per
  call stays bounded (flat), and a tiny request behind it waits for at most one such call.
Each is priced with the cost table (seconds per call by shape and batch, measured at warm-up and
updated by every batch); the cheapest wins, static shapes on a tie (they batch across requests).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from service.manifest import TileGeometry
from service.pixels.tiling import TilePlan, plan_tiles
from service.scheduling.costs import CostTable
from service.settings import Settings

#: A dynamic candidate must be this much cheaper than the best static one to win (static tiles batch
#: with other requests' tiles, so their real cost under load is lower than the request-alone estimate).
STATIC_PREFERENCE = 1.02
MAX_GRID = 16  # dynamic grids searched per axis


@dataclass(frozen=True)
class EngineShapes:
    """What the engine can run, as the planner needs it."""

    tiles: tuple[int, ...]  # static square input tile edges, any order
    overlap: int
    scale: int
    size_multiple: int = 8
    dynamic: bool = False
    max_call_pixels: int = 0  # input pixels of one dynamic call (0: no dynamic calls)
    max_batch: int | None = None

    @property
    def primary(self) -> int:
        return max(self.tiles)

    @classmethod
    def of(
        cls,
        g: TileGeometry,
        tiles: tuple[int, ...],
        dynamic: bool = False,
        settings: Settings | None = None,
        max_batch: int | None = None,
        max_call_pixels: int | None = None,
    ) -> EngineShapes:
        """The loaded engine's shapes with the model's geometry and the per-call budget (the runtime's
        resolved whole-image cap, else the setting)."""
        if max_call_pixels is None:
            max_call_pixels = settings.whole_image_max_pixels if settings is not None else 0
        budget = max_call_pixels if dynamic else 0
        return cls(tiles, g.overlap, g.graph_scale, g.size_multiple, dynamic, budget, max_batch)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _static(h: int, w: int, s: EngineShapes) -> Iterator[TilePlan]:
    for t in sorted(set(s.tiles)):
        fits = h <= t and w <= t
        if fits or 2 * s.overlap < t:
            yield plan_tiles(h, w, t, s.overlap, s.scale)
        if fits:
            return  # a larger tile would only compute more padding


def _axis_tile(length: int, n: int, s: EngineShapes) -> int:
    """Tile length that covers `length` in `n` overlapping tiles (whole axis when n == 1)."""
    if n == 1:
        return _round_up(length, s.size_multiple)
    padded = length + 2 * (s.overlap // 2)
    return _round_up(math.ceil((padded + (n - 1) * s.overlap) / n), s.size_multiple)


def _dynamic(h: int, w: int, s: EngineShapes) -> Iterator[TilePlan]:
    if not s.dynamic or s.max_call_pixels <= 0:
        return
    for ny in range(1, MAX_GRID + 1):
        th = _axis_tile(h, ny, s)
        if ny > 1 and th <= 2 * s.overlap:
            return
        for nx in range(1, MAX_GRID + 1):
            tw = _axis_tile(w, nx, s)
            if nx > 1 and tw <= 2 * s.overlap:
                break
            if th * tw <= s.max_call_pixels:
                yield plan_tiles(h, w, (th, tw), s.overlap, s.scale)
                break  # more columns only add overlap


def _cost(p: TilePlan, costs: CostTable, s: EngineShapes) -> float:
    th, tw = p.shape
    if th == tw and th in s.tiles:
        return costs.request_s(th, tw, p.n_tiles, s.max_batch)
    return p.n_tiles * costs.call_s(th, tw, 1) * STATIC_PREFERENCE


def choose(h: int, w: int, shapes: EngineShapes, costs: CostTable | None) -> TilePlan:
    """The cheapest plan for an h × w graph-input image (the primary tile when nothing is measured)."""
    if costs is None:
        return plan_tiles(h, w, shapes.primary, shapes.overlap, shapes.scale)
    best: tuple[float, int, TilePlan] | None = None
    for p in (*_static(h, w, shapes), *_dynamic(h, w, shapes)):
        key = (_cost(p, costs, shapes), p.computed_pixels, p)
        if best is None or key[:2] < best[:2]:
            best = key
    assert best is not None  # the primary tile always plans
    return best[2]
