"""Set-up shared by benchmarks/default_model_speed.py and benchmarks/cpu_efficiency.py: the machine,
real photos, the model entry and its raw backend, and a real `gendr-serve` process to time.

The server runs on 127.0.0.1 at a free port with the ONNX Runtime CPU backend (fp32), started in its
own session so a SIGTERM reaches it alone; its CPU seconds are read from /proc.
"""

from __future__ import annotations

import io
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT
from _common import machine as common_machine

MODEL = "realesrgan-x4plus"


def cpu_model() -> str:
    """lscpu's model name (benchmarks/_common.py reads it)."""
    return str(common_machine()["cpu"])


def machine() -> dict[str, Any]:
    from service.backends.base import available_cpus

    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    import onnxruntime

    return {
        "cpu": cpu_model(),
        "cores": available_cpus(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def photos(names: list[str]) -> list[tuple[str, np.ndarray]]:
    """Real photos bundled in scikit-image and scikit-learn (no download)."""
    out = []
    for n in names:
        if n in ("china", "flower"):
            from sklearn.datasets import load_sample_image

            img = load_sample_image(f"{n}.jpg")
        else:
            from skimage import data

            img = getattr(data, n)()
        out.append((n, np.ascontiguousarray(img[..., :3])))
    return out


def load_backend(model_dir: Path, max_batch: int, threads: int = 0) -> Any:
    from service.backends.onnxruntime import OnnxRuntimeBackend
    from service.manifest import read_manifest

    manifest = read_manifest(model_dir, verify=True)
    backend = OnnxRuntimeBackend(
        manifest,
        model_dir,
        provider="cpu",
        precision="fp32",
        instances=1,
        intra_op_threads=threads,
        max_batch=max_batch,
    )
    backend.load()
    return backend


def ensure_model(
    model_dir: Path,
    tile: int | None = None,
    overlap: int | None = None,
    cache: Path | None = None,
    build: bool = False,
) -> Path:
    from service.manifest import MANIFEST_FILE

    if build or tile is not None:
        from engine_build.commands.sr.cli import build_default

        build_default(
            model_dir.parent,
            name=model_dir.name,
            cache_dir=cache,
            tile=tile,
            overlap=overlap,
            precisions=("fp32",),
            check=False,
        )
    if not (model_dir / MANIFEST_FILE).is_file():
        sys.exit(
            f"{model_dir}: no model here; run `gendr-build default --out {model_dir.parent}` first "
            "(or pass --build)"
        )
    return model_dir


# ---------------------------------------------------------------------------------------------
# A gendr-serve process
# ---------------------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir: Path, port: int, max_batch: int, threads: int, log_path: Path
) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        {
            "GENDR_MODEL_REPOSITORY": str(model_dir.parent.resolve()),
            "GENDR_MODELS": model_dir.name,
            "GENDR_BACKEND": "onnxruntime-cpu",
            "GENDR_PRECISION": "fp32",
            "GENDR_MAX_BATCH": str(max_batch),
            "GENDR_INSTANCES_PER_DEVICE": "1",
            "GENDR_INTRA_OP_THREADS": str(threads),
            "GENDR_DEFAULT_DEADLINE_S": "600",
        }
    )
    exe = Path(sys.executable).with_name("gendr-serve")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"]
    log = log_path.open("wb")
    return subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True
    )


def wait_ready(client: Any, proc: subprocess.Popen, timeout: float, log_path: Path) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"gendr-serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if client.get("/readyz").status_code == 200:
                return time.perf_counter() - t0
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    sys.exit(f"gendr-serve not ready after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG", compress_level=1)
    return buf.getvalue()
