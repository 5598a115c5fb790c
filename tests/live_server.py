"""A real `gendr-serve` process (the CLI, uvicorn, SIGTERM drain) on the fake backend, for the client,
browser and Prometheus tests. (A uniquely named module at tests/, importable from every test folder.)

Run as a script, this file is the server: it adds one test control to the fake backend and then runs
`service.cli.main()`. GENDR_TEST_GATE names a file holding how many more engine calls may start; while
it is 0 calls wait, and without the file they run freely. So a test holds work in the queue, or lets
exactly n batches through, for as long as it wants: no test depends on the machine's speed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

GATE_ENV = "GENDR_TEST_GATE"


def write_fake_model(repo: Path, name: str = "fake", tile: int = 64, overlap: int = 16) -> Path:
    """A GenDR-kind manifest with no artifacts (×4 native, graph scale 1): what the fake backend needs."""
    from service.manifest import Manifest, PipelineParams, TileGeometry, write_manifest

    m = Manifest(
        name=name,
        kind="gendr",
        native_scale=4,
        tile=TileGeometry(tile=tile, overlap=overlap, graph_scale=1, size_multiple=8),
        pipeline=PipelineParams(),
    )
    write_manifest(repo / name, m)
    return repo


def photo_png(width: int, name: str = "astronaut") -> bytes:
    """A real photo (scikit-image's samples) resized to width × width, as PNG."""
    import io

    from PIL import Image
    from skimage import data

    im = Image.fromarray(getattr(data, name)()[..., :3]).resize((width, width), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A real `gendr-serve` process on 127.0.0.1, and how tests read it (its metrics, its log)."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        import httpx
        from wire_formats import metric

        return metric(httpx.get(f"{self.url}/metrics", timeout=10).text, name, **labels)

    def wait_metric(self, name: str, pred: object, timeout: float = 20, **labels: str) -> float:
        end = time.monotonic() + timeout
        while True:
            v = self.metric(name, **labels)
            if pred(v):  # type: ignore[operator]
                return v
            assert time.monotonic() < end, f"{name}{labels} stuck at {v}"
            time.sleep(0.02)


@dataclass
class LiveServer(ServerProcess):
    gate: Path

    def hold(self, allow: int = 0) -> None:
        """From now on engine calls wait (tiles stay queued), except `allow` more, until `release()`."""
        tmp = self.gate.with_suffix(".tmp")
        tmp.write_text(str(allow))
        os.replace(tmp, self.gate)

    def release(self) -> None:
        self.gate.unlink(missing_ok=True)

    def wait_for(self, pred: object, what: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while not pred():  # type: ignore[operator]
            assert time.monotonic() < end, f"{what}; server log:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.02)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM (the drain) and wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@contextlib.contextmanager
def live_server(workdir: Path, port: int | None = None, **env: str) -> Iterator[LiveServer]:
    """Start the server (GENDR_* settings in `env`), wait until /readyz is 200, stop it afterwards."""
    import httpx

    workdir.mkdir(parents=True, exist_ok=True)
    repo = workdir / "models"
    if not repo.exists():
        write_fake_model(repo)
    port = port or free_port()
    log = workdir / f"gendr-serve-{port}.log"
    gate = workdir / "gate"
    full = {k: v for k, v in os.environ.items() if not k.startswith("GENDR_")}
    full.update(
        {
            "GENDR_MODEL_REPOSITORY": str(repo),
            "GENDR_BACKEND": "fake",
            "GENDR_JOBS_DIR": str(workdir / "jobs"),
            "GENDR_DRAIN_TIMEOUT_S": "20",
            GATE_ENV: str(gate),
            "PYTHONUNBUFFERED": "1",
        }
    )
    full.update(env)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"],
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    srv = LiveServer(proc, port, log, gate)
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"{srv.url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        srv.wait_for(ready, "the server never became ready", timeout=90)
        yield srv
    finally:
        srv.release()
        if proc.poll() is None:
            srv.terminate()


def _serve() -> int:
    """The server process: the fake backend's engine calls wait while the gate file exists."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from service.backends.fake import FakeBackend
    from service.cli import main

    gate = Path(os.environ[GATE_ENV])
    infer = FakeBackend.infer
    lock = threading.Lock()

    def permitted() -> bool:
        with lock:
            try:
                left = int(gate.read_text() or 0)
            except (FileNotFoundError, ValueError):
                return True
            if left <= 0:
                return False
            tmp = gate.with_suffix(".srv")
            tmp.write_text(str(left - 1))
            os.replace(tmp, gate)
            return True

    def gated(self: FakeBackend, instance: int, batch: object) -> object:
        while not permitted() and not self._release.is_set():
            time.sleep(0.005)
        return infer(self, instance, batch)  # type: ignore[arg-type]

    FakeBackend.infer = gated  # type: ignore[method-assign]
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_serve())
