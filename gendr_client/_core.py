"""What the sync and the async client share: options, retry timing, results (when to use a job: _estimate)."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gendr_client.errors import DeadlinePassed, GendrError

DEFAULT_URL = "http://127.0.0.1:8000"
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "avif": "image/avif"}
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp", "avif": ".avif"}
INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Options:
    """Options of POST /upscale and /v1/jobs (None: the server's default)."""

    model: str | None = None
    scale: float | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    quality: int | None = None
    color_fix: str | None = None
    fit: str | None = None  # contain | cover | fill, with width and height
    strength: float | None = None  # 0–1: the model's share against the plain resize
    metadata: str | None = None  # strip | keep | keep_all

    def params(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items() if v is not None}


@dataclass
class Result:
    """One upscaled image: its bytes and what the server said about it."""

    data: bytes
    content_type: str
    width: int
    height: int
    model: str
    tiles: int
    job_id: str | None = None  # set when it ran as a job
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def format(self) -> str:
        return {v: k for k, v in CONTENT_TYPES.items()}.get(self.content_type, "png")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a temporary file renamed): a half-written file never looks finished."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.part")
        tmp.write_bytes(self.data)
        os.replace(tmp, p)
        return p


def result_from(data: bytes, headers: Any, job_id: str | None = None) -> Result:
    w, _, h = str(headers.get("x-image-size", "0x0")).partition("x")
    return Result(
        data=data,
        content_type=str(headers.get("content-type", "")).split(";")[0],
        width=int(w or 0),
        height=int(h or 0),
        model=str(headers.get("x-model", "")),
        tiles=int(headers.get("x-tiles", 0) or 0),
        job_id=job_id,
        headers={k.lower(): v for k, v in headers.items()},
    )


def read_image(image: str | os.PathLike[str] | bytes) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    return Path(image).read_bytes()


class Backoff:
    """Waits between retries: at least Retry-After, exponential otherwise, jittered, within the deadline."""

    def __init__(self, deadline_s: float, base_s: float = 0.25, cap_s: float = 30.0) -> None:
        self.deadline = time.monotonic() + deadline_s
        self.base_s, self.cap_s = base_s, cap_s
        self.attempt = 0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def reset(self) -> None:
        """A call went through: the next failure starts the exponential series again."""
        self.attempt = 0

    def next_wait(self, err: GendrError, cap_s: float | None = None) -> float:
        """Seconds to sleep before the next try; raises when the deadline would pass first."""
        exp = min(self.cap_s if cap_s is None else cap_s, self.base_s * 2**self.attempt)
        self.attempt += 1
        floor = err.retry_after_s or 0.0
        # Never earlier than Retry-After; up to 50 % later so a crowd of clients does not return at once.
        wait = max(floor, exp) * random.uniform(1.0, 1.5)
        if wait >= self.left():
            raise DeadlinePassed(
                f"gave up after {self.attempt} attempt(s): {err} (the client deadline would pass first)",
                code="deadline_exceeded",
                status=err.status,
                retry_after_s=err.retry_after_s,
            ) from err
        return wait

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise DeadlinePassed(f"the client deadline passed while {what}")


def server_deadline_ms(backoff: Backoff) -> str:
    return str(max(1, int(backoff.left() * 1000)))
