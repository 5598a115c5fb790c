"""The fast encoders change speed, never the image: PNG decodes to the very pixels (8 and 16 bit, every
channel count, one band or many compressed in parallel), JPEG and WebP are Pillow's bytes at the same
settings, and metadata reads back where Pillow puts it."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from skimage import data

from service.http import fastencode
from service.http.png16 import read_png16

EXIF = Image.Exif()
EXIF[0x010F] = "gendr"  # Make


def _photo(h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(data.astronaut()).resize((w, h), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("level", [0, 1, 3, 6])
def test_png_is_lossless_for_every_mode(channels: int, level: int) -> None:
    rgb = _photo(67, 91)
    arr = np.dstack([rgb, rgb[..., :1] // 2])[..., :channels] if channels != 1 else rgb[..., :1]
    if channels == 2:
        arr = np.dstack([rgb[..., 0], rgb[..., 1] // 3])
    png = fastencode.png(arr, level=level)
    im = Image.open(io.BytesIO(png))
    assert im.mode == {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    back = np.asarray(im)
    np.testing.assert_array_equal(back.reshape(arr.shape), arr)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png16_is_lossless(channels: int) -> None:
    rng = np.random.default_rng(channels)
    arr = rng.integers(0, 65536, (40, 53, channels), dtype=np.uint16)
    np.testing.assert_array_equal(read_png16(fastencode.png(arr, level=1)), arr)


def test_bands_compressed_in_parallel_give_the_same_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many bands (each its own deflate run, sync-flushed, Adler-32 combined) on a thread pool: the
    same bytes as the same bands in one thread, the same pixels, and Pillow and zlib accept the stream."""
    arr = _photo(300, 257)[::-1, ::2]  # a strided view: no copy is needed by the caller
    monkeypatch.setattr(fastencode, "BAND_BYTES", 4096)
    cpu: list[float] = []
    with ThreadPoolExecutor(3) as pool:
        parallel = fastencode.png(arr, level=1, pool=pool, threads=3, on_cpu=cpu.append)
    serial = fastencode.png(arr, level=1)
    assert parallel == serial and len(cpu) > 10
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(parallel))), arr)
    im = Image.open(io.BytesIO(parallel))
    im.verify()  # CRCs and the zlib stream's Adler-32


def test_png_metadata_reads_back() -> None:
    icc = Image.open(io.BytesIO(_pillow(_photo(8, 8), "PNG"))).info.get("icc_profile") or b"\0" * 300
    png = fastencode.png(_photo(8, 8), icc=icc, exif=EXIF.tobytes(), xmp=b"<x:xmpmeta/>")
    im = Image.open(io.BytesIO(png))
    assert im.info["icc_profile"] == icc and im.info["xmp"] == b"<x:xmpmeta/>"
    assert im.getexif()[0x010F] == "gendr"


def _pillow(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.skipif(not fastencode.have_jpeg(), reason="imagecodecs without JPEG")
@pytest.mark.parametrize(("quality", "sub", "pillow_sub"), [(90, "444", 0), (75, "420", 2), (40, "420", 2)])
def test_jpeg_is_pillows_bytes(quality: int, sub: str, pillow_sub: int) -> None:
    arr = _photo(120, 97)
    assert fastencode.jpeg(arr, quality, subsampling=sub) == _pillow(
        arr, "JPEG", quality=quality, subsampling=pillow_sub
    )
    gray = arr[..., :1]
    assert fastencode.jpeg(gray, quality, subsampling=sub) == _pillow(gray, "JPEG", quality=quality)


@pytest.mark.skipif(not fastencode.have_jpeg(), reason="imagecodecs without JPEG")
def test_jpeg_metadata_reads_back() -> None:
    icc = bytes(range(256)) * 300  # 76.8 kB: two ICC_PROFILE segments
    data_ = fastencode.jpeg(_photo(16, 16), 90, subsampling="444", icc=icc, exif=EXIF.tobytes(), xmp=b"<x/>")
    im = Image.open(io.BytesIO(data_))
    assert im.info["icc_profile"] == icc and im.info["xmp"] == b"<x/>"
    assert im.getexif()[0x010F] == "gendr"
    np.testing.assert_array_equal(
        np.asarray(im),
        np.asarray(Image.open(io.BytesIO(_pillow(_photo(16, 16), "JPEG", quality=90, subsampling=0)))),
    )


@pytest.mark.skipif(not fastencode.have_webp(), reason="imagecodecs without WebP")
@pytest.mark.parametrize("method", [0, 2])
def test_webp_is_pillows_bytes_and_keeps_metadata(method: int) -> None:
    arr = _photo(90, 130)
    assert fastencode.webp(arr, 90, method=method) == _pillow(arr, "WEBP", quality=90, method=method)
    rgba = np.dstack([arr, np.linspace(0, 255, 130, dtype=np.uint8)[None].repeat(90, 0)])
    out = fastencode.webp(rgba, 80, method=method, icc=b"\1" * 200, exif=EXIF.tobytes(), xmp=b"<x/>")
    im = Image.open(io.BytesIO(out))
    assert im.mode == "RGBA" and im.info["icc_profile"] == b"\1" * 200 and im.info["xmp"] == b"<x/>"
    assert im.getexif()[0x010F] == "gendr"
    plain = Image.open(io.BytesIO(_pillow(rgba, "WEBP", quality=80, method=method)))
    np.testing.assert_array_equal(np.asarray(im), np.asarray(plain))
