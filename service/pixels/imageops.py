"""Pixel operations shared by the reference tools and the runtime (numpy + Pillow, no torch)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of an HWC uint8 image (Pillow's antialiased bicubic, as the pipeline defines)."""
    if image.shape[:2] == (height, width):
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    out = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))
    return out[:, :, None] if out.ndim == 2 else out


def target_size(
    height: int,
    width: int,
    *,
    scale: float | None = None,
    out_width: int | None = None,
    out_height: int | None = None,
    default_scale: float = 4.0,
) -> tuple[int, int]:
    """Output (height, width): explicit size wins; one side given keeps the aspect ratio."""
    if scale is not None and (out_width is not None or out_height is not None):
        raise ValueError("give either scale or width/height, not both")
    if out_width is not None and out_height is not None:
        return int(out_height), int(out_width)
    if out_width is not None:
        return max(1, round(height * out_width / width)), int(out_width)
    if out_height is not None:
        return int(out_height), max(1, round(width * out_height / height))
    s = default_scale if scale is None else scale
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"scale must be a positive number, got {s}")
    return max(1, round(height * s)), max(1, round(width * s))
