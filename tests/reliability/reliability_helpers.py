"""Helpers of the reliability suite: a fake-backend model repository, a real server process, raw sockets,
and hostile images. (A uniquely named module, importable by tests and benchmarks/reliability_soak.py.)
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from live_server import ServerProcess as BaseServer
from live_server import free_port
from PIL import Image

from service.manifest import Manifest, TileGeometry, write_manifest

__all__ = ["free_port"]  # re-exported for the reliability tests

# glibc malloc settings of the Dockerfile, docker-compose.yml and k8s (test_allocator_env checks them).
DEPLOYED_ALLOCATOR = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"}


def _command() -> list[str]:
    exe = shutil.which("gendr-serve", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "service.cli"]


def write_fake_repo(root: Path, name: str = "fake", tile: int = 32, overlap: int = 8, scale: int = 2) -> Path:
    """models/<name>/manifest.json with no artifacts: enough for GENDR_BACKEND=fake."""
    m = Manifest(
        name=name,
        kind="single",
        native_scale=scale,
        tile=TileGeometry(tile=tile, overlap=overlap, graph_scale=scale, size_multiple=8),
    )
    write_manifest(root / name, m)
    return root


@dataclass
class ServerProcess(BaseServer):
    """A real `gendr-serve` process on 127.0.0.1 (GENDR_BACKEND=fake, engine delay set by the caller)."""

    env: dict[str, str] = field(default_factory=dict)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_server(
    repo: Path,
    log: Path,
    *,
    delay_s: float = 0.0,
    env_overrides: dict[str, str | None] | None = None,
    **settings: object,
) -> ServerProcess:
    """Start the fake-backend server with GENDR_<KEY>=value settings; returns once /readyz is 200.

    `env_overrides`: other variables to set (None: remove), e.g. {"MALLOC_ARENA_MAX": None}.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENDR_")}
    env.update(
        {
            "GENDR_MODEL_REPOSITORY": str(repo),
            "GENDR_BACKEND": "fake",
            "GENDR_FAKE_DELAY_S": str(delay_s),
            "PYTHONUNBUFFERED": "1",
            **DEPLOYED_ALLOCATOR,  # as in the Dockerfile, compose and k8s
        }
    )
    env.update({f"GENDR_{k.upper()}": str(v) for k, v in settings.items()})
    for k, v in (env_overrides or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*_command(), "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    srv = ServerProcess(proc, port, log, env)
    end = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{srv.url}/readyz", timeout=2).status_code == 200:
                return srv
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, log.read_text()
        time.sleep(0.05)


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send bytes, read until the server closes (or `timeout`); (response, closed by the server)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        resp = b""
        try:
            while chunk := s.recv(65536):
                resp += chunk
        except TimeoutError:
            return resp, False
        except OSError:
            pass
        return resp, True


def status_of(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1]) if resp.startswith(b"HTTP/1.1 ") else 0


def json_body(resp: bytes) -> dict[str, object]:
    import json

    head, _, body = resp.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return json.loads(body)


# --- images ------------------------------------------------------------------------------------


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def encode(arr: np.ndarray | Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg_with_size(width: int, height: int, src: bytes | None = None) -> bytes:
    """A small valid JPEG whose frame header is patched to claim width×height (data stays 56×48)."""
    data = bytearray(src or encode(noise(48, 56), "JPEG", quality=90))
    i = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


def jpeg_app_padding(jpeg: bytes, n_bytes: int) -> bytes:
    """Insert APP15 segments (metadata) totalling ~n_bytes after SOI: padding that costs the client bytes."""
    seg = b"\xff\xef" + struct.pack(">H", 65535) + b"\0" * 65533
    k, rest = divmod(n_bytes, len(seg))
    tail = b"\xff\xef" + struct.pack(">H", rest + 2) + b"\0" * rest if rest else b""
    return jpeg[:2] + seg * k + tail + jpeg[2:]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_with_chunks(png: bytes, *chunks: bytes) -> bytes:
    """Insert chunks right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    return png[:33] + b"".join(chunks) + png[33:]


def png_declaring(width: int, height: int, src: bytes) -> bytes:
    """`src` PNG with its IHDR patched to width×height (and a fixed CRC): IDAT far too short."""
    ihdr = bytearray(src[16:29])
    struct.pack_into(">II", ihdr, 0, width, height)
    return src[:8] + png_chunk(b"IHDR", bytes(ihdr)) + src[33:]


def engine_calls(client: object) -> int:
    """Engine calls made so far by the fake backend of the in-process app behind a TestClient."""
    models = client.app.state.gendr.runtime.models.values()  # type: ignore[attr-defined]
    return sum(len(m.backend.calls) for m in models)
