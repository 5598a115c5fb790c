"""The narrow protocol every backend implements, and the small helpers they share.

A backend serves one model (one manifest) on one device. It owns `instances` engine instances
(ORT sessions / TensorRT execution contexts / torch streams) that share one copy of the weights;
the batcher calls `infer(instance, batch)` from one worker per instance, never two calls on the
same instance at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from service.hardware import available_cpus
from service.manifest import Artifact, Manifest, ManifestError, verify_artifact

__all__ = ["available_cpus"]  # re-exported: backends size their thread pools with it


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (package, device, driver, memory, provider); says which and why.
    The runtime may fall back to the next backend: another one may well run on this machine."""


class IntegrityError(ManifestError):
    """An artifact is not what the manifest says (sha256, size, a path or link out of the model folder,
    missing, a graph whose I/O differs). The repository's fault, not the machine's: the model is refused,
    never served by another backend (one that reads other files would serve a tampered model)."""

    def __init__(self, model: str, file: str, check: str, detail: str) -> None:
        for prefix in (f"{model}: ", "artifact ", f"{file} "):  # verify_artifact's message names them
            detail = detail.removeprefix(prefix)
        super().__init__(f"{model}: {file} failed the {check} check: {detail}")
        self.model, self.file, self.check = model, file, check


def _failed_check(model_dir: Path, art: Artifact, err: ManifestError) -> str:
    """Which of verify_artifact's checks `err` is: path (a link out of the folder), missing, open, size,
    sha256 — read from the file itself, not from the message."""
    try:
        real = (Path(model_dir) / art.path).resolve()
        if not real.is_relative_to(Path(model_dir).resolve()):
            return "path"
        if not real.is_file():
            return "missing"
        if str(err).startswith("cannot open artifact"):
            return "open"
        return "size" if real.stat().st_size != art.size else "sha256"
    except (OSError, RuntimeError):  # a link loop, a file swapped while looking
        return "open"


def verify(model_dir: Path, art: Artifact, model: str) -> Path:
    """verify_artifact, its failure raised as an IntegrityError naming the file and the check."""
    try:
        return verify_artifact(model_dir, art)
    except ManifestError as e:
        raise IntegrityError(model, art.path, _failed_check(model_dir, art, e), str(e)) from e


@dataclass(frozen=True)
class BackendInfo:
    name: str  # "onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt", "torch", "fake"
    device: str  # "cpu", "cuda:0 (NVIDIA H100 80GB HBM3, sm_90)"
    precision: str  # "fp32", "fp16", "int8", "fp8", "bf16"
    engine_key: str  # sha256 of the graph/plan being run (first 16 hex chars are enough to show)
    batch_sizes: tuple[int, ...]  # batch sizes the engine runs; the batcher pads up to the next one
    instances: int
    tiles: tuple[int, ...] = ()  # static square input tile edges served (shape buckets); () = the primary
    dynamic: bool = False  # also runs any H×W (multiples of the graph's size_multiple) at batch 1
    extra: dict[str, str] = field(default_factory=dict)


#: Measured seconds per engine call, keyed by (height, width, batch) of the input: the cost table the
#: planner chooses shapes with (service/scheduling/costs.py).
Timings = dict[tuple[int, int, int], float]


@runtime_checkable
class Backend(Protocol):
    manifest: Manifest
    model_dir: Path

    @property
    def info(self) -> BackendInfo:
        """Known before load() (selection and /v1/models need it without touching the engine)."""

    def load(self) -> None:
        """Read and verify artifacts, create engine instances. Blocking; run off the event loop."""

    def warmup(self) -> Timings:
        """Run every shape and batch size on every instance so the first request pays no compile cost.

        Returns seconds per call for every (height, width, batch) served — the measured cost table
        the planner picks tile shapes by and the batcher's throughput estimate starts from.
        """

    def infer(self, instance: int, batch: np.ndarray) -> np.ndarray:
        """uint8 [B, h, w, 3] → uint8 [B, h·s, w·s, 3]; one caller per instance. Either h == w in
        info.tiles and B in info.batch_sizes, or info.dynamic and B == 1 (a whole image).

        The result must be an array the caller owns (not a buffer the next call overwrites).
        """

    def input_buffer(self, instance: int, n: int, tile: int) -> np.ndarray | None:
        """A writable uint8 [n, tile, tile, 3] host buffer the batcher gathers tiles into before infer()
        (TensorRT: its pinned input, so the copy into it is the only one), or None: the batcher then
        uses a buffer of its own. A backend recognises its own buffer in infer() and skips a copy."""

    def healthy(self) -> bool: ...

    def close(self) -> None: ...


def tile_shapes(manifest: Manifest) -> tuple[int, int]:
    """(input tile edge, output tile edge) of the model's graph."""
    return manifest.tile.tile, manifest.tile.out_tile


def served_tiles(info: BackendInfo, manifest: Manifest) -> tuple[int, ...]:
    """The static tile edges a backend serves, smallest first (the primary tile when it names none)."""
    return tuple(sorted(info.tiles)) if info.tiles else (manifest.tile.tile,)


def dynamic_sample_shapes(manifest: Manifest, max_pixels: int) -> tuple[tuple[int, int], ...]:
    """Whole-image sizes to time a dynamic graph at: two squares, so a line a + b·pixels fits them."""
    m, t = manifest.tile.size_multiple, manifest.tile.tile
    big = max(t, min(2 * t, math.isqrt(max(max_pixels, t * t))) // m * m)
    return ((t, t), (big, big)) if big > t else ((t, t),)


def timed_warmup(
    backend: Backend,
    instances: int,
    batch_sizes: tuple[int, ...],
    tiles: tuple[int, ...] | None = None,
    dynamic_shapes: tuple[tuple[int, int], ...] = (),
) -> Timings:
    """Run every (tile, batch) — and every dynamic shape at batch 1 — on every instance with a mid-grey
    batch, then time one more call of each on instance 0 (first calls pay allocations and compiles)."""
    shapes = [(t, t, b) for t in tiles or (backend.manifest.tile.tile,) for b in batch_sizes]
    shapes += [(h, w, 1) for h, w in dynamic_shapes]
    timings: Timings = {}
    for h, w, b in shapes:
        x = np.full((b, h, w, 3), 128, dtype=np.uint8)
        for inst in range(instances):
            check_output(backend.manifest, x, backend.infer(inst, x))
        t0 = time.perf_counter()
        backend.infer(0, x)
        timings[(h, w, b)] = time.perf_counter() - t0
    return timings


def check_output(manifest: Manifest, batch: np.ndarray, out: object) -> np.ndarray:
    """Outputs must match inputs in count and shape: a wrong engine or a bug must not reach a user."""
    g = manifest.tile.graph_scale
    if not isinstance(out, np.ndarray):
        raise RuntimeError(f"engine returned {type(out).__name__}, expected a numpy array")
    expected = (batch.shape[0], batch.shape[1] * g, batch.shape[2] * g, 3)
    if out.shape != expected:
        raise RuntimeError(
            f"engine returned shape {tuple(out.shape)} for a batch of {batch.shape[0]}, expected {expected}"
        )
    if out.dtype != np.uint8:
        raise RuntimeError(f"engine returned {out.dtype}, expected uint8")
    return out


class TileFunction:
    """A loaded backend as a plain `uint8 [B,t,t,3] → uint8 [B,T,T,3]` function of any batch size.

    The build tools (verify, parity checks, the reference CLI, the GPU check) run every engine through
    this, so what they measure is the code that serves. Batches are split into the sizes the engine
    runs; the last chunk is padded up (by repeating its last tile) and trimmed.
    """

    def __init__(self, backend: Backend, instance: int = 0) -> None:
        self.backend = backend
        self.instance = instance
        backend.load()
        self.sizes = tuple(sorted(backend.info.batch_sizes))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch)
        out: list[np.ndarray] = []
        i, n = 0, batch.shape[0]
        while i < n:
            k = min(n - i, self.sizes[-1])
            bs = next(b for b in self.sizes if b >= k)
            chunk = batch[i : i + k]
            if bs > k:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - k, axis=0)])
            out.append(self.backend.infer(self.instance, chunk)[:k])
            i += k
        return np.concatenate(out) if len(out) != 1 else out[0]

    def close(self) -> None:
        self.backend.close()
