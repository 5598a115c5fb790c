"""Colour correction of the restored image against the bicubic input (AdaIN or wavelet).

Done once per request after stitching: per-tile statistics would differ between tiles and show
as seams, which is also why tiled VAEs need it (docs/architecture.md, known pitfalls).
"""

from __future__ import annotations

import numpy as np

WAVELET_LEVELS = 5


def _channel_stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of a uint8 image from 256-bin histograms (no float copy of the image)."""
    levels = np.arange(256, dtype=np.float64)
    means, stds = [], []
    for c in range(image.shape[2]):
        hist = np.bincount(image[:, :, c].ravel(), minlength=256).astype(np.float64)
        n = hist.sum()
        m = (hist * levels).sum() / n
        means.append(m)
        stds.append(np.sqrt((hist * (levels - m) ** 2).sum() / n))
    return np.array(means), np.array(stds)


def adain(image: np.ndarray, reference: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Match each channel's mean and std to the reference.

    The map is affine per channel on 256 input levels, so it is applied as a lookup table: exact, and
    no float copy of a 16 MP image is ever made (histogram statistics, uint8 in and out).
    """
    xm, xs = _channel_stats(image)
    rm, rs = _channel_stats(reference)
    levels = np.arange(256, dtype=np.float64)
    out = np.empty_like(image)
    for c in range(image.shape[2]):
        lut = np.clip(np.rint((levels - xm[c]) / (xs[c] + eps) * rs[c] + rm[c]), 0, 255).astype(np.uint8)
        out[:, :, c] = lut[image[:, :, c]]
    return out


def _blur(x: np.ndarray, dilation: int) -> np.ndarray:
    """Separable [1,2,1]/4 blur with holes (à trous), edge-replicated borders."""
    out = x
    for axis in (0, 1):
        n = out.shape[axis]
        d = min(dilation, max(n - 1, 0))
        if d == 0:
            continue
        pad = [(0, 0)] * out.ndim
        pad[axis] = (d, d)
        p = np.pad(out, pad, mode="edge")
        lo = np.take(p, np.arange(0, n), axis=axis)
        mid = np.take(p, np.arange(d, d + n), axis=axis)
        hi = np.take(p, np.arange(2 * d, 2 * d + n), axis=axis)
        out = 0.25 * lo + 0.5 * mid + 0.25 * hi
    return out


def _low_frequency(x: np.ndarray, levels: int) -> np.ndarray:
    low = x
    for i in range(levels):
        low = _blur(low, 2**i)
    return low


def wavelet(image: np.ndarray, reference: np.ndarray, levels: int = WAVELET_LEVELS) -> np.ndarray:
    """Keep the output's high frequencies, take the low frequencies (colour, tone) from the reference."""
    x = image.astype(np.float32)
    r = reference.astype(np.float32)
    return (x - _low_frequency(x, levels)) + _low_frequency(r, levels)


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
