"""16-bit PNG: Pillow reads only the high byte of 16-bit colour PNGs and cannot write them (the writer
is service/http/fastencode.py, the same as 8-bit PNG outputs)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def low_bytes(data: bytes) -> np.ndarray:
    """Low bytes of a 16-bit RGB(A) PNG.

    Pillow keeps only the high byte of 16-bit colour PNGs. Decoding the same file again with the
    little-endian raw mode (same 48/64 bits per pixel, so PNG un-filtering is identical) makes its
    unpacker pick the other byte of each sample.
    """
    im = Image.open(io.BytesIO(data), formats=["PNG"])
    try:
        im.tile = [t._replace(args=t.args.replace(";16B", ";16L")) for t in im.tile]
        im.load()
        return np.asarray(im)
    finally:
        im.close()


def write_png16(arr: np.ndarray, icc: bytes | None = None, level: int = 3) -> bytes:
    """16-bit PNG writer (Pillow cannot write 16-bit colour). arr: HWC uint16, C = 1..4."""
    from service.http.fastencode import png

    return png(np.asarray(arr, dtype=np.uint16), level=level, icc=icc)


def read_png16(data: bytes) -> np.ndarray:
    """Full-precision HWC uint16 pixels of a 16-bit PNG (tests and tools; see `low_bytes`)."""
    im = Image.open(io.BytesIO(data), formats=["PNG"])
    if im.mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)[..., None]
    hi = np.asarray(im)
    im.close()
    lo = low_bytes(data)
    if hi.ndim == 2:
        hi, lo = hi[..., None], lo[..., None]
    return (hi.astype(np.uint16) << 8) | lo.astype(np.uint16)
