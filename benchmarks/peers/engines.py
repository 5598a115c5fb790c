"""The two engines every peer serves, importable by path from any peer's venv (numpy, onnxruntime, PIL only).

- `CostModelEngine`: one GPU as a cost model. A call on n input pixels sleeps `a + b·n/128²` seconds and
  returns the nearest-neighbour ×4 upscale. Calls are serialised across every process of a system by an
  `fcntl.flock` on one file, so a multi-worker peer shares one "GPU" exactly like our one instance does.
- `OnnxEngine`: a real ×4 CNN (SRVGGNetCompact) on ONNX Runtime CPU, the whole image in one call, with
  intra-op threads = cores. The same lock serialises calls (one device; two sessions racing for two
  cores would only oversubscribe them).

Both take and return uint8 HWC RGB arrays. `decode_png`/`encode_png` are the PNG I/O every peer uses,
with the PNG settings gendr-serve uses for `format=png` (Pillow, zlib level `PNG_LEVEL`).
"""

from __future__ import annotations

import fcntl
import io
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

#: gendr-serve's `GENDR_PNG_COMPRESS_LEVEL` default (service/settings.py); every system encodes with it.
PNG_LEVEL = 3
SCALE = 4
#: Cost model of one GPU call: A_S + B_S per 128² input pixels.
A_S = 0.015
B_S = 0.004
COST_TILE = 128


def cost_s(pixels: int, a: float = A_S, b: float = B_S) -> float:
    """Seconds one cost-model call on `pixels` input pixels takes."""
    return a + b * pixels / (COST_TILE * COST_TILE)


def upscale_nearest(rgb: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """Nearest-neighbour ×scale of an HWC image (what the fake backend returns, too)."""
    return np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)


def decode_png(data: bytes) -> np.ndarray:
    """Image bytes → uint8 HWC RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def encode_png(rgb: np.ndarray) -> bytes:
    """uint8 HWC RGB → PNG bytes, with gendr-serve's PNG settings."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


class DeviceLock:
    """One engine call at a time across every process *and thread* of a system.

    An flock belongs to the open file description, not to a thread: a second thread of the same
    process flocking the same descriptor gets the lock at once. So a thread lock comes first (the
    threads of one worker), then the flock (the other workers)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._threads = threading.Lock()

    def __enter__(self) -> DeviceLock:
        self._threads.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._threads.release()


class Engine(Protocol):
    name: str

    def __call__(self, rgb: np.ndarray) -> np.ndarray: ...


class CostModelEngine:
    """One GPU as a cost model: `a + b·pixels/128²` seconds per call, nearest-neighbour ×4 output."""

    name = "cost-model"

    def __init__(self, lock_path: str | os.PathLike[str], a: float = A_S, b: float = B_S) -> None:
        self.lock = DeviceLock(lock_path)
        self.a, self.b = a, b

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        with self.lock:
            time.sleep(cost_s(rgb.shape[0] * rgb.shape[1], self.a, self.b))
            return upscale_nearest(rgb)

    def many(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """A batch of differently-sized images: one call per image (a GPU call needs one shape)."""
        return [self(x) for x in images]


class OnnxEngine:
    """A dynamic-H/W ×4 ONNX graph (uint8 [1, H, W, 3] → uint8 [1, 4H, 4W, 3]) on ONNX Runtime CPU."""

    name = "onnx-cpu"

    def __init__(
        self, model_path: str | os.PathLike[str], lock_path: str | os.PathLike[str], threads: int = 0
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        opts.inter_op_num_threads = 1
        # as gendr-serve's sessions: sequential, no spinning (a multi-worker peer has several sessions)
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.lock = DeviceLock(lock_path)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        with self.lock:
            return self.session.run(None, {self.input: np.ascontiguousarray(rgb)[None]})[0][0]

    def many(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Images of different sizes cannot share a batch tensor: one call each."""
        return [self(x) for x in images]


def from_env() -> CostModelEngine | OnnxEngine:
    """The engine a peer server was started with: PEER_ENGINE=cost|onnx, PEER_LOCK, PEER_ONNX."""
    kind = os.environ.get("PEER_ENGINE", "cost")
    lock = os.environ["PEER_LOCK"]
    if kind == "cost":
        return CostModelEngine(lock)
    if kind == "onnx":
        return OnnxEngine(os.environ["PEER_ONNX"], lock)
    raise ValueError(f"PEER_ENGINE must be cost or onnx, got {kind!r}")
