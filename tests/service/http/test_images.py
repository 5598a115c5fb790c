"""service/http/images.py on real photos: header probe, limits, normalisation, orientation, 16-bit, encode."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest
from http_helpers import decode, encode, photo, same_colour, small
from PIL import Image, ImageOps

from service.errors import ImageTooLarge, UndecodableImage, UnsupportedMediaType
from service.http import images
from service.pixels.imageops import resize_rgb

FORMATS = ["JPEG", "PNG", "WEBP"]
LIMIT = 4_000_000


def run(
    data: bytes, scale: int = 2, fmt: str | None = None, quality: int = 90
) -> tuple[images.Decoded, bytes]:
    """probe → decode → bicubic 'model' → encode, like the HTTP handler does."""
    p = images.probe(data, FORMATS, LIMIT)
    d = images.decode(p)
    out = resize_rgb(d.rgb, p.height * scale, p.width * scale)
    return d, images.encode(out, d, fmt or p.default_output, quality)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width×height but carries almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def test_probe_reads_header_only_and_reports_facts() -> None:
    data = encode(small("chelsea.png", 120))
    p = images.probe(data, FORMATS, LIMIT)
    assert (p.format, p.width, p.height, p.has_alpha, p.gray, p.bits) == ("PNG", 120, 80, False, False, 8)
    assert p.image.tile  # nothing decoded yet: Pillow still holds the undecoded tiles
    assert p.default_output == "png"
    p.close()


@pytest.mark.parametrize("size", [(100_000, 100_000), (2100, 2000)])
def test_decompression_bomb_is_413_from_the_header(size: tuple[int, int]) -> None:
    # (100000)² trips Pillow's DecompressionBombError; 2100×2000 only our own limit.
    with pytest.raises(ImageTooLarge):
        images.probe(bomb_png(*size), FORMATS, LIMIT)


def test_pillow_bomb_warning_is_an_error() -> None:
    images.configure_pillow(1_000_000)
    assert Image.MAX_IMAGE_PIXELS >= 1_000_000  # the largest limit configured in this process
    side = math.isqrt(int(Image.MAX_IMAGE_PIXELS * 1.5))  # between 1x and 2x: Pillow only *warns*
    with pytest.raises(ImageTooLarge):
        images.probe(bomb_png(side, side), FORMATS, 10**12)  # our limit is high: Pillow's guard must fire


def test_truncated_jpeg_is_422() -> None:
    data = encode(photo("astronaut.png").convert("RGB"), "JPEG", quality=90)
    p = images.probe(data[: len(data) * 2 // 3], FORMATS, LIMIT)  # header intact
    with pytest.raises(UndecodableImage):
        images.decode(p)


def test_corrupt_png_header_is_422_and_garbage_or_gif_is_415() -> None:
    png = encode(small("coffee.png", 64))
    with pytest.raises(UndecodableImage):
        images.probe(png[:20], FORMATS, LIMIT)
    with pytest.raises(UnsupportedMediaType, match="not a recognised image"):
        images.probe(b"hello world, not an image" * 10, FORMATS, LIMIT)
    gif = encode(small("coffee.png", 64), "GIF")
    with pytest.raises(UnsupportedMediaType, match="GIF"):
        images.probe(gif, FORMATS, LIMIT)
    assert images.probe(gif, [*FORMATS, "GIF"], LIMIT).format == "GIF"  # enabled by settings


def test_animated_png_and_webp_are_415() -> None:
    a, b = small("coffee.png", 64), small("chelsea.png", 64).resize((64, 43))
    for fmt in ("PNG", "WEBP"):
        buf = io.BytesIO()
        a.save(buf, format=fmt, save_all=True, append_images=[b.resize(a.size)])
        with pytest.raises(UnsupportedMediaType, match="animated"):
            images.probe(buf.getvalue(), FORMATS, LIMIT)


def test_mpo_phone_photo_uses_the_primary_image() -> None:
    a, b = small("astronaut.png", 96), small("coffee.png", 96)
    buf = io.BytesIO()
    a.save(buf, format="MPO", save_all=True, append_images=[b], quality=95)
    d, out = run(buf.getvalue())
    assert d.rgb.shape == (96, 96, 3)
    assert np.abs(d.rgb.astype(int) - np.asarray(a).astype(int)).mean() < 6
    assert decode(out).format == "JPEG"


def test_rgba_png_alpha_upscaled_separately_and_merged() -> None:
    src = photo("horse.png")  # real RGBA
    src = src.resize((src.width // 4, src.height // 4), Image.Resampling.BICUBIC)
    d, out = run(encode(src))
    assert d.alpha is not None and d.rgb.shape[2] == 3
    im = decode(out)
    assert im.mode == "RGBA" and im.size == (src.width * 2, src.height * 2)
    want = np.asarray(src.getchannel("A").resize(im.size, Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(np.asarray(im.getchannel("A")).astype(int) - want).max() <= 1
    # WebP keeps alpha too; JPEG flattens it onto white.
    assert decode(run(encode(src), fmt="webp")[1]).mode == "RGBA"
    jpg = decode(run(encode(src), fmt="jpeg")[1])
    assert jpg.mode == "RGB"
    transparent = np.asarray(im.getchannel("A")) == 0
    if transparent.any():
        assert np.asarray(jpg)[transparent].mean() > 240


def test_cmyk_jpeg_is_normalised_to_rgb() -> None:
    rgb = small("coffee.png", 128)
    data = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    p = images.probe(data, FORMATS, LIMIT)
    assert p.image.mode == "CMYK"
    d, out = run(data)
    assert d.rgb.shape == (85, 128, 3) and not d.gray
    assert np.abs(d.rgb.astype(int) - np.asarray(rgb).astype(int)).mean() < 6
    assert decode(out).mode == "RGB"


def test_grayscale_stays_grayscale_and_palette_becomes_rgb() -> None:
    d, out = run(encode(small("camera.png", 96)))
    assert d.gray and (d.rgb[..., 0] == d.rgb[..., 2]).all()
    assert decode(out).mode == "L"
    pal = small("astronaut.png", 64).convert("P", palette=Image.Palette.ADAPTIVE)
    d, out = run(encode(pal))
    assert not d.gray and decode(out).mode == "RGB"


def test_icc_profile_kept_in_every_output_format() -> None:
    src = small("astronaut.png", 64)
    icc = src.info["icc_profile"]
    for fmt in ("png", "jpeg", "webp"):
        _, out = run(encode(src), fmt=fmt)
        assert same_colour(decode(out).info.get("icc_profile"), icc), fmt


# EXIF orientation → the transpose that *stores* an upright photo so that orientation undoes it.
_STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_like_pillow(orientation: int) -> None:
    upright = small("chelsea.png", 90)  # 90×60: a rotation swaps the sides
    stored = upright.transpose(_STORE[orientation]) if orientation in _STORE else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif.tobytes())
    p = images.probe(data, FORMATS, LIMIT)
    assert (p.width, p.height, p.orientation) == (90, 60, orientation)
    d = images.decode(p)
    reference = ImageOps.exif_transpose(decode(data))
    assert np.array_equal(d.rgb, np.asarray(reference.convert("RGB")))
    assert np.array_equal(d.rgb, np.asarray(upright))


def test_exif_rotated_jpeg_photo() -> None:
    upright = small("astronaut.png", 120).crop((0, 0, 120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # camera held upright: pixels stored rotated, tag says rotate 90° clockwise
    data = encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    d, out = run(data)
    assert d.rgb.shape == (80, 120, 3)
    assert np.abs(d.rgb.astype(int) - np.asarray(upright).astype(int)).mean() < 4
    res = decode(out)
    assert res.size == (240, 160) and res.getexif().get(0x0112) is None  # EXIF not copied


def _photo16(h: int, w: int, channels: int) -> np.ndarray:
    """A real photo at 16 bits: left half textured photo, right half a smooth sub-8-bit ramp (a sky)."""
    base = np.asarray(small("coffee.png", w).resize((w, h)).convert("RGB")).astype(np.float64) * 257
    ramp = 30000 + np.linspace(0, 600, w - w // 2)[None, :, None] + np.linspace(0, 300, h)[:, None, None]
    base[:, w // 2 :] = ramp  # about 2 steps of 8-bit across the whole ramp: pure banding at 8 bits
    out = np.clip(base, 0, 65535).astype(np.uint16)
    return out[..., :1] if channels == 1 else out


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16bit_png_in_gives_16bit_png_out(channels: int) -> None:
    h, w = 40, 80
    arr = _photo16(h, w, 3 if channels == 4 else channels)
    if channels == 4:
        alpha = np.tile(np.linspace(0, 65535, w, dtype=np.float64)[None, :], (h, 1)).astype(np.uint16)
        arr = np.concatenate([arr, alpha[..., None]], axis=2)
    data = images.write_png16(arr)
    assert np.array_equal(images.read_png16(data), arr)  # writer and full-precision reader agree
    p = images.probe(data, FORMATS, LIMIT)
    assert p.bits == 16 and p.gray == (channels == 1) and p.has_alpha == (channels == 4)
    d, out = run(data, scale=2)
    # What the model sees: the image rounded to 8 bits.
    colour = arr[..., : 1 if channels == 1 else 3].astype(np.float64)
    assert d.bits == 16 and d.residual is not None
    assert np.abs(d.rgb[..., : colour.shape[2]].astype(np.float64) * 257 - colour).max() <= 129
    got = images.read_png16(out)
    assert got.shape == (2 * h, 2 * w, channels)
    want = images.resize_float(colour.astype(np.float32), 2 * h, 2 * w).reshape(2 * h, 2 * w, -1)
    err = np.abs(got[..., : colour.shape[2]].astype(np.float64) - want)
    sky = err[4:-4, w + 4 : -4]  # the smooth half, away from borders
    # 16-bit gradations survive (8 bits would band by up to 128); the model's own 8-bit rounding
    # only shows where its input steps from one 8-bit level to the next.
    assert np.median(sky) < 2 and sky.mean() < 10, (np.median(sky), sky.mean())
    naive = np.abs(images.read_png16(out)[..., : colour.shape[2]] // 257 * 257 - want)[4:-4, w + 4 : -4]
    assert naive.mean() > 4 * sky.mean()
    if channels == 4:
        a = got[..., 3].astype(np.float64)
        want_a = np.clip(images.resize_float(arr[..., 3].astype(np.float32), 2 * h, 2 * w), 0, 65535)
        assert np.abs(a - want_a).max() < 2  # alpha: bicubic at full 16-bit precision, clamped
    # 16 bits are kept only where the format allows: JPEG output is 8-bit.
    assert decode(run(data, fmt="jpeg")[1]).mode in ("RGB", "L")


def test_output_size_limits_per_format() -> None:
    images.check_output_size("jpeg", 60000, 100)
    with pytest.raises(ImageTooLarge):
        images.check_output_size("webp", 16384, 10)


def test_quality_changes_jpeg_size() -> None:
    data = encode(small("astronaut.png", 128))
    lo = run(data, fmt="jpeg", quality=20)[1]
    hi = run(data, fmt="jpeg", quality=95)[1]
    assert len(lo) < len(hi)
