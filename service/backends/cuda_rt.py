"""cuda-python's runtime API, checked: each call raises on a CUDA error instead of returning it."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np


class CudaRuntime:
    """Thin checked wrapper over cuda-python's runtime API (which returns (err, *values) tuples)."""

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart

    def __call__(self, fn: str, *args: Any) -> Any:
        res = getattr(self.rt, fn)(*args)
        err, rest = (res[0], res[1:]) if isinstance(res, tuple) else (res, ())
        if int(err) != 0:
            name = self.rt.cudaGetErrorName(err)[1]
            raise RuntimeError(f"{fn} failed: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else rest


def pinned_view(ptr: int, shape: tuple[int, ...]) -> np.ndarray:
    """A numpy view of pinned host memory (cudaMallocHost) that the batcher can gather tiles into."""
    n = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(int(ptr))).reshape(shape)
