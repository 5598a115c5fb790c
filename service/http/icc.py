"""ICC profiles from clients: validated by LittleCMS and rebuilt, never copied byte for byte.

An embedded profile is attacker-controlled bytes that our output would hand to the next viewer's
parser. So a profile is kept only when it is small, names the colour space of the output, opens in
LittleCMS (Pillow's ImageCms) and can build a transform to sRGB; and what is written is a *rebuilt*
profile: a header whose free-form fields (CMM, creator, device maker/model, profile id, reserved
bytes) are zeroed, and only the colorimetric tags (white point, colorants, tone curves, adaptation,
LUTs). Text, private and unknown tags, and any bytes between tags, are dropped; the rebuilt profile
must open in LittleCMS again and is serialised by it. Anything else: the profile is dropped.
"""

from __future__ import annotations

import io
import logging
import struct

from PIL import ImageCms

log = logging.getLogger(__name__)

MAX_ICC_BYTES = 1 << 20  # LUT profiles are ~0.5 MB at most; matrix/TRC profiles are a few KB
_HEADER = 128
# Colorimetric tags: what a colour-managed viewer needs. Everything else is dropped.
KEEP_TAGS = frozenset(
    {
        b"wtpt",
        b"bkpt",
        b"rXYZ",
        b"gXYZ",
        b"bXYZ",
        b"rTRC",
        b"gTRC",
        b"bTRC",
        b"kTRC",
        b"chad",
        b"chrm",
        b"lumi",
        b"A2B0",
        b"A2B1",
        b"A2B2",
        b"B2A0",
        b"B2A1",
        b"B2A2",
    }
)
_CLASSES = {b"mntr", b"scnr", b"spac"}
_DESCRIPTION = "gendr-serve: colorimetric tags of the input's profile"


def _desc_tag(version: int) -> bytes:
    """A profile description of our own (required by the ICC spec; the client's text is dropped)."""
    if version >= 4:  # multiLocalizedUnicodeType
        text = _DESCRIPTION.encode("utf-16-be")
        return b"mluc\0\0\0\0" + struct.pack(">II2s2sII", 1, 12, b"en", b"US", len(text), 28) + text
    ascii_ = _DESCRIPTION.encode("ascii") + b"\0"  # textDescriptionType (v2)
    return b"desc\0\0\0\0" + struct.pack(">I", len(ascii_)) + ascii_ + b"\0" * 8 + b"\0\0\0" + b"\0" * 67


def _rebuild(icc: bytes) -> bytes | None:
    """Header with free-form fields zeroed plus the KEEP_TAGS tags; None when the layout is broken."""
    if len(icc) < _HEADER + 4:
        return None
    declared, count = struct.unpack_from(">I", icc, 0)[0], struct.unpack_from(">I", icc, _HEADER)[0]
    if declared > len(icc) or count > 100 or _HEADER + 4 + 12 * count > len(icc):
        return None
    tags: list[tuple[bytes, bytes]] = []
    for i in range(count):
        sig, off, size = struct.unpack_from(">4sII", icc, _HEADER + 4 + 12 * i)
        if sig in KEEP_TAGS and off >= _HEADER and size >= 8 and off + size <= len(icc):
            if sig not in (s for s, _ in tags):
                tags.append((sig, icc[off : off + size]))
    if not tags:
        return None
    version = icc[8]
    tags.append((b"desc", _desc_tag(version)))
    header = bytearray(icc[:_HEADER])
    header[4:8] = b"\0" * 4  # preferred CMM
    header[40:44] = b"\0" * 4  # primary platform
    header[48:56] = b"\0" * 8  # device manufacturer and model
    header[56:64] = b"\0" * 8  # device attributes
    header[80:128] = b"\0" * 48  # creator, profile id, reserved
    table, body = bytearray(), bytearray()
    offset = _HEADER + 4 + 12 * len(tags)
    for sig, data in tags:
        table += struct.pack(">4sII", sig, offset + len(body), len(data))
        body += data + b"\0" * (-len(data) % 4)
    out = header + struct.pack(">I", len(tags)) + table + body
    struct.pack_into(">I", out, 0, len(out))
    return bytes(out)


def sanitize(icc: bytes | None, colour_space: bytes) -> bytes | None:
    """A rebuilt, LittleCMS-validated profile for an output in `colour_space` (b"RGB " / b"GRAY"), or None."""
    if not icc:
        return None
    if len(icc) > MAX_ICC_BYTES or len(icc) < _HEADER or icc[16:20] != colour_space:
        return None
    if icc[12:16] not in _CLASSES or icc[36:40] != b"acsp":
        return None
    rebuilt = _rebuild(icc)
    if rebuilt is None:
        return None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(rebuilt))
        mode = "RGB" if colour_space == b"RGB " else "L"
        ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), mode, "RGB")
        out = profile.tobytes()
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as e:
        log.info("input ICC profile dropped: LittleCMS cannot use it (%s)", e)
        return None
    return out or None
