"""Loading a model's backend down `auto`'s list — and when not to go down it.

- Fall back only from environmental failures (no GPU, driver, memory, a provider that does not load):
  another backend may well run on this machine. Each failure is logged as it happens, so the log reads
  first cause first; when nothing is left, the error raised lists them all, the first first.
- An integrity failure (`IntegrityError`: an artifact whose sha256, size or path does not match the
  manifest, a graph whose I/O differs) is the repository's fault, not the machine's: every backend reads
  the same folder, and one that reads other files (PyTorch from the checkpoint copy) would serve a model
  nobody vouched for. The model is refused: an ERROR naming the file and the check, `gendr_model_refused`.
- A GPU that was expected but not used is loud: with a GPU visible under `auto`, a model that ends up on
  the CPU (a provider that could not load its libraries, no GPU package) logs an ERROR with the reason
  and sets `gendr_backend_fallback`; with GENDR_BACKEND naming a GPU backend, start-up fails instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from service.backends.base import Backend, IntegrityError, Timings
from service.manifest import ManifestError
from service.metrics import Metrics

log = logging.getLogger(__name__)

#: The backends that run only on an NVIDIA GPU (GENDR_BACKEND naming one must never end on the CPU).
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-trt")

Fallback = tuple[str, Callable[[], Backend]]  # (selection reason, constructor)


class ModelRefused(ManifestError):
    """A model that must not be served: an integrity failure, or a GPU backend that was required."""


class NoBackendLoaded(RuntimeError):
    """Every backend on the list failed to load for environmental reasons; the message lists them all."""


@dataclass(frozen=True)
class GpuExpectation:
    """Why a GPU backend is expected for the models (empty: none is) and whether it is required."""

    why: str = ""
    required: bool = False


@dataclass
class Loaded:
    backend: Backend
    timings: Timings
    reason: str  # the selection reason of the backend that loaded, and what it fell back after
    failures: list[str] = field(default_factory=list)  # every failure on the way, first first
    fallback: str = ""  # why this model runs on the CPU although a GPU was expected ("" when it does not)


def _on_gpu(backend: Backend) -> bool:
    return backend.info.device.startswith("cuda")


def _close(backend: Backend) -> None:
    try:
        backend.close()
    except Exception as e:  # best effort: the next backend must still load
        log.debug("close after a failed load: %s", e)


def _refuse(model: str, e: IntegrityError, failures: list[str], metrics: Metrics) -> ModelRefused:
    metrics.model_refused.labels(model, e.file, e.check).set(1)
    after = f" (after: {'; '.join(failures)})" if failures else ""
    log.error("REFUSED, not served by any backend: %s%s", e, after)  # e names the model, file and check
    return ModelRefused(f"refused, not served by any backend: {e}")


def load_chain(
    model: str,
    backend: Backend,
    reason: str,
    fallbacks: list[Fallback],
    metrics: Metrics,
    gpu: GpuExpectation = GpuExpectation(),
) -> Loaded:
    """Load and warm `backend`, falling back down `fallbacks` (consumed) from environmental failures only."""
    failures: list[str] = []
    tried: list[str] = []  # names of the backends that failed
    first = reason
    while True:
        try:
            backend.load()
            timings = backend.warmup()
            break
        except IntegrityError as e:
            _close(backend)
            raise _refuse(model, e, failures, metrics) from e
        except Exception as e:
            tried.append(backend.info.name)
            failures.append(f"{tried[-1]} failed to load: {e}")
            _close(backend)
            if not fallbacks:
                if gpu.required:
                    log.error(
                        "%s: %s, and it failed to start (no fallback to the CPU): %s", model, gpu.why, e
                    )
                    raise ModelRefused(f"{model}: {gpu.why}, and it failed to start: {e}") from e
                if len(failures) == 1:
                    log.error("%s: %s", model, failures[0])
                    raise
                log.error("%s: no backend could load it: %s", model, "; ".join(failures))
                raise NoBackendLoaded(f"{model}: no backend could load it: {'; '.join(failures)}") from e
            log.warning("%s: %s; falling back", model, failures[-1])
            reason, make = fallbacks.pop(0)
            backend = make()
    if failures:
        reason = f"{reason}; fell back after: {'; '.join(failures)}"
    placement = backend.info.extra.get("placement")  # e.g. a plan served on another GPU product
    if placement:
        reason = f"{reason}; {placement}"
    loaded = Loaded(backend, timings, reason, failures)
    if gpu.why and not _on_gpu(backend):
        why = "; ".join(failures) if failures else f"selected {first}"
        loaded.fallback = f"{gpu.why}, but {model} runs on the CPU ({backend.info.name}): {why}"
        if gpu.required:
            _close(backend)
            log.error("%s: %s", model, loaded.fallback)
            raise ModelRefused(loaded.fallback)
        metrics.backend_fallback.labels(model, tried[0] if tried else "gpu", backend.info.name).set(1)
        log.error("%s: GPU FALLBACK: %s", model, loaded.fallback)
    return loaded
