"""Fast output encoders that release the GIL, so one process can feed a GPU's worth of pixels.

Measured on the development CPU (docs/benchmarks.md, "Host pipeline"): Pillow's PNG encoder at zlib
level 3 managed ≈10 MP/s on a core, its JPEG and WebP encoders hold the GIL (two threads ran no faster
than one). Here:

- PNG (8 and 16 bit): the "Up" filter (one vectorised subtraction per band) and deflate by ISA-L
  (`isal`) for levels 1–3 (its own level 1: its levels 2 and 3 were slower and no smaller on SR
  output), zlib for 4–9 (which trade time for size), the image cut into bands
  that are compressed in parallel threads (the GIL is released while compressing) and joined into one
  zlib stream: each band but the last ends with a sync flush, and the Adler-32 checksums of the bands
  are combined. Lossless, decodes to the same pixels (tests/service/http/test_fastencode.py).
- JPEG and WebP: libjpeg-turbo and libwebp through `imagecodecs` (GIL released), with the settings
  Pillow uses: the same bytes as Pillow's encoders; metadata segments (JPEG) or a VP8X container
  (WebP) added as Pillow writes them.
Without those packages (they are in the `serve` extra) the caller falls back to Pillow.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np

try:  # the `serve` extra installs all three; each is optional here
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover
    _isal = None  # type: ignore[assignment]
try:
    import imagecodecs as _ic
except ImportError:  # pragma: no cover
    _ic = None


def _codec(name: str) -> bool:
    return _ic is not None and bool(getattr(getattr(_ic, name, None), "available", False))


BAND_BYTES = 4 << 20  # filtered bytes per band: large enough that a band's fresh dictionary costs nothing
_BASE = 65521  # Adler-32 modulus
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def have_jpeg() -> bool:
    return _codec("JPEG8")


def have_webp() -> bool:
    return _codec("WEBP")


def adler32_combine(a1: int, a2: int, len2: int) -> int:
    """Adler-32 of A + B from those of A and B (zlib's adler32_combine)."""
    rem = len2 % _BASE
    s1 = ((a1 & 0xFFFF) + (a2 & 0xFFFF) + _BASE - 1) % _BASE
    s2 = (rem * (a1 & 0xFFFF) + (a1 >> 16) + (a2 >> 16) + _BASE - rem) % _BASE
    return s1 | (s2 << 16)


def _filter_up(raw: np.ndarray, y0: int, y1: int) -> np.ndarray:
    """PNG rows y0..y1 of `raw` (H × rowbytes, uint8 view of big-endian samples), "Up" filtered."""
    rows = np.empty((y1 - y0, raw.shape[1] + 1), np.uint8)
    rows[:, 0] = 2
    if y0 == 0:
        rows[0, 1:] = raw[0]  # Up on the first row of the image is the row itself
        np.subtract(raw[1:y1], raw[: y1 - 1], out=rows[1:, 1:])
    else:
        np.subtract(raw[y0:y1], raw[y0 - 1 : y1 - 1], out=rows[:, 1:])
    return rows  # compressed straight from this buffer (no bytes copy)


def _deflate_band(raw: np.ndarray, y0: int, y1: int, level: int, last: bool) -> tuple[bytes, int, int]:
    """(raw deflate data, Adler-32, length) of one band: sync-flushed unless it is the last."""
    data = _filter_up(raw, y0, y1)
    fast = _isal is not None and 1 <= level <= 3
    lib: Any = _isal if fast else zlib
    # ISA-L's own level 1 for 1–3: its levels 2 and 3 were slower and no smaller on SR output
    c = lib.compressobj(1 if fast else level, lib.DEFLATED, -15)
    out = c.compress(data) + c.flush(lib.Z_FINISH if last else lib.Z_SYNC_FLUSH)
    return out, lib.adler32(data), data.nbytes


def _cpu_timed(job: Callable[[], tuple[bytes, int, int]]) -> tuple[tuple[bytes, int, int], float]:
    c0 = time.thread_time()
    return job(), time.thread_time() - c0


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png(
    arr: np.ndarray,
    *,
    level: int = 1,
    icc: bytes | None = None,
    exif: bytes | None = None,
    xmp: bytes | None = None,
    pool: Executor | None = None,
    threads: int = 1,
    on_cpu: Callable[[float], None] | None = None,
) -> bytes:
    """PNG of an HWC array (uint8 or uint16, C = 1..4: gray, gray+alpha, RGB, RGBA; strided views are
    fine). Bands go to `pool` (up to `threads` at once); the calling thread compresses one itself, and
    `on_cpu` gets the CPU seconds the others took."""
    h, w, c = arr.shape
    bits = 16 if arr.dtype == np.uint16 else 8
    if arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG from {arr.dtype} pixels")
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    if bits == 16:
        raw = np.ascontiguousarray(arr, dtype=">u2").view(np.uint8).reshape(h, w * c * 2)
    else:
        raw = arr.reshape(h, w * c)  # a view when rows are contiguous (a crop of a tile): no copy
    rows_per_band = max(1, BAND_BYTES // max(1, raw.shape[1]))
    bounds = [(y, min(h, y + rows_per_band)) for y in range(0, h, rows_per_band)]
    jobs: list[Callable[[], tuple[bytes, int, int]]] = [
        (lambda a=a, b=b, last=(b == h): _deflate_band(raw, a, b, level, last)) for a, b in bounds
    ]
    if pool is not None and threads > 1 and len(jobs) > 1:
        futures = [pool.submit(_cpu_timed, j) for j in jobs[1:]]
        parts = [jobs[0]()]
        for f in futures:
            part, cpu = f.result()
            parts.append(part)
            if on_cpu is not None:
                on_cpu(cpu)
    else:
        parts = [j() for j in jobs]
    adler = parts[0][1]
    for _, a, n in parts[1:]:
        adler = adler32_combine(adler, a, n)
    header = b"\x78\x01" if level <= 1 else b"\x78\x5e" if level <= 5 else b"\x78\x9c"
    stream = b"".join([header, *(p[0] for p in parts), struct.pack(">I", adler)])
    out = [_PNG_SIG, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, colour_type, 0, 0, 0))]
    if icc:
        out.append(_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc)))
    if exif:
        out.append(_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    if xmp:
        out.append(_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp))
    out += [_chunk(b"IDAT", stream), _chunk(b"IEND", b"")]
    return b"".join(out)


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    if len(payload) > 65533:
        raise ValueError("JPEG segment too long")
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def jpeg(
    arr: np.ndarray,
    quality: int,
    *,
    subsampling: str,
    icc: bytes | None = None,
    exif: bytes | None = None,
    xmp: bytes | None = None,
) -> bytes:
    """JPEG of an HWC uint8 array (1 channel: gray, 3: RGB) by libjpeg-turbo with the GIL released: the
    same library and settings as Pillow's encoder, so the same bytes (tests check it)."""
    assert _ic is not None
    pixels = np.ascontiguousarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    sub = None if arr.shape[2] == 1 else subsampling
    data = bytes(_ic.jpeg8_encode(pixels, level=quality, subsampling=sub))
    segments = []
    if exif:
        tagged = exif if exif.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + exif
        segments.append(_jpeg_segment(0xE1, tagged))
    if xmp:
        segments.append(_jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + xmp))
    if icc:
        size = 65519
        parts = [icc[i : i + size] for i in range(0, len(icc), size)]
        for k, p in enumerate(parts, 1):
            segments.append(_jpeg_segment(0xE2, b"ICC_PROFILE\x00" + bytes([k, len(parts)]) + p))
    if not segments:
        return data
    at = 2  # after SOI, and after the APP0 JFIF segment that comes first
    if data[2:4] == b"\xff\xe0":
        at = 4 + struct.unpack(">H", data[4:6])[0]
    return data[:at] + b"".join(segments) + data[at:]


def _riff_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, i = [], 12
    while i + 8 <= len(data):
        kind, n = data[i : i + 4], struct.unpack("<I", data[i + 4 : i + 8])[0]
        out.append((kind, data[i + 8 : i + 8 + n]))
        i += 8 + n + (n & 1)
    return out


def _riff(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) & 1 else b"")


def webp(
    arr: np.ndarray,
    quality: int,
    *,
    method: int,
    icc: bytes | None = None,
    exif: bytes | None = None,
    xmp: bytes | None = None,
) -> bytes:
    """Lossy WebP of an HWC uint8 RGB(A) array by libwebp with the GIL released; ICC/EXIF/XMP go into
    a VP8X container (what Pillow writes for them)."""
    assert _ic is not None
    h, w, c = arr.shape
    data = bytes(_ic.webp_encode(np.ascontiguousarray(arr), level=quality, lossless=False, method=method))
    if not (icc or exif or xmp):
        return data
    chunks = [(k, v) for k, v in _riff_chunks(data) if k != b"VP8X"]
    flags = (0x20 if icc else 0) | (0x10 if c == 4 else 0) | (0x08 if exif else 0) | (0x04 if xmp else 0)
    vp8x = struct.pack("<B3x", flags) + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    body = _riff(b"VP8X", vp8x)
    if icc:
        body += _riff(b"ICCP", icc)
    body += b"".join(_riff(k, v) for k, v in chunks)
    if exif:
        body += _riff(b"EXIF", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif)
    if xmp:
        body += _riff(b"XMP ", xmp)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body
