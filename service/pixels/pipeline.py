"""One request, end to end, in pixels: resize plan → tiles → (engine) → stitch → resize → colour fix.

The runtime runs the engine part through its batcher; `run_sync` runs the same steps inline for the
reference CLI, verification and tests, so every path shares this one implementation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.manifest import TileGeometry
from service.pixels.colorfix import apply_color_fix
from service.pixels.imageops import resize_rgb
from service.pixels.tiling import Stitcher, TilePlan, pad_image, plan_tiles, tiles_of

TileFn = Callable[[np.ndarray], np.ndarray]
StageCpu = Callable[[str, float], None]  # (stage, CPU seconds): the host-work metric


def no_cpu(stage: str, seconds: float) -> None:
    return None


Tiler = Callable[[int, int], TilePlan]  # (graph-input height, width) → where its tiles lie


@dataclass(frozen=True)
class RequestPlan:
    in_h: int
    in_w: int
    out_h: int
    out_w: int
    pre_h: int  # size the input is resized to before tiling (graph input space)
    pre_w: int
    tiles: TilePlan
    units: int = 0  # admission cost in primary-tile units (computed pixels / primary tile area)

    @property
    def n_tiles(self) -> int:
        return self.tiles.n_tiles

    @property
    def stitched_size(self) -> tuple[int, int]:
        return self.tiles.out_size

    @property
    def needs_post_resize(self) -> bool:
        return self.stitched_size != (self.out_h, self.out_w)


def make_plan(
    in_h: int,
    in_w: int,
    out_h: int,
    out_w: int,
    geometry: TileGeometry,
    max_stitch_pixels: int | None = None,
    tiler: Tiler | None = None,
) -> RequestPlan:
    """Decide where resizing happens. Cheap (no pixels touched): admission uses it on header sizes.

    A graph of scale 1 (GenDR) works at output resolution: the input is resized to the target first.
    A graph of scale g > 1 (ESRGAN ×4) runs on the input as it is when that reaches the target, and
    the stitched result is resized down once; when the target is larger than g × input, or the
    stitched image would exceed `max_stitch_pixels`, the input is first resized to target / g.
    """
    if min(in_h, in_w, out_h, out_w) < 1:
        raise ValueError("image sizes must be positive")
    g = geometry.graph_scale
    native = out_h <= g * in_h and out_w <= g * in_w
    if native and max_stitch_pixels is not None and (g * in_h) * (g * in_w) > max_stitch_pixels:
        native = False
    if g == 1:
        pre_h, pre_w = out_h, out_w
    elif native:
        pre_h, pre_w = in_h, in_w
    else:
        pre_h, pre_w = math.ceil(out_h / g), math.ceil(out_w / g)
    if tiler is None:
        tiles = plan_tiles(pre_h, pre_w, geometry.tile, geometry.overlap, g)
    else:
        tiles = tiler(pre_h, pre_w)
    units = max(1, -(-tiles.computed_pixels // (geometry.tile * geometry.tile)))
    return RequestPlan(in_h, in_w, out_h, out_w, pre_h, pre_w, tiles, units)


def prepare_input(image: np.ndarray, plan: RequestPlan, cpu: StageCpu = no_cpu) -> np.ndarray:
    """Resized and reflect-padded input, ready to be cut into tiles."""
    if image.shape[:2] != (plan.in_h, plan.in_w) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a {plan.in_w}×{plan.in_h} RGB image, got shape {image.shape}")
    c0 = time.thread_time()
    resized = resize_rgb(image, plan.pre_h, plan.pre_w)
    c1 = time.thread_time()
    padded = pad_image(resized, plan.tiles)
    cpu("resize", c1 - c0)
    cpu("pad", time.thread_time() - c1)
    return padded


def finish(
    stitched: np.ndarray,
    image: np.ndarray,
    plan: RequestPlan,
    color_fix: str,
    strength: float = 1.0,
    cpu: StageCpu = no_cpu,
    plain: np.ndarray | None = None,
) -> np.ndarray:
    """Stitched → output size, colour fix, then `strength`: a blend with the plainly (bicubic) resized
    input — 0 gives exactly the plain resize, 1 the model's result alone. `plain`: that resize when
    the caller has it already (a scale-1 graph's prepared input is exactly it)."""
    c0 = time.thread_time()
    out = resize_rgb(stitched, plan.out_h, plan.out_w)
    if color_fix == "none" and strength >= 1.0:
        cpu("resize", time.thread_time() - c0)
        return out
    if plain is None:
        plain = resize_rgb(image, plan.out_h, plan.out_w)
    c1 = time.thread_time()
    cpu("resize", c1 - c0)
    if color_fix != "none":
        out = apply_color_fix(out, plain, color_fix)
    if strength < 1.0:
        out = plain if strength <= 0.0 else _blend(out, plain, strength)
    cpu("colour_fix", time.thread_time() - c1)
    return out


def _blend(out: np.ndarray, plain: np.ndarray, strength: float) -> np.ndarray:
    mixed = out.astype(np.float32) * strength + plain.astype(np.float32) * (1.0 - strength)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def run_sync(
    image: np.ndarray,
    out_h: int,
    out_w: int,
    geometry: TileGeometry,
    fn: TileFn,
    *,
    batch: int = 1,
    color_fix: str = "none",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Whole request inline. `fn`: uint8 [B,t,t,3] → uint8 [B,t·g,t·g,3]."""
    plan = make_plan(image.shape[0], image.shape[1], out_h, out_w, geometry)
    padded = prepare_input(image, plan)
    st = Stitcher(plan.tiles)
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        out = fn(np.stack([t for _, t in pending]))
        if out.shape[0] != len(pending):
            raise RuntimeError(f"engine returned {out.shape[0]} tiles for {len(pending)}")
        for (i, _), o in zip(pending, out, strict=True):
            st.add(i, o)
        if progress:
            progress(len(pending))
        pending.clear()

    for (i, _, _), t in zip(plan.tiles.positions(), tiles_of(padded, plan.tiles), strict=True):
        pending.append((i, t))
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    return finish(st.result(), image, plan, color_fix)
