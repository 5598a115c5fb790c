"""Parity of one graph file at any input shape: ONNX Runtime (CPU) on the file vs the PyTorch TileGraph.

Shape-bucket and whole-image graphs are checked with these, at export (the whole-image graph is kept only
when it matches PyTorch at sizes other than the one it was traced at) and in `gendr-build verify`; the
service's backends are not needed for that, so this runs the graph file directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

TileFn = Callable[[np.ndarray], np.ndarray]

#: Whole-image graph vs PyTorch (uint8 outputs, peak 255): below this the graph is refused.
DYNAMIC_MIN_PSNR_DB: dict[str, float] = {"fp32": 50.0, "fp16": 40.0}


def round_up(x: float, multiple: int) -> int:
    return max(multiple, -(-math.ceil(x) // multiple) * multiple)


def dynamic_check_sizes(tile: int, size_multiple: int) -> list[tuple[int, int]]:
    """Two (height, width) sizes that are not the traced tile: non-square, one side larger and one smaller
    than the tile (1.5×, 0.75×, 2.25× of it), so a size or an axis order the trace baked in shows up."""
    r = lambda f: round_up(tile * f, size_multiple)  # noqa: E731
    return [(r(1.5), r(0.75)), (r(0.75), r(2.25))]


def photo_input(h: int, w: int, index: int, photos: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """One uint8 [1, h, w, 3] crop of a real photo (reflect-padded when the photo is smaller)."""
    _, img = photos[index % len(photos)]
    ih, iw = img.shape[:2]
    if ih < h or iw < w:
        img = np.pad(img, ((0, max(0, h - ih)), (0, max(0, w - iw)), (0, 0)), mode="reflect")
        ih, iw = img.shape[:2]
    y, x = (ih - h) // 3, (iw - w) // 3
    return np.ascontiguousarray(img[y : y + h, x : x + w])[None]


def onnx_file_fn(path: Path, threads: int = 0) -> TileFn:
    """ONNX Runtime CPU on one graph file, as a tile function (uint8 NHWC in and out)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 4  # a size the graph rejects is reported by the caller
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x)})[0]


def torch_fn(net: object) -> TileFn:
    """The PyTorch TileGraph (fp32, CPU) around the [-1,1] network, as a tile function."""
    import torch

    from engine_build.gendr.model import TileGraph

    graph = TileGraph(net).eval()  # type: ignore[arg-type]

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return graph(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return run


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def dynamic_parity(
    path: Path, net: object, tile: int, size_multiple: int, photos: Sequence[tuple[str, np.ndarray]]
) -> dict[str, float]:
    """PSNR (dB) of the whole-image graph vs PyTorch at each `dynamic_check_sizes` size ("HxW" → dB)."""
    graph, ref = onnx_file_fn(path), torch_fn(net)
    out = {}
    for i, (h, w) in enumerate(dynamic_check_sizes(tile, size_multiple)):
        x = photo_input(h, w, i, photos)
        out[f"{h}x{w}"] = psnr(graph(x), ref(x))
    return out
