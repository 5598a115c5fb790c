"""Colour fix: AdaIN matches the reference's per-channel statistics; wavelet keeps the output's detail
and takes tone from the reference."""

from __future__ import annotations

import numpy as np
import pytest

from service.pixels.colorfix import _low_frequency, adain, apply_color_fix


def test_adain_matches_reference_statistics(photos) -> None:
    img = photos["astronaut"][:400, :512]
    ref = photos["coffee"][:400, :512]
    out = adain(img, ref)
    assert out.dtype == np.uint8 and out.shape == img.shape
    # a per-channel affine tone change (no clipping) is undone exactly, up to rounding
    toned = np.rint(img.astype(np.float64) * [0.7, 0.9, 0.8] + [40, 10, 25]).astype(np.uint8)
    assert np.abs(adain(img, toned).astype(int) - toned.astype(int)).max() <= 1
    # exact against the float formula it replaces (the lookup table is the same affine map)
    x, r = img.astype(np.float64), ref.astype(np.float64)
    want = (x - x.mean((0, 1))) / (x.std((0, 1)) + 1e-5) * r.std((0, 1)) + r.mean((0, 1))
    assert np.abs(out.astype(np.float64) - np.clip(np.rint(want), 0, 255)).max() == 0


def test_wavelet_takes_tone_from_reference_and_detail_from_output(photos) -> None:
    ref = photos["chelsea"]
    shifted = np.clip(ref.astype(int) + 40, 0, 255).astype(np.uint8)  # a tone shift, same detail
    out = apply_color_fix(shifted, ref, "wavelet")
    assert np.abs(out.astype(float).mean() - ref.mean()) < 2.0
    hi = lambda a: a.astype(np.float32) - _low_frequency(a.astype(np.float32), 5)  # noqa: E731
    assert np.corrcoef(hi(out).ravel(), hi(shifted).ravel())[0, 1] > 0.95


def test_none_is_identity_and_errors_are_clear(photos) -> None:
    img = photos["rocket"]
    assert apply_color_fix(img, img, "none") is img
    with pytest.raises(ValueError, match="equal shapes"):
        apply_color_fix(img, img[:10], "adain")
    with pytest.raises(ValueError, match="unknown colour fix"):
        apply_color_fix(img, img, "sepia")
