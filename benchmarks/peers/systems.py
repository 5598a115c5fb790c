"""The five systems: how each is installed, started, stopped and spoken to.

Worker counts follow each project's own guidance for one device on a 2-core machine (README):
one model worker / replica / instance per device for the frameworks with their own batcher, and
`uvicorn --workers <cores>` for the hand-written FastAPI app (no batcher; FastAPI's deployment docs
run several worker processes to use several cores and leave the count to the user: one per core
here). Every peer shares one "device" through the engine's flock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import procmon

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SERVERS = HERE / "servers"
COMMON_PACKAGES = ("numpy", "onnxruntime", "pillow")
MAX_BATCH = 4  # gendr-serve's GENDR_MAX_BATCH default; PyTriton's ModelConfig default too
BATCH_TIMEOUT_S = 0.01  # Ray's batch_wait_timeout_s default; LitServe's docs example


@dataclass(frozen=True)
class System:
    name: str
    key: str  # venv suffix (.venv-peers-<key>); "ours" runs from the project's .venv
    packages: tuple[str, ...]
    imports: tuple[str, ...]  # modules that must import in the venv
    workers: int
    workers_note: str
    client_kind: str = "multipart"
    batching: str = ""

    @property
    def venv(self) -> Path:
        return ROOT / ".venv" if self.key == "ours" else ROOT / f".venv-peers-{self.key}"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def command(self, port: int) -> list[str]:
        py = str(self.python)
        if self.key == "ours":
            return [str(self.venv / "bin" / "gendr-serve"), "--host", "127.0.0.1", "--port", str(port)]
        if self.key == "fastapi":
            return [
                py, "-m", "uvicorn", "--app-dir", str(SERVERS), "fastapi_app:app",
                "--host", "127.0.0.1", "--port", str(port), "--workers", str(self.workers),
                "--log-level", "warning",
            ]  # fmt: skip
        script = {"litserve": "litserve_app.py", "ray": "ray_app.py", "pytriton": "triton_app.py"}[self.key]
        return [py, str(SERVERS / script)]


def all_systems(cores: int) -> list[System]:
    return [
        System(
            "gendr-serve", "ours", (), ("service",), 1,
            "1 engine instance (GENDR_INSTANCES_PER_DEVICE=1), image_workers 2 threads",
            batching=f"tile batcher, max batch {MAX_BATCH}, 2 ms queue delay (defaults)",
        ),
        System(
            "LitServe", "litserve", ("litserve", "python-multipart"), ("litserve", "multipart"), 1,
            "LitServer(accelerator='cpu', devices=1, workers_per_device=1): one worker per device",
            batching=f"LitAPI(max_batch_size={MAX_BATCH}, batch_timeout={BATCH_TIMEOUT_S})",
        ),
        System(
            "Ray Serve", "ray", ("ray[serve]", "python-multipart"), ("ray.serve", "multipart"), 1,
            "num_replicas=1 (one replica per device), max_ongoing_requests=2×max_batch",
            batching=f"@serve.batch(max_batch_size={MAX_BATCH}, batch_wait_timeout_s={BATCH_TIMEOUT_S})",
        ),
        System(
            "Triton (PyTriton)", "pytriton", ("nvidia-pytriton",), ("pytriton",), 1,
            "one model instance (one inference callable) per device",
            client_kind="triton",
            batching=f"@batch, dynamic batcher max_batch_size={MAX_BATCH}, "
            f"max_queue_delay {int(BATCH_TIMEOUT_S * 1e6)} µs",
        ),
        System(
            "FastAPI", "fastapi", ("fastapi", "uvicorn", "python-multipart"),
            ("fastapi", "uvicorn", "multipart"),
            cores, f"uvicorn --workers {cores} (one per core), sync route on Starlette's thread pool",
            batching="none (engine call under the device lock)",
        ),
    ]  # fmt: skip


def base_python() -> Path:
    """The interpreter the project's .venv was made from (peers get the same Python)."""
    v = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return Path(sys.base_prefix) / "bin" / v


def venv_ok(s: System) -> bool:
    if not s.python.is_file():
        return False
    probe = "import " + ", ".join((*s.imports, "numpy", "onnxruntime", "PIL"))
    return subprocess.run([str(s.python), "-c", probe], capture_output=True).returncode == 0


def ensure_venv(s: System, log: Path) -> dict[str, object] | None:
    """Create / complete the peer's venv from PyPI; returns install time and size, None if already fine."""
    if s.key == "ours" or venv_ok(s):
        return None
    t0 = time.monotonic()
    if not s.python.is_file():
        subprocess.run([str(base_python()), "-m", "venv", str(s.venv)], check=True)
    with log.open("w") as f:
        r = subprocess.run(
            [str(s.python), "-m", "pip", "install", *s.packages, *COMMON_PACKAGES],
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    if r.returncode != 0 or not venv_ok(s):
        raise RuntimeError(f"installing {s.name} into {s.venv} failed; see {log}")
    return {"install_s": round(time.monotonic() - t0, 1), "size_mb": dir_mb(s.venv)}


def dir_mb(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return round(total / 1e6, 1)


@dataclass
class Running:
    system: System
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    seen: set[int] = field(default_factory=set)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGINT (every server's clean shutdown), then SIGTERM, then SIGKILL what is left of the tree."""
        self.seen.update(procmon.tree(self.proc.pid))
        for sig, wait in ((signal.SIGINT, 15.0), (signal.SIGTERM, 5.0)):
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(wait)
                except subprocess.TimeoutExpired:
                    continue
            break
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_exists(p) for p in self.seen):
            time.sleep(0.2)  # Ray's and Triton's helpers exit once their parent has gone
        for pid in self.seen:  # only processes this server started
            if _exists(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def _exists(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def start(s: System, port: int, env_extra: dict[str, str], log: Path) -> Running:
    env = {**os.environ, **env_extra, "PEER_PORT": str(port), "PEER_WORKERS": str(s.workers)}
    env.update(
        PYTHONPATH=str(HERE),
        PEER_MAX_BATCH=str(MAX_BATCH),
        PEER_BATCH_TIMEOUT_S=str(BATCH_TIMEOUT_S),
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    if s.key == "pytriton":
        # PyTriton's bundled tritonserver loads its Python stub against the interpreter's own libpython;
        # without this it finds the system's libpython (another build) and crashes offline.
        env["LD_LIBRARY_PATH"] = ":".join(
            p for p in (str(sysconfig.get_config_var("LIBDIR")), env.get("LD_LIBRARY_PATH", "")) if p
        )
    f = log.open("wb")
    proc = subprocess.Popen(s.command(port), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    f.close()
    return Running(s, proc, port, log)
