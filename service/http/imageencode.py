"""Image encode for the HTTP layer: the model's RGB output merged back with what it did not see.

The decisions (alpha bicubic and merged back, JPEG flattened onto white, gray out for gray in, 16-bit
PNG from the model's 8-bit result plus the input's rounding residual, the rebuilt ICC profile only)
are listed in service/http/images.py and docs/http.md.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image

from service.errors import ImageTooLarge, UnsupportedMediaType
from service.http.png16 import write_png16

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


def _resize_alpha(alpha: np.ndarray, height: int, width: int) -> np.ndarray:
    """Alpha in [0, 1] at the output size (bicubic, clamped)."""
    if alpha.dtype == np.uint8:
        out = np.asarray(Image.fromarray(alpha).resize((width, height), Image.Resampling.BICUBIC))
        return out.astype(np.float32) / 255.0
    return np.clip(resize_float(alpha.astype(np.float32) / 65535.0, height, width), 0.0, 1.0)


def encode(
    out_rgb: np.ndarray, src: Decoded, fmt: str, quality: int, png_level: int = 3, metadata: str = "strip"
) -> bytes:
    """Merge the model's RGB output with the source's alpha / gray / 16-bit detail and encode."""
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"unknown output format {fmt!r}")
    h, w = out_rgb.shape[:2]
    if src.gray:
        colour = np.asarray(Image.fromarray(out_rgb).convert("L"))[..., None]
    else:
        colour = out_rgb
    alpha = _resize_alpha(src.alpha, h, w) if src.alpha is not None else None
    icc = src.icc_profile if not (src.gray and fmt == "webp") else None

    if fmt == "png" and src.bits == 16:
        c = colour.astype(np.float32) * 257.0
        if src.residual is not None:
            c += resize_float(src.residual, h, w).reshape(c.shape)
        planes = [np.clip(np.rint(c), 0, 65535).astype(np.uint16)]
        if alpha is not None:
            planes.append(np.rint(alpha * 65535.0).astype(np.uint16)[..., None])
        return write_png16(np.concatenate(planes, axis=2), icc, png_level)

    if alpha is not None and fmt == "jpeg":  # JPEG has no alpha: flatten onto white
        a = alpha[..., None]
        colour = np.clip(np.rint(colour.astype(np.float32) * a + 255.0 * (1.0 - a)), 0, 255).astype(np.uint8)
        alpha = None
    if alpha is not None:
        a8 = np.rint(alpha * 255.0).astype(np.uint8)[..., None]
        arr = np.concatenate([colour, a8], axis=2)
    else:
        arr = colour[..., 0] if src.gray else colour
    im = Image.fromarray(np.ascontiguousarray(arr))  # L, LA, RGB or RGBA from the shape
    buf = io.BytesIO()
    extra: dict[str, object] = {"icc_profile": icc} if icc else {}
    if metadata != "strip":
        if src.exif:
            extra["exif"] = kept_exif(src.exif, metadata == "keep_all")
        if src.xmp:
            extra["xmp"] = src.xmp
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=png_level, **extra)
    elif fmt == "jpeg":
        # 4:4:4 chroma at high quality: super-resolved detail is what the client paid for.
        im.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, **extra)
    elif fmt == "webp":
        # method 2: ~2.5x faster than Pillow's default 4 for about the same size at q 90.
        im.save(buf, format="WEBP", quality=quality, method=2, **extra)
    else:
        im.save(buf, format="AVIF", quality=quality, speed=8, **extra)
    return buf.getvalue()
