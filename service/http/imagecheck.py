"""Work a client can buy per byte: checks on the compressed data, from the header, before admission.

A corrupt JPEG whose frame header claims 4000×4000 while its data describes 56×48 decodes (libjpeg
only warns) into a flat grey 16 MP image: thousands of tiles bought with 1.5 KB. Two rules, both
applied by `images.probe` before any tile is admitted (docs/http.md):

1. Structural floors (422 `undecodable_image`): the compressed data cannot describe the declared
   image. Huffman-coded JPEG needs at least one bit per 8×8 block of every component (a block's DC
   difference has a code of ≥ 1 bit); PNG's deflate expands at most 1032:1, so the IDAT bytes bound
   the raw scanlines. Only the entropy-coded / IDAT bytes count: padding in metadata does not help.
2. A ratio cap (413 `image_too_large`): above `FREE_PIXELS`, at most `max_pixels_per_byte` input
   pixels per byte of image data, whatever the format (WebP lossless can legitimately reach
   20,000 px/byte on flat images; photos are 3–50 px/byte, flat PNG ≤ 1032).
"""

from __future__ import annotations

import math
import re
import struct

from service.errors import ImageTooLarge, UndecodableImage

FREE_PIXELS = 1 << 20  # images up to 1 MP are never refused by the ratio cap
DEFLATE_MAX_RATIO = 1032
_JPEG_HUFFMAN_SOF = {0xC0, 0xC1, 0xC2}
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SCAN_END = re.compile(rb"\xff(?!\x00|[\xd0-\xd7])")  # a marker that ends entropy-coded data
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def jpeg_blocks_and_entropy(data: bytes) -> tuple[int, int, bool] | None:
    """(8×8 blocks of all components, entropy-coded bytes, Huffman?) of the first frame, or None."""
    i, n = 2, len(data)
    blocks, entropy, huffman = 0, 0, False
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack_from(">H", data, i + 2)[0]
        seg = data[i + 4 : i + 2 + length]
        if length < 2 or len(seg) != length - 2:
            break  # truncated segment: count what came before it
        if marker in _JPEG_SOF and len(seg) >= 6:
            h, w, nc = struct.unpack_from(">HHB", seg, 1)
            comps = [(seg[7 + 3 * k] >> 4, seg[7 + 3 * k] & 15) for k in range(nc) if 9 + 3 * k <= len(seg)]
            if not comps or w == 0 or h == 0:
                return None
            hmax, vmax = max(c[0] for c in comps) or 1, max(c[1] for c in comps) or 1
            blocks = sum(
                math.ceil(math.ceil(w * hs / hmax) / 8) * math.ceil(math.ceil(h * vs / vmax) / 8)
                for hs, vs in comps
            )
            huffman = marker in _JPEG_HUFFMAN_SOF
        i += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
            m = _SCAN_END.search(data, i)
            end = m.start() if m else n
            entropy += end - i
            i = end
    return (blocks, entropy, huffman) if blocks else None


def png_raw_and_idat(data: bytes) -> tuple[int, int] | None:
    """(minimum raw scanline bytes, IDAT bytes); None if the chunk layout is unparsable."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    w, h, depth, ctype = struct.unpack_from(">IIBB", data, 16)
    if ctype not in _PNG_CHANNELS:
        return None
    raw = math.ceil(w * h * depth * _PNG_CHANNELS[ctype] / 8)  # filter bytes not counted: a lower bound
    i, idat = 8, 0
    while i + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, i)
        if kind == b"IDAT":
            idat += min(length, max(0, len(data) - i - 8))
        if kind == b"IEND":
            break
        i += 12 + length
    return raw, idat


def check_work(data: bytes, fmt: str, pixels: int, max_pixels_per_byte: float) -> None:
    """Raise 422 when the data cannot describe `pixels`, 413 when it buys too many pixels per byte."""
    if fmt in ("JPEG", "MPO"):
        info = jpeg_blocks_and_entropy(data)
        if info is not None and info[2] and info[1] * 8 < info[0]:
            raise UndecodableImage(
                f"the JPEG data is corrupt or truncated: {info[1]} bytes of compressed data cannot "
                f"describe the {info[0]} blocks its header declares (at least {math.ceil(info[0] / 8)})"
            )
    elif fmt == "PNG":
        png = png_raw_and_idat(data)
        if png is not None and png[1] * DEFLATE_MAX_RATIO + 1024 < png[0]:
            raise UndecodableImage(
                f"the PNG data is corrupt or truncated: {png[1]} bytes of IDAT cannot hold the "
                f"{png[0]} bytes of pixels its header declares"
            )
    if max_pixels_per_byte > 0 and pixels > FREE_PIXELS and pixels > max_pixels_per_byte * len(data):
        raise ImageTooLarge(
            f"the image declares {pixels} pixels in {len(data)} bytes; above {FREE_PIXELS} pixels the "
            f"limit is {max_pixels_per_byte:g} pixels per byte sent"
        )
