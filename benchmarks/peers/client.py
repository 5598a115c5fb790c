"""Open-loop HTTP client (asyncio + httpx): each request goes at its scheduled time, whatever is outstanding.

Two wire formats, one per kind of system:
- `multipart`: `POST /upscale` with the PNG in the form field `image` (+ `format=png`), PNG body back.
- `triton`: Triton's KServe-v2 `POST /v2/models/<model>/infer` with the binary-data extension: a JSON
  header, then the PNG bytes as one BYTES element (4-byte little-endian length + data); the ×4 PNG
  comes back the same way.

A request counts as ok only when the answer is 200 and a PNG exactly 4× the input's size.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Sequence

import httpx
from stats import Record
from traffic import Arrival, PoolImage

SCALE = 4
TRITON_MODEL = "upscale"


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, or None when `data` is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def triton_request(png: bytes) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a binary-data v2 inference request carrying one PNG."""
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": [1, 1],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(png) + 4},
            }
        ],
        "outputs": [{"name": "image", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header).encode()
    body = head + struct.pack("<I", len(png)) + png
    return body, {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def triton_png(resp: httpx.Response) -> bytes | None:
    """The PNG of a binary-data v2 inference response (one BYTES element), or None."""
    n = resp.headers.get("inference-header-content-length")
    if n is None:
        return None
    data = resp.content[int(n) :]
    if len(data) < 4:
        return None
    (size,) = struct.unpack("<I", data[:4])
    return data[4 : 4 + size]


class Client:
    def __init__(self, base: str, kind: str, timeout_s: float = 30.0) -> None:
        if kind not in ("multipart", "triton"):
            raise ValueError(f"unknown client kind {kind!r}")
        self.base, self.kind, self.timeout_s = base.rstrip("/"), kind, timeout_s
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits)

    async def close(self) -> None:
        await self.http.aclose()

    async def _post(self, image: PoolImage) -> tuple[int, bytes | None]:
        if self.kind == "multipart":
            r = await self.http.post(
                f"{self.base}/upscale",
                files={"image": ("in.png", image.png, "image/png")},
                data={"format": "png"},
            )
            return r.status_code, r.content if r.status_code == 200 else None
        body, headers = triton_request(image.png)
        r = await self.http.post(f"{self.base}/v2/models/{TRITON_MODEL}/infer", content=body, headers=headers)
        return r.status_code, triton_png(r) if r.status_code == 200 else None

    async def one(self, image: PoolImage, scheduled: float) -> Record:
        """Send one request; latency runs from its scheduled time (t0-relative monotonic)."""
        try:
            status, png = await asyncio.wait_for(self._post(image), self.timeout_s)
        except (TimeoutError, httpx.TimeoutException):
            return Record(image.size_class, "timeout", time.monotonic() - scheduled, 0)
        except httpx.HTTPError:
            return Record(image.size_class, "error", time.monotonic() - scheduled, 0)
        latency = time.monotonic() - scheduled
        if status == 503:
            return Record(image.size_class, "shed", latency, 0, status)
        want = (image.width * SCALE, image.height * SCALE)
        if status != 200 or png is None or png_size(png) != want:
            return Record(image.size_class, "error", latency, 0, status)
        return Record(image.size_class, "ok", latency, want[0] * want[1], status)

    async def run(self, pool: Sequence[PoolImage], plan: Sequence[Arrival]) -> tuple[list[Record], float]:
        """Send `plan` open-loop; returns the records (in plan order) and the wall time to the last answer."""
        t0 = time.monotonic() + 0.05
        tasks: list[asyncio.Task[Record]] = []
        for a in plan:
            delay = t0 + a.t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.one(pool[a.image], t0 + a.t)))
        records = list(await asyncio.gather(*tasks))
        return records, time.monotonic() - t0

    async def closed_loop(
        self, pool: Sequence[PoolImage], order: Sequence[int], concurrency: int, duration_s: float
    ) -> tuple[float, int, int]:
        """Keep `concurrency` requests outstanding (images in `order`) for `duration_s`.

        Returns (successful output MP per second to the last answer, requests sent, requests ok).
        """
        todo = list(reversed(order))
        done_px, sent, ok = 0, 0, 0
        t0 = time.monotonic()
        end = t0 + duration_s

        async def worker() -> None:
            nonlocal done_px, sent, ok
            while todo and time.monotonic() < end:
                sent += 1
                r = await self.one(pool[todo.pop()], time.monotonic())
                done_px += r.output_pixels
                ok += r.outcome == "ok"

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done_px / 1e6 / (time.monotonic() - t0), sent, ok
