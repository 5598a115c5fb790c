"""Image decode and encode for the HTTP layer: what users expect from an image API, done safely.

This module probes and decodes; encoding (merging alpha, gray and 16-bit detail back) is
service/http/imageencode.py, re-exported here so callers use `images.encode` as before.

The request flow is split in two so admission can happen in between (docs/http.md):

1. `probe(data)` opens the image *lazily*: Pillow reads only the header, so format, size, EXIF
   orientation, alpha and bit depth are known without decoding a pixel. Pixel limits are checked
   here (decompression bombs are never decoded).
2. `decode(probe)` decodes, normalises and orients the pixels into what the model sees (HWC uint8 RGB)
   plus what the model does not see (alpha, the sub-8-bit residual of 16-bit images), which
   `encode()` merges back into the model's output.

Decisions (also in docs/http.md):
- Inputs: JPEG, PNG, WebP by default (`image_formats` setting may add other formats Pillow reads
  itself, e.g. AVIF). Anything else is 415; a supported format that fails to parse is 422.
- Animated images (APNG, animated WebP, GIF) are refused with 415: upscaling only the first frame
  would silently drop the animation. Multi-picture JPEGs (MPO: phone photos with a depth map or
  preview) are *not* animations: their primary image is used.
- EXIF orientation is applied (same mapping as `ImageOps.exif_transpose`); EXIF itself is not copied
  to the output (it may hold GPS data and its thumbnail/orientation would be stale). PNG eXIf chunks
  after the image data are ignored (the orientation must be known before decoding).
- ICC profile: validated by LittleCMS and *rebuilt* (colorimetric tags only, `service/http/icc.py`) when
  its colour space matches the output's (RGB or gray), else dropped; client bytes are never copied
  into the output, and no other metadata block (EXIF, XMP, text, comments) is written. CMYK is
  converted to sRGB through its embedded profile (LittleCMS) and tagged sRGB; without a profile
  Pillow's plain conversion is used and the output is untagged.
- Work per byte is bounded before admission (`service/http/imagecheck.py`): data too short for the
  declared image is 422, more than `max_pixels_per_byte` is 413.
- Grayscale in → grayscale out (the model runs on three equal channels, its output is converted back
  to luma), so a gray photo never picks up a colour cast and stays a 1-channel file. WebP has no gray
  mode: it is stored as RGB.
- Palette and 1-bit images become RGB(A); the output is never palette-based.
- Alpha is upscaled separately (bicubic) and merged back. JPEG cannot carry alpha: a transparent
  image asked for as JPEG is flattened onto white.
- 16-bit PNG (gray, RGB, RGBA): the model sees the image rounded to 8 bits; a 16-bit PNG output gets
  the model's result × 257 plus the bicubic-upscaled rounding residual of the input, so smooth
  gradients keep their 16-bit precision. JPEG/WebP outputs are 8-bit. (16-bit gray+alpha PNGs are
  read at 8-bit precision: Pillow exposes no way to get their low bytes.)
"""

from __future__ import annotations

import functools
import io
import logging
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from service.errors import ImageTooLarge, UndecodableImage, UnsupportedMediaType
from service.http import icc as icc_profiles
from service.http.imagecheck import check_work
from service.http.imageencode import CONTENT_TYPES as CONTENT_TYPES  # re-exported: the HTTP layer's API
from service.http.imageencode import MAX_SIDE as MAX_SIDE
from service.http.imageencode import OUTPUT_FORMATS as OUTPUT_FORMATS
from service.http.imageencode import Decoded as Decoded
from service.http.imageencode import OutputFormat as OutputFormat
from service.http.imageencode import check_output_format as check_output_format
from service.http.imageencode import check_output_size as check_output_size
from service.http.imageencode import crop as crop
from service.http.imageencode import encode as encode
from service.http.imageencode import output_formats as output_formats
from service.http.imageencode import resize_float as resize_float
from service.http.png16 import low_bytes
from service.http.png16 import read_png16 as read_png16  # re-exported: tests and tools
from service.http.png16 import write_png16 as write_png16

log = logging.getLogger(__name__)

# Input format → output format when the request names none.
_DEFAULT_OUTPUT: dict[str, OutputFormat] = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}
# Flat graphics compress far beyond photos: for these formats the structure checks (check_work) bound
# the work of a decode, and the pixel limit its size, so pixels per byte sent is not asked of them.
LOSSLESS_FORMATS = ("PNG", "GIF", "BMP")
_GRAY_MODES = {"1", "L", "LA", "La", "I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, TypeError)

# EXIF orientation → numpy equivalent of the Image.Transpose that ImageOps.exif_transpose applies.
_ORIENT = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.swapaxes(0, 1),  # TRANSPOSE
    6: lambda a: np.rot90(a, -1),  # ROTATE_270 (clockwise 90)
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),  # ROTATE_90
}

_pillow_limit: int | None = None


def configure_pillow(max_input_pixels: int) -> None:
    """Make Pillow's own bomb guard an error at (at least) our limit.

    `Image.MAX_IMAGE_PIXELS` is process-wide; with several apps in one process (tests) it is the
    largest limit seen, and `probe` enforces each app's own limit exactly.
    """
    global _pillow_limit
    _pillow_limit = max(_pillow_limit or 0, max_input_pixels)
    Image.MAX_IMAGE_PIXELS = _pillow_limit
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def sniff_format(data: bytes) -> str | None:
    """Best guess of a file's format from its magic bytes, for precise 415/422 messages only."""
    head = data[:32]
    table = [
        (b"\x89PNG\r\n\x1a\n", "PNG"),
        (b"\xff\xd8\xff", "JPEG"),
        (b"GIF87a", "GIF"),
        (b"GIF89a", "GIF"),
        (b"BM", "BMP"),
        (b"II*\x00", "TIFF"),
        (b"MM\x00*", "TIFF"),
        (b"8BPS", "PSD"),
        (b"qoif", "QOI"),
        (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
        (b"\xff\x4f\xff\x51", "JPEG2000"),
        (b"%PDF", "PDF"),
    ]
    for magic, name in table:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"mif1", b"msf1"):
            return "HEIF"
    if head.lstrip()[:5].lower() in (b"<?xml", b"<svg "):
        return "SVG"
    return None


@dataclass
class Probe:
    """An image opened from its header only (no pixels decoded yet)."""

    image: Image.Image
    data: bytes
    format: str  # Pillow format id: JPEG, MPO, PNG, WEBP, ...
    width: int  # after EXIF orientation
    height: int
    orientation: int
    has_alpha: bool
    gray: bool
    bits: int  # 8 or 16: precision available for a PNG output

    @property
    def default_output(self) -> OutputFormat:
        return _DEFAULT_OUTPUT.get(self.format, "png")

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def close(self) -> None:
        self.image.close()


def _tile_rawmode(im: Image.Image) -> str:
    if not im.tile:
        return ""
    args = im.tile[0].args
    return args if isinstance(args, str) else str(args[0]) if isinstance(args, tuple) and args else ""


def _orientation(im: Image.Image) -> int:
    """EXIF orientation from the header (never triggers a decode, unlike PngImageFile.getexif)."""
    raw = im.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = int(exif.get(0x0112, 1))
    except Exception:  # malformed EXIF is common in the wild: ignore it, do not fail the request
        return 1
    return value if value in _ORIENT else 1


def probe(data: bytes, formats: list[str], max_pixels: int, max_pixels_per_byte: float = 0.0) -> Probe:
    """Open the header, identify, check the pixel limit and the work per byte. Raises 415 / 413 / 422."""
    allowed = list(formats)
    try:
        im = Image.open(io.BytesIO(data), formats=allowed)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"image is larger than the limit of {max_pixels} pixels") from e
    except UnidentifiedImageError as e:
        sniffed = sniff_format(data)
        if sniffed and (sniffed in allowed or (sniffed == "MPO" and "JPEG" in allowed)):
            raise UndecodableImage(f"the {sniffed} header is corrupt or truncated") from e
        names = ", ".join(f.upper() for f in allowed)
        if sniffed:
            raise UnsupportedMediaType(f"{sniffed} images are not accepted; send {names}") from e
        raise UnsupportedMediaType(f"not a recognised image; send {names}") from e
    except _DECODE_ERRORS as e:
        raise UndecodableImage(f"the image header cannot be read: {e}") from e
    try:
        w, h = im.size
        if w < 1 or h < 1:
            raise UndecodableImage("the image has no pixels")
        if w * h > max_pixels:
            raise ImageTooLarge(f"image is {w}×{h} = {w * h} pixels; the limit is {max_pixels}")
        fmt = im.format or "?"
        lossless = fmt in LOSSLESS_FORMATS or (fmt == "WEBP" and data[12:16] == b"VP8L")
        check_work(data, fmt, w * h, 0.0 if lossless else max_pixels_per_byte)
        if fmt != "MPO" and (getattr(im, "is_animated", False) or getattr(im, "n_frames", 1) > 1):
            raise UnsupportedMediaType("animated images are not supported; send a single frame")
        mode, rawmode = im.mode, _tile_rawmode(im)
        orientation = _orientation(im)
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        has_alpha = mode in _ALPHA_MODES or "transparency" in im.info
        gray = mode in _GRAY_MODES or rawmode == "LA;16B"
        bits = 16 if mode.startswith("I;16") or (fmt == "PNG" and rawmode in ("RGB;16B", "RGBA;16B")) else 8
        return Probe(im, data, fmt, w, h, orientation, has_alpha, gray, bits)
    except BaseException:
        im.close()
        raise


def _icc_space(icc: bytes | None) -> bytes | None:
    return icc[16:20] if icc and len(icc) >= 128 else None


@functools.cache
def _srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None) -> tuple[Image.Image, bytes | None]:
    """CMYK through its ICC profile when it has one (accurate), else Pillow's naive formula."""
    if icc and _icc_space(icc) == b"CMYK":
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if out is not None:
                return out, _srgb_icc()
        except (ImageCms.PyCMSError, OSError, ValueError) as e:
            log.info("CMYK ICC conversion failed, using plain conversion: %s", e)
    return im.convert("RGB"), None


def decode(p: Probe) -> Decoded:
    """Decode, normalise and orient (blocking: run in the image thread pool). Raises 422 / 415."""
    im = p.image
    try:
        im.load()
        info = dict(im.info)
        icc = im.info.get("icc_profile") or None
        mode = im.mode
        alpha: np.ndarray | None = None
        colour: np.ndarray
        if mode.startswith("I;16"):
            colour = np.asarray(im).astype(np.uint16)[..., None]
        elif p.bits == 16:  # RGB / RGBA 16-bit PNG
            hi = np.asarray(im)
            try:
                lo = low_bytes(p.data)
            except _DECODE_ERRORS as e:  # never worse than Pillow's own 8-bit reading
                log.warning("16-bit PNG low bytes unreadable, using 8 bits: %s", e)
                lo = np.zeros_like(hi)
            v = (hi.astype(np.uint16) << 8) | lo.astype(np.uint16)
            colour, alpha = (v[..., :3], v[..., 3]) if v.shape[2] == 4 else (v, None)
        else:
            if mode == "CMYK":
                im2, icc = _cmyk_to_rgb(im, icc)
            elif mode in ("I", "F"):
                raise UnsupportedMediaType(
                    f"{mode} (32-bit) pixels are not supported; send 8- or 16-bit images"
                )
            elif p.gray and mode in ("RGBA", "LA", "La", "1", "L"):
                im2 = im.convert("LA" if p.has_alpha else "L")
            else:
                im2 = im.convert("RGBA" if p.has_alpha else "RGB")
            arr = np.asarray(im2)
            if arr.ndim == 2:
                arr = arr[..., None]
            if p.has_alpha:
                colour, alpha = arr[..., :-1], arr[..., -1]
            else:
                colour = arr
    except (UnsupportedMediaType, UndecodableImage):
        raise
    except MemoryError as e:
        raise ImageTooLarge("not enough memory to decode this image") from e
    except _DECODE_ERRORS as e:
        raise UndecodableImage(f"the {p.format} image data is truncated or corrupt: {e}") from e
    finally:
        im.close()

    residual = None
    if colour.dtype == np.uint16:
        c8 = ((colour.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        residual = colour.astype(np.float32) - c8.astype(np.float32) * 257.0
        colour = c8
    orient = _ORIENT.get(p.orientation)
    if orient is not None:
        colour = orient(colour)
        alpha = orient(alpha) if alpha is not None else None
        residual = orient(residual) if residual is not None else None
    gray = colour.shape[2] == 1
    rgb = np.ascontiguousarray(np.repeat(colour, 3, axis=2) if gray else colour)
    if rgb.shape[:2] != (p.height, p.width):
        raise UndecodableImage(f"decoded size {rgb.shape[1]}×{rgb.shape[0]} differs from the header")
    icc_out = icc_profiles.sanitize(icc, b"GRAY" if gray else b"RGB ")
    xmp = info.get("xmp") or info.get("XML:com.adobe.xmp")
    return Decoded(
        exif=info.get("exif") if isinstance(info.get("exif"), bytes) else None,
        xmp=xmp.encode() if isinstance(xmp, str) else xmp if isinstance(xmp, bytes) else None,
        rgb=rgb,
        alpha=None if alpha is None else np.ascontiguousarray(alpha),
        residual=None if residual is None else np.ascontiguousarray(residual),
        gray=gray,
        bits=p.bits,
        icc_profile=icc_out,
        source_format=p.format,
    )
