"""The output size of a request from its options, decided from the header alone (before any pixel).

- No `scale`, `width` or `height`: the largest scale up to the model's native one whose output fits
  `GENDR_MAX_OUTPUT_PIXELS` (so an ordinary 12 MP photo gets ×1.15 instead of a 413); the response says
  which in `X-Scale`. An explicit `scale` that does not fit stays a 413.
- `width` and `height` together: `fit=contain` (the default: inside the box, aspect kept), `cover` (fills
  the box, aspect kept, centred crop — done on the input, so no pixel is computed to be thrown away) or
  `fill` (stretched to the box, on request only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from service.errors import BadRequest, ImageTooLarge
from service.pixels.imageops import target_size
from service.settings import Settings

SCALE_STEP = 0.01  # a chosen default scale is rounded down to this, so the header reads plainly


@dataclass(frozen=True)
class OutputSize:
    out_h: int
    out_w: int
    crop: tuple[int, int, int, int] | None  # (top, left, height, width) of the input; cover only
    scale: float  # output over input (of the cropped input for cover)
    chosen: bool  # the server chose the scale (no size options given)

    @property
    def in_size(self) -> tuple[int, int] | None:
        return None if self.crop is None else (self.crop[2], self.crop[3])


def cover_crop(h: int, w: int, out_h: int, out_w: int) -> tuple[int, int, int, int]:
    """The centred part of an h×w input with the out_h:out_w aspect ratio."""
    if w * out_h > h * out_w:  # wider than the box: crop the sides
        cw = max(1, min(w, round(h * out_w / out_h)))
        return 0, (w - cw) // 2, h, cw
    ch = max(1, min(h, round(w * out_h / out_w)))
    return (h - ch) // 2, 0, ch, w


def output_size(h: int, w: int, params: Any, s: Settings, native: float) -> OutputSize:
    """From the header's h×w and the request's scale/width/height/fit (BadRequest / ImageTooLarge)."""
    crop = None
    chosen = params.scale is None and params.width is None and params.height is None
    if params.fit is not None and (params.width is None or params.height is None):
        raise BadRequest("fit applies when both width and height are given")
    if chosen:
        room = math.sqrt(s.max_output_pixels / (h * w))
        scale = min(native, s.max_scale, math.floor(room / SCALE_STEP) * SCALE_STEP)
        if scale < SCALE_STEP:
            raise ImageTooLarge(f"a {w}×{h} image has no output size under {s.max_output_pixels} pixels")
        out_h, out_w = max(1, math.floor(h * scale)), max(1, math.floor(w * scale))
    elif params.width is not None and params.height is not None and (params.fit or "contain") != "fill":
        box_h, box_w = int(params.height), int(params.width)
        if params.fit == "cover":
            crop = cover_crop(h, w, box_h, box_w)
            out_h, out_w = box_h, box_w
        else:  # contain: the largest size inside the box with the input's aspect ratio
            r = min(box_h / h, box_w / w)
            out_h, out_w = max(1, min(box_h, round(h * r))), max(1, min(box_w, round(w * r)))
    else:
        try:
            out_h, out_w = target_size(
                h,
                w,
                scale=params.scale,
                out_width=params.width,
                out_height=params.height,
                default_scale=native,
            )
        except ValueError as e:
            raise BadRequest(str(e)) from e
    in_h, in_w = (crop[2], crop[3]) if crop else (h, w)
    scale = max(out_h / in_h, out_w / in_w)
    if scale > s.max_scale + 1e-9:
        raise BadRequest(f"output {out_w}×{out_h} is ×{scale:.2f} the input; the limit is ×{s.max_scale:g}")
    if out_h * out_w > s.max_output_pixels:
        raise ImageTooLarge(
            f"output {out_w}×{out_h} = {out_h * out_w} pixels exceeds the limit of {s.max_output_pixels}"
        )
    return OutputSize(out_h, out_w, crop, round(scale, 4), chosen)
