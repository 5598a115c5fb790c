"""A backend with no model, for tests and for exercising the batcher's failure handling.

Its output is the input tile upscaled by nearest neighbour, so a stitched request equals the
nearest-neighbour upscale of its own (resized, padded) input exactly: any tile that lands in the
wrong request or place shows. Delays, failures, hangs and malformed outputs are configured on a
mutable `FakeBehaviour` that tests may change while requests run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.backends.base import BackendInfo, Timings, dynamic_sample_shapes
from service.backends.memory import MemoryFit, measure
from service.manifest import Manifest
from service.settings import Settings


class FakeEngineError(RuntimeError):
    """The failure a FakeBehaviour injects."""


@dataclass
class FakeBehaviour:
    delay_s: float = 0.0  # per call
    per_tile_s: float = 0.0  # added per primary tile's worth of pixels in the batch (a + b·n cost model)
    fail_if: Callable[[int, np.ndarray], bool] | None = None  # (instance, batch) → raise FakeEngineError
    fail_instances: set[int] = field(default_factory=set)  # these instances always fail
    fail_next: int = 0  # the next N calls (any instance) fail
    hang: threading.Event | None = None  # while set, calls block until it is cleared (or released)
    wrong_count: bool = False  # return one tile too few
    wrong_shape: bool = False  # return tiles of the input size instead of the output size
    # Memory model of a whole-image call (the cap test): fixed + per_pixel × input pixels, of `available`.
    memory_per_pixel: float = 0.0
    memory_fixed: float = 0.0
    memory_available: int = 0


@dataclass
class ModelMemory:
    """A memory probe that reports the fake's memory model for the call it wraps."""

    behaviour: FakeBehaviour
    last_pixels: int = 0
    source: str = "model"

    def available(self) -> int:
        return self.behaviour.memory_available

    def peak(self, run: Callable[[], object]) -> int:
        run()
        b = self.behaviour
        return int(b.memory_fixed + b.memory_per_pixel * self.last_pixels)


class FakeBackend:
    def __init__(
        self,
        manifest: Manifest,
        model_dir: Path | str = ".",
        *,
        instances: int = 1,
        max_batch: int = 4,
        batch_sizes: tuple[int, ...] | None = None,
        scale: int | None = None,
        behaviour: FakeBehaviour | None = None,
        loaded_batch_sizes: tuple[int, ...] | None = None,
        tiles: tuple[int, ...] = (),
        dynamic: bool = False,
        max_call_pixels: int = 65_536,
    ) -> None:
        self.manifest = manifest
        self.model_dir = Path(model_dir)
        self.scale = scale or manifest.tile.graph_scale
        if self.scale != manifest.tile.graph_scale:
            raise ValueError(
                f"fake scale {self.scale} differs from the manifest's graph scale {manifest.tile.graph_scale}"
            )
        self.instances = instances
        self.batch_sizes = tuple(sorted(batch_sizes)) if batch_sizes else tuple(range(1, max_batch + 1))
        self.behaviour = behaviour or FakeBehaviour()
        self.tiles = tuple(sorted({manifest.tile.tile, *tiles}))
        self.dynamic = dynamic
        self.max_call_pixels = max_call_pixels
        self.calls: list[tuple[int, int]] = []  # (instance, batch size), in call order
        self.shapes: list[tuple[int, int, int]] = []  # (batch, height, width), in call order
        self.max_concurrency = 0
        self._active = 0
        self._lock = threading.Lock()
        self._release = threading.Event()  # set by close(): unblocks hung calls
        self._loaded = False
        # Like TensorRT: the sizes an engine really serves are known only once it is loaded.
        self._loaded_batch_sizes = tuple(sorted(loaded_batch_sizes)) if loaded_batch_sizes else None
        self.whole_image_memory: MemoryFit | None = None  # from the memory model, at warm-up
        self._memory: ModelMemory | None = None

    @classmethod
    def from_settings(cls, name: str, manifest: Manifest, model_dir: Path, settings: Settings) -> FakeBackend:
        behaviour = FakeBehaviour(delay_s=settings.fake_delay_s, per_tile_s=settings.fake_per_tile_s)
        return cls(
            manifest,
            model_dir,
            instances=settings.instances(),
            max_batch=settings.max_batch,
            behaviour=behaviour,
            tiles=tuple(settings.fake_tiles),
            dynamic=settings.fake_dynamic,
            max_call_pixels=settings.whole_image_max_pixels,
        )

    def load(self) -> None:
        if self._loaded_batch_sizes is not None:
            self.batch_sizes = self._loaded_batch_sizes
        self._loaded = True

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            name="fake",
            device="cpu",
            precision="fp32",
            engine_key="fake",
            batch_sizes=self.batch_sizes,
            instances=self.instances,
            tiles=self.tiles,
            dynamic=self.dynamic,
        )

    def cost_s(self, batch: int, h: int, w: int) -> float:
        """The cost model: a + b·(pixels / primary tile area)."""
        b, t = self.behaviour, self.manifest.tile.tile
        return b.delay_s + b.per_tile_s * batch * h * w / (t * t)

    def warmup(self) -> Timings:
        shapes = [(t, t, n) for t in self.tiles for n in self.batch_sizes]
        if self.dynamic:
            dyn = dynamic_sample_shapes(self.manifest, self.max_call_pixels)
            shapes += [(h, w, 1) for h, w in dyn]
            if self.behaviour.memory_per_pixel > 0:
                self._memory = ModelMemory(self.behaviour)
                self.whole_image_memory = measure(self._memory, self._run_grey, dyn)
        return {(h, w, n): self.cost_s(n, h, w) for h, w, n in shapes}

    def _run_grey(self, h: int, w: int) -> object:
        return self.infer(0, np.full((1, h, w, 3), 128, dtype=np.uint8))

    def infer(self, instance: int, batch: np.ndarray) -> np.ndarray:
        if not self._loaded:
            raise RuntimeError("fake backend used before load()")
        if not 0 <= instance < self.instances:
            raise ValueError(f"no instance {instance}")
        n, h, w = batch.shape[:3]
        if h == w and h in self.tiles:
            if n not in self.batch_sizes:
                raise ValueError(f"batch of {n} not in {self.batch_sizes}")
        elif (
            not self.dynamic
            or n != 1
            or h % self.manifest.tile.size_multiple
            or w % self.manifest.tile.size_multiple
        ):
            raise ValueError(
                f"a {n}×{h}×{w} batch: this fake runs tiles {self.tiles} (dynamic: {self.dynamic})"
            )
        with self._lock:
            self._active += 1
            self.max_concurrency = max(self.max_concurrency, self._active)
            self.calls.append((instance, n))
            self.shapes.append((n, h, w))
            b = self.behaviour
            fail = b.fail_next > 0 or instance in b.fail_instances
            if b.fail_next > 0:
                b.fail_next -= 1
        try:
            hang = b.hang
            while hang is not None and hang.is_set() and not self._release.is_set():
                time.sleep(0.005)
            wait = self.cost_s(n, h, w)
            if wait > 0:
                time.sleep(wait)
            if fail or (b.fail_if is not None and b.fail_if(instance, batch)):
                raise FakeEngineError(f"injected failure on instance {instance}")
            if self._memory is not None:
                self._memory.last_pixels = h * w
            s = 1 if b.wrong_shape else self.scale
            out = batch.repeat(s, axis=1).repeat(s, axis=2) if s > 1 else batch.copy()
            return out[:-1] if b.wrong_count else out
        finally:
            with self._lock:
                self._active -= 1

    def input_buffer(self, instance: int, n: int, tile: int) -> np.ndarray | None:
        return None  # the batcher's own buffer will do: infer() takes any host array

    def healthy(self) -> bool:
        return self._loaded

    def close(self) -> None:
        self._release.set()
        self._loaded = False
