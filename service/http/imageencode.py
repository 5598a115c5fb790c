"""Image encode for the HTTP layer: the model's RGB output merged back with what it did not see.

The decisions (alpha bicubic and merged back, JPEG flattened onto white, gray out for gray in, 16-bit
PNG from the model's 8-bit result plus the input's rounding residual, the rebuilt ICC profile only)
are listed in service/http/images.py and docs/http.md.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image

from service.errors import ImageTooLarge, UnsupportedMediaType
from service.http import fastencode

OutputFormat = Literal["png", "jpeg", "webp", "avif"]
CONTENT_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "avif": "image/avif",
}
# Largest side each output format can store (AVIF: the AV1 level limits of libavif's encoders).
MAX_SIDE: dict[str, int] = {"png": 2**31 - 1, "jpeg": 65_535, "webp": 16_383, "avif": 16_384}
EXIF_GPS_IFD, EXIF_IFD, MAKER_NOTE, ORIENTATION = 0x8825, 0x8769, 0x927C, 0x0112


@functools.cache
def output_formats() -> tuple[OutputFormat, ...]:
    """What this server writes: AVIF only where the installed Pillow has an AVIF encoder."""
    Image.init()
    return ("png", "jpeg", "webp", *(("avif",) if "AVIF" in Image.SAVE else ()))


OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("png", "jpeg", "webp")  # always available


@dataclass
class Decoded:
    """Pixels ready for the model plus what the model does not see."""

    rgb: np.ndarray  # HWC uint8 RGB — exactly what the runtime gets
    alpha: np.ndarray | None  # HW uint8 or uint16, oriented
    residual: (
        np.ndarray | None
    )  # HWC float32 (C = 1 gray / 3 colour): 16-bit input − 257 × its 8-bit rounding
    gray: bool
    bits: int
    icc_profile: bytes | None  # matches the output colour space, else None
    source_format: str
    exif: bytes | None = None  # the input's EXIF and XMP, for metadata=keep (never interpreted further)
    xmp: bytes | None = None


def crop(d: Decoded, box: tuple[int, int, int, int]) -> Decoded:
    """The (top, left, height, width) part of a decoded image: colour, alpha and 16-bit detail alike."""
    y, x, h, w = box

    def cut(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a[y : y + h, x : x + w])

    return replace(d, rgb=cut(d.rgb), alpha=cut(d.alpha), residual=cut(d.residual))


def kept_exif(raw: bytes, keep_all: bool) -> bytes:
    """The input's EXIF for the output: orientation reset (the pixels are already turned), GPS and maker
    notes dropped unless `keep_all` (where a photo was taken is not the upscaler's to pass on)."""
    exif = Image.Exif()
    exif.load(raw)
    exif[ORIENTATION] = 1
    if not keep_all:
        exif.pop(EXIF_GPS_IFD, None)
        sub = exif.get_ifd(EXIF_IFD)
        sub.pop(MAKER_NOTE, None)
    return exif.tobytes()


def check_output_format(fmt: str, height: int, width: int) -> None:
    """The format is one this server writes, and the size fits it (415 / 413)."""
    if fmt not in output_formats():
        raise UnsupportedMediaType(f"this server cannot write {fmt}; it writes {', '.join(output_formats())}")
    check_output_size(fmt, height, width)


def check_output_size(fmt: str, height: int, width: int) -> None:
    limit = MAX_SIDE[fmt]
    if max(height, width) > limit:
        raise ImageTooLarge(
            f"{fmt} images can be at most {limit} pixels per side; asked for {width}×{height}"
        )


def resize_float(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of an HW or HWC float32 array, channel by channel (Pillow mode F)."""
    planes = [a] if a.ndim == 2 else [a[..., i] for i in range(a.shape[2])]
    out = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(pl, dtype=np.float32)).resize(
                (width, height), Image.Resampling.BICUBIC
            )
        )
        for pl in planes
    ]
    return out[0] if a.ndim == 2 else np.stack(out, axis=2)


def _resize_alpha8(alpha: np.ndarray, height: int, width: int) -> np.ndarray:
    """8-bit alpha at the output size (bicubic, as Pillow resizes it)."""
    return np.asarray(Image.fromarray(alpha).resize((width, height), Image.Resampling.BICUBIC))


def _resize_alpha16(alpha: np.ndarray, height: int, width: int) -> np.ndarray:
    """16-bit alpha at the output size (bicubic on floats, clamped)."""
    a = resize_float(alpha.astype(np.float32), height, width)
    return np.clip(np.rint(a), 0, 65535).astype(np.uint16)


def _alpha8(src: Decoded, height: int, width: int) -> np.ndarray:
    assert src.alpha is not None
    if src.alpha.dtype == np.uint8:
        return _resize_alpha8(src.alpha, height, width)
    a16 = _resize_alpha16(src.alpha, height, width)
    return ((a16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _flatten_on_white(colour: np.ndarray, a8: np.ndarray) -> np.ndarray:
    """colour·α + 255·(1 − α) in integers (exact: a sum over 255 is never a tie)."""
    a = a8[..., None].astype(np.uint16)
    mixed = colour * a  # uint16: 255 · 255 fits
    mixed += (255 - a) * 255
    mixed += 127
    return (mixed // 255).astype(np.uint8)


#: WebP effort (0 fastest … 6 smallest). Measured on a Real-ESRGAN output at q90: method 0 takes ≈ 40 %
#: less CPU than 2 (the former setting) for files ≈ 15 % larger at the same PSNR (43.3 vs 43.0 dB; q75:
#: 39.7 vs 39.6): the quality asked for is kept, the CPU a GPU pod needs for WebP falls below 6 cores.
WEBP_METHOD = 0


def encode(
    out_rgb: np.ndarray,
    src: Decoded,
    fmt: str,
    quality: int,
    png_level: int = 3,
    metadata: str = "strip",
    pool: Executor | None = None,
    threads: int = 1,
    on_cpu: Callable[[float], None] | None = None,
) -> bytes:
    """Merge the model's RGB output with the source's alpha / gray / 16-bit detail and encode.

    `pool`, `threads`: where and how widely a PNG's bands are compressed in parallel; `on_cpu` gets the
    CPU seconds of the bands that ran on other threads."""
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"unknown output format {fmt!r}")
    h, w = out_rgb.shape[:2]
    if src.gray:
        colour = np.asarray(Image.fromarray(np.ascontiguousarray(out_rgb)).convert("L"))[..., None]
    else:
        colour = out_rgb
    icc = src.icc_profile if not (src.gray and fmt == "webp") else None
    exif = xmp = None
    if metadata != "strip":
        exif = kept_exif(src.exif, metadata == "keep_all") if src.exif else None
        xmp = src.xmp

    if fmt == "png" and src.bits == 16:
        c = colour.astype(np.float32) * 257.0
        if src.residual is not None:
            c += resize_float(src.residual, h, w).reshape(c.shape)
        arr16 = np.empty((h, w, colour.shape[2] + (src.alpha is not None)), np.uint16)
        np.clip(np.rint(c), 0, 65535, out=c)
        arr16[..., : colour.shape[2]] = c
        if src.alpha is not None:
            a = src.alpha
            arr16[..., -1] = _resize_alpha16(a.astype(np.uint16) * 257 if a.dtype == np.uint8 else a, h, w)
        return fastencode.png(
            arr16, level=png_level, icc=icc, exif=exif, xmp=xmp, pool=pool, threads=threads, on_cpu=on_cpu
        )

    a8 = _alpha8(src, h, w) if src.alpha is not None else None
    if a8 is not None and fmt == "jpeg":  # JPEG has no alpha: flatten onto white
        colour, a8 = _flatten_on_white(colour, a8), None
    if a8 is not None:
        arr = np.empty((h, w, colour.shape[2] + 1), np.uint8)
        arr[..., :-1] = colour
        arr[..., -1] = a8
    else:
        arr = colour
    if fmt == "png":
        return fastencode.png(
            arr, level=png_level, icc=icc, exif=exif, xmp=xmp, pool=pool, threads=threads, on_cpu=on_cpu
        )
    # 4:4:4 chroma at high quality: super-resolved detail is what the client paid for.
    if fmt == "jpeg" and fastencode.have_jpeg():
        sub = "444" if quality >= 90 else "420"
        return fastencode.jpeg(arr, quality, subsampling=sub, icc=icc, exif=exif, xmp=xmp)
    if fmt == "webp" and fastencode.have_webp() and arr.shape[2] in (3, 4):
        return fastencode.webp(arr, quality, method=WEBP_METHOD, icc=icc, exif=exif, xmp=xmp)
    return _pillow_encode(arr, fmt, quality, icc, exif, xmp)


def _pillow_encode(
    arr: np.ndarray, fmt: str, quality: int, icc: bytes | None, exif: bytes | None, xmp: bytes | None
) -> bytes:
    """Pillow's encoders (they hold the GIL): AVIF, and JPEG/WebP where the fast libraries are absent."""
    im = Image.fromarray(np.ascontiguousarray(arr[..., 0] if arr.shape[2] == 1 else arr))
    buf = io.BytesIO()
    extra: dict[str, object] = {"icc_profile": icc} if icc else {}
    if exif:
        extra["exif"] = exif
    if xmp:
        extra["xmp"] = xmp
    if fmt == "jpeg":
        im.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, **extra)
    elif fmt == "webp":
        im.save(buf, format="WEBP", quality=quality, method=WEBP_METHOD, **extra)
    else:
        im.save(buf, format="AVIF", quality=quality, speed=8, **extra)
    return buf.getvalue()
