"""One upscale request as the runtime sees it: the job, its outcome, and the pixel steps around the
batcher (prepare before the queue, the sink that stitches as batches land, finish after)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.pixels.pipeline import RequestPlan, finish, prepare_input
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
    stitcher: Stitcher, progress: Callable[[int], None] | None = None
) -> Callable[[Sequence[int], np.ndarray], None]:
    def add(indices: Sequence[int], tiles: np.ndarray) -> None:
        for i, t in zip(indices, tiles, strict=True):
            stitcher.add(i, t)
        if progress is not None:
            progress(len(indices))

    return add


def prepare_request(image: np.ndarray, plan: RequestPlan) -> tuple[np.ndarray, Stitcher]:
    return prepare_input(image, plan), Stitcher(plan.tiles)


def finish_request(
    stitcher: Stitcher, image: np.ndarray, plan: RequestPlan, color_fix: str, strength: float = 1.0
) -> np.ndarray:
    return finish(stitcher.result(), image, plan, color_fix, strength)
