"""A real redis-server (Debian's) for the job layer's tests: a free loopback port, AOF on, its own folder."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from live_server import free_port

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass
class RedisServer:
    dir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--maxmemory-policy", "noeviction", "--daemonize", "no", "--protected-mode", "yes",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as c:
                c.sendall(b"PING\r\n")
                if c.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        """SIGTERM: Redis flushes its AOF and exits (what a pod restart does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[RedisServer]:
    if not Path(REDIS).exists():
        pytest.skip("redis-server is not installed (.ci/install-system-packages.sh installs it)")
    tmp.mkdir(parents=True, exist_ok=True)
    srv = RedisServer(tmp, free_port())
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
