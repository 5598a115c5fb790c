"""Holes 1 and 7: work bought per byte is bounded before admission; client bytes never reach our output."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageCms
from reliability_helpers import (
    encode,
    engine_calls,
    jpeg_app_padding,
    jpeg_with_size,
    noise,
    png_chunk,
    png_declaring,
    png_with_chunks,
)

from service.errors import ImageTooLarge, UndecodableImage
from service.http import images

FORMATS = ["JPEG", "PNG", "WEBP"]
LIMIT = 16_777_216
TOKEN = b"gendr-ATTACKER-token-9f0c2b7e"  # bytes a client hides in its upload


def _post(client, body: bytes, **params: object):
    q = "&".join(f"{k}={v}" for k, v in params.items())
    return client.post(f"/upscale?{q}", content=body, headers={"content-type": "application/octet-stream"})


# --- hole 1: a corrupt header cannot buy megapixels ----------------------------------------------


@pytest.mark.parametrize("size", [(4000, 4000), (16000, 1000)])
def test_corrupt_jpeg_declaring_megapixels_is_422_before_any_tile(make_app, size: tuple[int, int]) -> None:
    client = make_app()
    body = jpeg_with_size(*size)
    assert len(body) < 4096
    r = _post(client, body, scale=1)
    assert r.status_code == 422 and r.json()["error"]["code"] == "undecodable_image", r.text
    assert engine_calls(client) == 0


def test_metadata_padding_does_not_buy_pixels(make_app) -> None:
    """40 KB of APP segments pass a naive bytes-per-pixel rule; only entropy-coded bytes count."""
    client = make_app(max_pixels_per_byte=0)  # the structural floor alone
    body = jpeg_app_padding(jpeg_with_size(4000, 4000), 40_000)
    r = _post(client, body, scale=1)
    assert r.status_code == 422 and "compressed data" in r.json()["error"]["message"]
    assert engine_calls(client) == 0


def test_png_whose_idat_cannot_hold_the_declared_pixels_is_refused_at_the_header() -> None:
    src = encode(noise(32, 32))
    with pytest.raises(UndecodableImage, match="IDAT"):
        images.probe(png_declaring(4000, 4000, src), FORMATS, LIMIT, 0)


def test_flat_lossless_graphics_pass_and_the_pixel_limit_still_bounds_them(make_app) -> None:
    """Screenshots and stickers compress far beyond photos: lossless formats are not asked for pixels per
    byte (issue 25); the pixel limit, the decode checks, admission and per-key quotas bound their work."""
    body = encode(Image.new("RGB", (4000, 4000), (90, 90, 90)), "WEBP", lossless=True)
    assert len(body) < 2000  # a valid 16 MP image in under 2 KB
    images.probe(body, FORMATS, LIMIT, 1024).close()  # lossless: no ratio cap
    with pytest.raises(ImageTooLarge):
        images.probe(body, FORMATS, 1_000_000, 1024)  # the pixel limit stays
    lossy = encode(Image.new("RGB", (4000, 4000), (90, 90, 90)), "WEBP", quality=50)
    with pytest.raises(ImageTooLarge, match="pixels per byte"):  # a lossy image is still held to the ratio
        images.probe(lossy, FORMATS, LIMIT, 16_000_000 / len(lossy) / 2)
    client = make_app(max_input_pixels=1_000_000)
    r = _post(client, body, scale=1)
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", r.text
    assert engine_calls(client) == 0


@pytest.mark.parametrize(
    ("mode", "fmt", "kw"),
    [
        ("L", "PNG", {}),
        ("RGB", "PNG", {}),
        ("RGB", "JPEG", {"quality": 90}),
        ("RGB", "JPEG", {"quality": 90, "progressive": True}),
        ("L", "JPEG", {"quality": 75, "progressive": True}),
        ("RGB", "WEBP", {"quality": 90}),
    ],
)
def test_legitimate_flat_images_of_16_mp_pass_the_floors(mode: str, fmt: str, kw: dict[str, object]) -> None:
    """The worst case of honest data (one flat colour) is above every floor and under the default cap."""
    body = encode(Image.new(mode, (4000, 4000), 128), fmt, **kw)
    p = images.probe(body, FORMATS, LIMIT, 1024)
    assert (p.width, p.height) == (4000, 4000)
    p.close()


def test_photo_jpeg_and_png_pass(make_app) -> None:
    client = make_app()
    for fmt in ("JPEG", "PNG", "WEBP"):
        r = _post(client, encode(noise(40, 48, seed=3), fmt), scale=2)
        assert r.status_code == 200, (fmt, r.text)


# --- hole 7: no attacker-chosen bytes in the output ----------------------------------------------


def _fake_icc(payload: bytes) -> bytes:
    """Not a profile: a header that claims an RGB display profile, then the payload."""
    head = bytearray(128)
    struct.pack_into(">I", head, 0, 128 + 4 + len(payload))
    head[12:16], head[16:20], head[20:24], head[36:40] = b"mntr", b"RGB ", b"XYZ ", b"acsp"
    return bytes(head) + struct.pack(">I", 0) + payload


def _srgb_with_extra_tags(payload: bytes) -> bytes:
    """A valid sRGB profile plus a private tag and a `cprt` tag holding the payload."""
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    n = struct.unpack_from(">I", icc, 128)[0]
    table = icc[132 : 132 + 12 * n]
    data = icc[132 + 12 * n :]
    extra = [(b"zzzz", b"zzzz\0\0\0\0" + payload), (b"cprt", b"text\0\0\0\0" + payload + b"\0")]
    new_table, shift = bytearray(), 12 * len(extra)
    for k in range(n):
        sig, off, size = struct.unpack_from(">4sII", table, 12 * k)
        if sig == b"cprt":
            continue
        new_table += struct.pack(">4sII", sig, off + shift, size)
    body = bytearray(data)
    base = 132 + 12 * n + shift
    for sig, blob in extra:
        body += b"\0" * (-len(body) % 4)
        new_table += struct.pack(">4sII", sig, base + len(body), len(blob))
        body += blob
    count = len(new_table) // 12
    pad = b"\0" * (12 * (n + len(extra)) - len(new_table))  # keep offsets valid: pad the table
    out = icc[:128] + struct.pack(">I", count) + new_table + pad + body
    struct.pack_into(">I", out, 0, len(out))
    return bytes(out)


def test_blob_labelled_icc_is_not_copied_into_the_output(make_app) -> None:
    client = make_app()
    src = Image.fromarray(noise(24, 24))
    for fmt in ("PNG", "JPEG", "WEBP"):
        body = encode(src, fmt, icc_profile=_fake_icc(TOKEN * 8))
        for out_fmt in ("png", "jpeg", "webp"):
            r = _post(client, body, scale=2, format=out_fmt)
            assert r.status_code == 200, r.text
            assert TOKEN not in r.content, (fmt, out_fmt)
            assert Image.open(io.BytesIO(r.content)).info.get("icc_profile") is None


def test_valid_profile_keeps_its_colour_but_loses_hidden_tags(make_app) -> None:
    icc = _srgb_with_extra_tags(TOKEN * 4)
    ImageCms.ImageCmsProfile(io.BytesIO(icc))  # the crafted input is itself a valid profile
    client = make_app()
    r = _post(client, encode(Image.fromarray(noise(24, 24)), "PNG", icc_profile=icc), scale=2)
    assert r.status_code == 200 and TOKEN not in r.content
    out_icc = Image.open(io.BytesIO(r.content)).info["icc_profile"]
    assert TOKEN not in out_icc and b"zzzz" not in out_icc  # iCCP is compressed: look inside
    ramp = Image.fromarray(noise(8, 8, seed=5))
    srgb = ImageCms.createProfile("sRGB")
    via = [
        np.asarray(ImageCms.profileToProfile(ramp, ImageCms.ImageCmsProfile(io.BytesIO(p)), srgb))
        for p in (icc, out_icc)
    ]
    assert np.array_equal(via[0], via[1])


def test_no_metadata_block_of_the_input_survives(make_app) -> None:
    client = make_app()
    arr = noise(24, 24, seed=7)
    exif = Image.Exif()
    exif[0x010E] = TOKEN.decode()  # ImageDescription
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + TOKEN + b"</x:xmpmeta>"
    png = png_with_chunks(
        encode(arr, "PNG"),
        png_chunk(b"tEXt", b"Comment\0" + TOKEN),
        png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp),
        png_chunk(b"eXIf", exif.tobytes()),
        png_chunk(b"prVt", TOKEN),  # private ancillary chunk
    )
    jpeg = encode(arr, "JPEG", exif=exif.tobytes(), comment=TOKEN, xmp=xmp)
    webp = encode(arr, "WEBP", exif=exif.tobytes(), xmp=xmp)
    for body in (png, jpeg, webp):
        assert TOKEN in body
        for out_fmt in ("png", "jpeg", "webp"):
            r = _post(client, body, scale=2, format=out_fmt)
            assert r.status_code == 200, r.text
            assert TOKEN not in r.content, out_fmt
