"""Options a platform team needs without working around us: a default size that fits, fit modes,
strength, metadata, AVIF, and flat lossless graphics that pass — through the real HTTP stack."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from http_helpers import decode, encode, small
from PIL import Image

Client = Callable[..., Any]


def bands(w: int, h: int) -> Image.Image:
    """Three horizontal bands (red, green, blue): where a crop came from is visible in the output."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 3, :, 0] = 255
    a[h // 3 : 2 * h // 3, :, 1] = 255
    a[2 * h // 3 :, :, 2] = 255
    return Image.fromarray(a)


def test_no_size_option_picks_the_largest_scale_that_fits(make_client: Client) -> None:
    c = make_client(max_output_pixels=40_000)
    r = c.post("/upscale", content=encode(small("astronaut.png", 100)))  # ×4 would be 400×400 = 160,000
    assert r.status_code == 200, r.text
    assert r.headers["x-scale"] == "2" and r.headers["x-image-size"] == "200x200"
    too = c.post("/upscale?scale=4", content=encode(small("astronaut.png", 100)))
    assert too.status_code == 413 and too.json()["error"]["code"] == "image_too_large"
    fits = c.post("/upscale", content=encode(small("astronaut.png", 40)))
    assert fits.headers["x-scale"] == "4"  # the native scale when it fits


def test_fit_contain_cover_and_fill(make_client: Client) -> None:
    c = make_client()
    img = encode(bands(90, 90))
    contain = c.post("/upscale?width=180&height=90", content=img)
    assert contain.headers["x-image-size"] == "90x90"  # inside the box, aspect kept (the default)
    cover = c.post("/upscale?width=180&height=90&fit=cover", content=img)
    assert cover.headers["x-image-size"] == "180x90"
    out = np.asarray(decode(cover.content).convert("RGB")).astype(int)
    # the centred half of the height: the green band fills the middle, red and blue only the edges
    assert out[45, 90, 1] > 200 and out[45, 90, 0] < 60
    assert out[2, 90, 0] > 150 and out[-3, 90, 2] > 150
    fill = c.post("/upscale?width=180&height=90&fit=fill", content=img)
    assert fill.headers["x-image-size"] == "180x90"
    stretched = np.asarray(decode(fill.content).convert("RGB")).astype(int)
    assert stretched[5, 90, 0] > 200  # the whole input: red at the top
    lone = c.post("/upscale?width=180&fit=cover", content=img)
    assert lone.status_code == 400 and "both width and height" in lone.json()["error"]["message"]


def test_strength_blends_the_model_with_the_plain_resize(make_client: Client) -> None:
    c = make_client(models=["tiny", "other"])
    src = small("astronaut.png", 40)
    q = "/upscale?model=other&scale=2&format=png&color_fix=none"
    model = np.asarray(decode(c.post(q, content=encode(src)).content).convert("RGB")).astype(int)
    plain = np.asarray(src.convert("RGB").resize((80, 80), Image.Resampling.BICUBIC)).astype(int)
    zero = np.asarray(decode(c.post(q + "&strength=0", content=encode(src)).content).convert("RGB")).astype(
        int
    )
    one = np.asarray(decode(c.post(q + "&strength=1", content=encode(src)).content).convert("RGB")).astype(
        int
    )
    half = np.asarray(decode(c.post(q + "&strength=0.5", content=encode(src)).content).convert("RGB")).astype(
        int
    )
    assert np.array_equal(zero, plain)
    assert np.array_equal(one, model) and not np.array_equal(model, plain)
    assert np.abs(half - (model + plain) / 2).max() <= 1
    bad = c.post(q + "&strength=1.5", content=encode(src))
    assert bad.status_code == 400


def _exif_photo() -> bytes:
    im = small("astronaut.png", 40).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the output's pixels are turned, its tag must say 1
    exif[0x010F] = "ACME Camera"  # Make
    exif.get_ifd(0x8825)[2] = (52.0, 31.0, 12.0)  # GPS latitude
    exif.get_ifd(0x8769)[0x927C] = b"secret maker note"
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_metadata_keep_carries_exif_without_gps_and_maker_notes(make_client: Client, fmt: str) -> None:
    c = make_client()
    data = _exif_photo()
    stripped = Image.open(io.BytesIO(c.post(f"/upscale?scale=1&format={fmt}", content=data).content))
    assert not stripped.getexif()
    kept = Image.open(
        io.BytesIO(c.post(f"/upscale?scale=1&format={fmt}&metadata=keep", content=data).content)
    )
    exif = kept.getexif()
    assert exif[0x010F] == "ACME Camera" and exif[0x0112] == 1
    assert not exif.get_ifd(0x8825) and 0x927C not in exif.get_ifd(0x8769)
    every = Image.open(
        io.BytesIO(c.post(f"/upscale?scale=1&format={fmt}&metadata=keep_all", content=data).content)
    )
    assert every.getexif().get_ifd(0x8825)[2] == (52.0, 31.0, 12.0)


def test_avif_output_where_pillow_writes_it(make_client: Client) -> None:
    from service.http.images import output_formats

    c = make_client()
    r = c.post("/upscale?scale=1&format=avif", content=encode(small("astronaut.png", 40)))
    if "avif" not in output_formats():
        assert r.status_code == 415 and "avif" in r.json()["error"]["message"]
        return
    assert r.status_code == 200 and r.headers["content-type"] == "image/avif"
    assert Image.open(io.BytesIO(r.content)).size == (40, 40)


def test_flat_lossless_graphics_pass_and_the_pixel_limit_stays(make_client: Client) -> None:
    c = make_client(max_input_pixels=2_000_000, max_output_pixels=4_000_000)
    flat = Image.new("RGB", (1200, 1000), (30, 120, 200))  # a 1.2 MP screenshot-like PNG of a few kB
    data = encode(flat)
    assert len(data) < 20_000
    r = c.post("/upscale?scale=1", content=data)
    assert r.status_code == 200, r.text
    lossless_webp = io.BytesIO()
    flat.save(lossless_webp, format="WEBP", lossless=True)
    assert c.post("/upscale?scale=1", content=lossless_webp.getvalue()).status_code == 200
    huge = encode(Image.new("RGB", (1500, 1500), (0, 0, 0)))
    too = c.post("/upscale?scale=1", content=huge)
    assert too.status_code == 413 and too.json()["error"]["code"] == "image_too_large"
