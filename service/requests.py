"""One upscale request as the runtime sees it: the job, its outcome, and the pixel steps around the
batcher (prepare before the queue, the sink that stitches as batches land, finish after)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.pixels.pipeline import RequestPlan, StageCpu, finish, no_cpu, prepare_input
from service.pixels.tiling import Stitcher, TilePlan


@dataclass(frozen=True)
class UpscaleJob:
    image: np.ndarray  # HWC uint8 RGB (alpha stripped, EXIF applied, modes normalised by the HTTP layer)
    out_height: int
    out_width: int
    color_fix: str | None  # "none" | "adain" | "wavelet"; None = the model's default
    deadline: float  # time.monotonic() after which the job fails with DeadlineExceeded
    request_id: str
    progress: Callable[[int], None] | None = None  # gets each batch's tile count as it lands (jobs)
    strength: float = 1.0  # share of the model's result against the plain resize (1: the model's only)


@dataclass(frozen=True)
class UpscaleOutcome:
    image: np.ndarray  # HWC uint8, out_height × out_width × 3
    model: str
    backend: str
    precision: str
    tiles: int
    queue_s: float  # admission → first tile started
    compute_s: float  # engine time attributed to this request
    runtime_s: float  # admission → result


def shape_label(tiles: TilePlan, static: tuple[int, ...]) -> str:
    h, w = tiles.shape
    return f"{h}x{w}" if h == w and h in static else "dynamic"


def request_sink(
    stitcher: Stitcher, progress: Callable[[int], None] | None = None, cpu: StageCpu = no_cpu
) -> Callable[[Sequence[int], np.ndarray], None]:
    def add(indices: Sequence[int], tiles: np.ndarray) -> None:
        c0 = time.thread_time()
        for i, t in zip(indices, tiles, strict=True):
            stitcher.add(i, t)
        cpu("stitch", time.thread_time() - c0)
        if progress is not None:
            progress(len(indices))

    return add


def prepare_request(
    image: np.ndarray, plan: RequestPlan, cpu: StageCpu = no_cpu
) -> tuple[np.ndarray, Stitcher]:
    return prepare_input(image, plan, cpu), Stitcher(plan.tiles)


def finish_request(
    stitcher: Stitcher,
    image: np.ndarray,
    plan: RequestPlan,
    color_fix: str,
    strength: float = 1.0,
    cpu: StageCpu = no_cpu,
    plain: np.ndarray | None = None,
) -> np.ndarray:
    c0 = time.thread_time()
    stitched = stitcher.result()
    cpu("stitch", time.thread_time() - c0)
    return finish(stitched, image, plan, color_fix, strength, cpu, plain)


def plain_view(padded: np.ndarray, plan: RequestPlan, color_fix: str, strength: float) -> np.ndarray | None:
    """The plain resize of the input, when the colour fix or `strength` needs it and it is already
    inside the padded input (a scale-1 graph works at output size): the same pixels, resized once."""
    if (color_fix == "none" and strength >= 1.0) or (plan.pre_h, plan.pre_w) != (plan.out_h, plan.out_w):
        return None
    t = plan.tiles
    return padded[t.margin_y : t.margin_y + plan.pre_h, t.margin_x : t.margin_x + plan.pre_w]
