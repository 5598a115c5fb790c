"""A tiny model repository written without torch, for the runtime tests (the serving runtime must work
where torch is not installed: CI runs tests/service in a venv with `.[serve,dev]` only).

The graph is what the export writes, in miniature: uint8 NHWC `lr_tile` → Cast → Transpose → [-1, 1] →
Conv 3×3 (3→8) → Tanh → Conv 3×3 (8→3) + input → clamp → uint8 → Transpose → Cast → `sr_tile`, with
seeded weights, a dynamic batch and a static 64-px tile. It is a local network (receptive field 5 px),
so tiled and untiled outputs agree exactly inside the stitch weights' support, and `reference` is the
same network in numpy (float32), so outputs can be checked to one grey level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.manifest import (
    Manifest,
    OnnxVariant,
    PipelineParams,
    ShapeGraph,
    TileGeometry,
    make_artifact,
    write_manifest,
)

TILE, OVERLAP, SIZE_MULTIPLE = 64, 16, 16
HIDDEN = 8


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.normal(0, 0.4, (HIDDEN, 3, 3, 3))).astype(np.float32),
        "b1": (rng.normal(0, 0.1, HIDDEN)).astype(np.float32),
        "w2": (rng.normal(0, 0.15, (3, HIDDEN, 3, 3))).astype(np.float32),
        "b2": (rng.normal(0, 0.05, 3)).astype(np.float32),
    }


def graph(tile: int | None = TILE, seed: int = 0) -> onnx.ModelProto:
    """The network at a static square tile, or (tile None) with dynamic height and width."""
    w = weights(seed)
    c = {k: numpy_helper.from_array(v, k) for k, v in w.items()}
    consts = {
        "inv": np.array(1 / 127.5, np.float32),
        "one": np.array(1.0, np.float32),
        "neg_one": np.array(-1.0, np.float32),
        "half_range": np.array(127.5, np.float32),
        "zero": np.array(0.0, np.float32),
        "top": np.array(255.0, np.float32),
    }
    inits = list(c.values()) + [numpy_helper.from_array(v, k) for k, v in consts.items()]
    n = helper.make_node
    nodes = [
        n("Cast", ["lr_tile"], ["x_f"], to=TensorProto.FLOAT),
        n("Transpose", ["x_f"], ["x_nchw"], perm=[0, 3, 1, 2]),
        n("Mul", ["x_nchw", "inv"], ["x_s"]),
        n("Sub", ["x_s", "one"], ["x"]),
        n("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        n("Tanh", ["h"], ["h_act"]),
        n("Conv", ["h_act", "w2", "b2"], ["r"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        n("Add", ["x", "r"], ["y"]),
        n("Clip", ["y", "neg_one", "one"], ["y_c"]),
        n("Add", ["y_c", "one"], ["y_1"]),
        n("Mul", ["y_1", "half_range"], ["y_255"]),
        n("Round", ["y_255"], ["y_r"]),
        n("Clip", ["y_r", "zero", "top"], ["y_q"]),
        n("Transpose", ["y_q"], ["y_nhwc"], perm=[0, 2, 3, 1]),
        n("Cast", ["y_nhwc"], ["sr_tile"], to=TensorProto.UINT8),
    ]
    dims: list[int | str] = [tile, tile] if tile is not None else ["height", "width"]
    g = helper.make_graph(
        nodes,
        "tiny-local-sr",
        [helper.make_tensor_value_info("lr_tile", TensorProto.UINT8, ["batch", *dims, 3])],
        [helper.make_tensor_value_info("sr_tile", TensorProto.UINT8, ["batch", *dims, 3])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], producer_name="tests")
    onnx.checker.check_model(model, full_check=True)
    return model


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """NCHW 3×3 convolution with zero padding 1 (ONNX Conv semantics), float32."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # B, C, H, W, 3, 3
    return np.einsum("bchwij,ocij->bohw", win, w, optimize=True).astype(np.float32) + b[None, :, None, None]


def reference(batch: np.ndarray, seed: int = 0) -> np.ndarray:
    """The graph in numpy: uint8 [B, t, t, 3] → uint8 [B, t, t, 3]."""
    w = weights(seed)
    x = batch.astype(np.float32).transpose(0, 3, 1, 2) * np.float32(1 / 127.5) - np.float32(1)
    h = np.tanh(_conv(x, w["w1"], w["b1"]))
    y = np.clip(x + _conv(h, w["w2"], w["b2"]), -1, 1)
    q = np.clip(np.round((y + 1) * np.float32(127.5)), 0, 255)
    return q.transpose(0, 2, 3, 1).astype(np.uint8)


def write_repo(root: Path, name: str = "tiny", seed: int = 0) -> Path:
    """models/<name>: the graph as a `gendr`-kind repository (scale-1 graph, native ×4, AdaIN default)."""
    model_dir = root / name
    path = model_dir / "onnx" / "fp32" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(graph(seed=seed), str(path))
    manifest = Manifest(
        name=name,
        kind="gendr",
        native_scale=4,
        tile=TileGeometry(tile=TILE, overlap=OVERLAP, graph_scale=1, size_multiple=SIZE_MULTIPLE),
        pipeline=PipelineParams(),
        onnx={
            "fp32": OnnxVariant(
                precision="fp32",
                graph=make_artifact(model_dir, path),
                opset=18,
                key=f"tests-tiny-onnx-{seed}",
                options={"written_by": "tests/service/tiny_onnx.py"},
            )
        },
        created_by="tests/service/tiny_onnx.py (no torch)",
    )
    write_manifest(model_dir, manifest)
    return model_dir


def write_bucket_repo(
    root: Path, name: str = "buckets", buckets: tuple[int, ...] = (32,), dynamic: bool = True
) -> Path:
    """The same network as a `single` model with shape buckets (static 32-px graphs) and a dynamic one."""
    model_dir = root / name
    shapes = []
    for tile in (*buckets, *([None] if dynamic else [])):
        sub = f"t{tile}" if tile is not None else "dynamic"
        path = model_dir / "onnx" / "fp32" / sub / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(graph(tile), str(path))
        shapes.append(ShapeGraph(tile=tile, graph=make_artifact(model_dir, path), key=f"tests-{sub}"))
    path = model_dir / "onnx" / "fp32" / "model.onnx"
    onnx.save_model(graph(), str(path))
    manifest = Manifest(
        name=name,
        kind="single",
        native_scale=1,
        tile=TileGeometry(tile=TILE, overlap=OVERLAP, graph_scale=1, size_multiple=SIZE_MULTIPLE),
        onnx={
            "fp32": OnnxVariant(
                precision="fp32",
                graph=make_artifact(model_dir, path),
                opset=18,
                key="tests-buckets",
                shapes=shapes,
            )
        },
        created_by="tests/service/tiny_onnx.py (no torch)",
    )
    write_manifest(model_dir, manifest)
    return model_dir
