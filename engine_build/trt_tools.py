"""TensorRT build helpers: the import (stubs refused), build progress bars, timing cache, layer report."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from engine_build.gpu_targets import TrtBuildError
from service.hardware import tensorrt_module

log = logging.getLogger(__name__)

ENGINES_DIR = "engines"


def import_tensorrt() -> Any:
    trt = tensorrt_module()  # None for a missing install and for tensorrt-stubs alone
    if trt is None:
        raise TrtBuildError(
            "TensorRT is not installed (or only its type stubs are); install it on a GPU machine: "
            "pip install 'gendr-serve[trt]'"
        )
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise TrtBuildError(f"TensorRT {trt.__version__} is too old: the build uses the TensorRT 10/11 API")
    return trt


def make_progress_monitor(trt: Any, enabled: bool = True) -> Any:
    """An IProgressMonitor that shows each builder phase as a (nested) tqdm bar."""
    from tqdm import tqdm

    class TqdmProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._bars: dict[str, Any] = {}
            self._depth: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = 0 if not parent_phase else self._depth.get(parent_phase, 0) + 1
                self._depth[phase_name] = depth
                self._bars[phase_name] = tqdm(
                    total=num_steps,
                    desc="  " * depth + phase_name,
                    position=depth,
                    leave=depth == 0,
                    disable=not enabled,
                    dynamic_ncols=True,
                )

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                bar = self._bars.get(phase_name)
                if bar is not None:
                    bar.update(max(0, step + 1 - bar.n))
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                self._depth.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return TqdmProgressMonitor()


def timing_cache_path(model_dir: Path, sm: str, trt_version: str) -> Path:
    """One cache per GPU architecture and TensorRT version: another version rejects (or misreads) it."""
    return model_dir / ENGINES_DIR / sm / f"timing-trt{trt_version}.cache"


def load_timing_cache(config: Any, path: Path) -> tuple[Any, bool]:
    """(cache, reused): the file's cache, or an empty one when it is missing, unreadable or rejected."""
    data = b""
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError as e:
        log.warning("timing cache %s unreadable (%s); starting a new one", path, e)
    if data:
        try:
            cache = config.create_timing_cache(data)
            if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
                return cache, True
        except Exception as e:  # TensorRT raises on a corrupt or foreign cache
            log.warning("timing cache %s rejected (%s)", path, e)
        log.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", path)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    return cache, False


#: substrings of the inspector's "Format/Datatype" → one label (UInt8 before Int8: it contains it)
_DTYPE_TOKENS = (
    ("fp8", "FP8"),
    ("uint8", "UInt8"),
    ("int8", "Int8"),
    ("bf16", "BF16"),
    ("half", "Half"),
    ("fp16", "Half"),
    ("float", "Float"),
    ("fp32", "Float"),
    ("int32", "Int32"),
)


def layer_precisions(engine_info_json: str) -> dict[str, int]:
    """Layers per output data type, from the engine inspector's JSON (DETAILED profiling verbosity)."""
    import json

    counts: dict[str, int] = {}
    try:
        layers = json.loads(engine_info_json).get("Layers", [])
    except (ValueError, AttributeError):
        return counts
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        outs = layer.get("Outputs") or [{}]
        fmt = str(outs[0].get("Format/Datatype", "unknown")) if isinstance(outs[0], dict) else "unknown"
        low = fmt.lower()
        kind = next((label for token, label in _DTYPE_TOKENS if token in low), fmt)
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))
