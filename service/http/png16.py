"""16-bit PNG: Pillow reads only the high byte of 16-bit colour PNGs and cannot write them."""

from __future__ import annotations

import io
import struct
import zlib

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


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def write_png16(arr: np.ndarray, icc: bytes | None = None, level: int = 3) -> bytes:
    """16-bit PNG writer (Pillow cannot write 16-bit colour). arr: HWC uint16, C = 1..4."""
    h, w, c = arr.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = np.ascontiguousarray(arr, dtype=">u2").view(np.uint8).reshape(h, w * c * 2)
    bpp = c * 2
    rows = np.empty((h, 1 + raw.shape[1]), dtype=np.uint8)
    rows[:, 0] = 1  # "Sub" filter: cheap to vectorise, helps zlib on photos
    rows[:, 1 : 1 + bpp] = raw[:, :bpp]
    np.subtract(raw[:, bpp:], raw[:, :-bpp], out=rows[:, 1 + bpp :])  # uint8 wrap-around is the filter
    out = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))]
    if icc:
        out.append(_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc)))
    out.append(_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


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
