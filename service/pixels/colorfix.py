"""Colour correction of the restored image against the bicubic input (AdaIN or wavelet).

Done once per request after stitching: per-tile statistics would differ between tiles and show
as seams, which is also why tiled VAEs need it (docs/architecture.md, known pitfalls).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

WAVELET_LEVELS = 5


def _channel_stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of a uint8 image from 256-bin histograms (no float copy of the image;
    Pillow counts all channels in one pass in C)."""
    levels = np.arange(256, dtype=np.float64)
    hists = _histograms(image)
    n = hists.sum(axis=1)
    means = (hists * levels).sum(axis=1) / n
    stds = np.sqrt((hists * (levels[None] - means[:, None]) ** 2).sum(axis=1) / n)
    return means, stds


def _histograms(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3 and image.shape[2] == 3:
        return np.asarray(Image.fromarray(image).histogram(), dtype=np.float64).reshape(3, 256)
    return np.stack(
        [np.bincount(image[:, :, c].ravel(), minlength=256) for c in range(image.shape[2])]
    ).astype(np.float64)


def adain(image: np.ndarray, reference: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Match each channel's mean and std to the reference.

    The map is affine per channel on 256 input levels, so it is applied as a lookup table: exact, and
    no float copy of a 16 MP image is ever made (histogram statistics, uint8 in and out, both passes
    in Pillow's C loops: 9× faster than numpy's per-channel bincount and fancy indexing).
    """
    xm, xs = _channel_stats(image)
    rm, rs = _channel_stats(reference)
    levels = np.arange(256, dtype=np.float64)
    luts = [
        np.clip(np.rint((levels - xm[c]) / (xs[c] + eps) * rs[c] + rm[c]), 0, 255).astype(np.uint8)
        for c in range(image.shape[2])
    ]
    if image.shape[2] == 3:
        return np.asarray(Image.fromarray(image).point(np.concatenate(luts).tolist()))
    out = np.empty_like(image)
    for c, lut in enumerate(luts):
        out[:, :, c] = lut[image[:, :, c]]
    return out


def _blur(x: np.ndarray, dilation: int) -> np.ndarray:
    """Separable [1,2,1]/4 blur with holes (à trous), edge-replicated borders (slices, no gathers)."""
    out = x
    for axis in (0, 1):
        n = out.shape[axis]
        d = min(dilation, max(n - 1, 0))
        if d == 0:
            continue
        pad = [(0, 0)] * out.ndim
        pad[axis] = (d, d)
        p = np.pad(out, pad, mode="edge")

        def part(start: int, p: np.ndarray = p, axis: int = axis, n: int = n) -> np.ndarray:
            return p[(slice(None),) * axis + (slice(start, start + n),)]

        mid = part(d)
        res = part(0) + part(2 * d)
        res += mid + mid
        res *= 0.25
        out = res
    return out


def _low_frequency(x: np.ndarray, levels: int) -> np.ndarray:
    low = x
    for i in range(levels):
        low = _blur(low, 2**i)
    return low


def wavelet(image: np.ndarray, reference: np.ndarray, levels: int = WAVELET_LEVELS) -> np.ndarray:
    """Keep the output's high frequencies, take the low frequencies (colour, tone) from the reference.

    (x − low(x)) + low(r) is x + low(r − x): the blur is linear, so one low-pass of the difference does
    the work of two (float32 rounding aside)."""
    x = image.astype(np.float32)
    diff = reference.astype(np.float32)
    diff -= x
    x += _low_frequency(diff, levels)
    return x


def apply_color_fix(image: np.ndarray, reference: np.ndarray, method: str) -> np.ndarray:
    if method == "none":
        return image
    if image.shape != reference.shape:
        raise ValueError(f"colour fix needs equal shapes, got {image.shape} and {reference.shape}")
    if method == "adain":
        return adain(image, reference)
    if method == "wavelet":
        out = wavelet(image, reference)
    else:
        raise ValueError(f"unknown colour fix {method!r}; use none, adain or wavelet")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
