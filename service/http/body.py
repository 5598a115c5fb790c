"""Request body reading with a hard size cap enforced while the bytes arrive.

uvicorn has no body limit and Starlette's `request.form()` spools file parts to disk with no cap
(docs/architecture.md, known pitfalls), so /upscale never uses them: it streams the body itself,
stops at the limit (413 and `Connection: close`, the rest is never read — with or without
Content-Length), and feeds multipart bodies to python-multipart's streaming parser chunk by chunk,
so only the image part is kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import BadRequest, ClientClosedRequest, PayloadTooLarge, UnsupportedMediaType

IMAGE_FIELD = "image"
MAX_FIELDS = 16  # non-image multipart fields (options)
MAX_FIELD_BYTES = 1024  # each
RAW_TYPES = {b"", b"application/octet-stream"}


@dataclass
class Upload:
    data: bytes
    fields: dict[str, str] = field(default_factory=dict)  # multipart form fields other than the image
    content_type: str = ""
    cpu_s: float = 0.0  # CPU seconds spent taking the body apart (the host-work metric's `read`)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")


class _MultipartCollector:
    """Keeps the `image` part's bytes and small text fields; rejects anything else."""

    def __init__(self, boundary: bytes) -> None:
        self.image: list[bytes] | None = None
        self.image_type = ""
        self.fields: dict[str, str] = {}
        self.done = False
        self._headers: dict[bytes, bytes] = {}
        self._hname = bytearray()
        self._hvalue = bytearray()
        self._buf: list[bytes] = []
        self._size = 0
        self._name = ""
        self._is_image = False
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, s, e: self._hname.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._hvalue.extend(d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def _part_begin(self) -> None:
        self._headers, self._buf, self._size = {}, [], 0

    def _header_end(self) -> None:
        self._headers[bytes(self._hname).strip().lower()] = bytes(self._hvalue).strip()
        self._hname.clear()
        self._hvalue.clear()

    def _headers_finished(self) -> None:
        disp, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disp != b"form-data" or b"name" not in params:
            raise BadRequest("multipart part without a Content-Disposition form-data name")
        self._name = params[b"name"].decode("utf-8", "replace")
        self._is_image = self._name == IMAGE_FIELD
        if self._is_image:
            if self.image is not None:
                raise BadRequest(f"more than one `{IMAGE_FIELD}` part")
            self.image_type = self._headers.get(b"content-type", b"").decode("latin-1")
        elif b"filename" in params:
            raise BadRequest(f"unexpected file part `{self._name}`; send the image as `{IMAGE_FIELD}`")
        elif len(self.fields) >= MAX_FIELDS:
            raise BadRequest("too many form fields")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if not self._is_image and self._size > MAX_FIELD_BYTES:
            raise BadRequest(f"form field `{self._name}` is longer than {MAX_FIELD_BYTES} bytes")
        self._buf.append(bytes(data[start:end]))

    def _part_end(self) -> None:
        if self._is_image:
            self.image = self._buf
        else:
            if self._name in self.fields:
                raise BadRequest(f"form field `{self._name}` given twice")
            try:
                self.fields[self._name] = b"".join(self._buf).decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRequest(f"form field `{self._name}` is not UTF-8 text") from e
        self._buf = []

    def _end(self) -> None:
        self.done = True

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as e:
            raise BadRequest(f"malformed multipart body: {e}") from e

    def finish(self) -> Upload:
        try:
            self.parser.finalize()
        except MultipartParseError as e:
            raise BadRequest(f"malformed multipart body: {e}") from e
        if not self.done:
            raise BadRequest("incomplete multipart body (no closing boundary)")
        if self.image is None:
            raise BadRequest(f"multipart body has no `{IMAGE_FIELD}` part")
        return Upload(b"".join(self.image), self.fields, self.image_type)


async def read_upload(request: Request, max_bytes: int) -> Upload:
    """The image (raw body or multipart field `image`) and any form fields, at most `max_bytes` read."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError as e:
            raise BadRequest("invalid Content-Length") from e
        if n > max_bytes:
            raise _too_large(max_bytes)  # answered before reading a single body byte
    ctype = request.headers.get("content-type", "")
    media, params = parse_options_header(ctype)
    media = media.lower()
    multipart: _MultipartCollector | None = None
    if media == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise BadRequest("multipart/form-data without a boundary")
        multipart = _MultipartCollector(boundary)
    elif not (media in RAW_TYPES or media.startswith(b"image/")):
        raise UnsupportedMediaType(
            f"Content-Type {ctype!r}: send the image as the raw body (image/* or application/octet-stream) "
            f"or as multipart/form-data field `{IMAGE_FIELD}`"
        )
    chunks: list[bytes] = []
    total = 0
    cpu = 0.0
    try:
        async for chunk in request.stream():
            c0 = time.thread_time()
            total += len(chunk)
            if total > max_bytes:
                raise _too_large(max_bytes)
            if multipart is not None:
                multipart.write(chunk)
            elif chunk:
                chunks.append(chunk)
            cpu += time.thread_time() - c0
    except ClientDisconnect as e:
        raise ClientClosedRequest("client disconnected during the upload") from e
    request.state.body_read = True
    c0 = time.thread_time()
    upload = multipart.finish() if multipart is not None else Upload(b"".join(chunks), {}, ctype)
    upload.cpu_s = cpu + time.thread_time() - c0
    if not upload.data:
        raise BadRequest(f"no image: send it as the request body or as multipart field `{IMAGE_FIELD}`")
    return upload
