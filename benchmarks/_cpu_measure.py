"""Pieces of benchmarks/cpu_efficiency.py: the cores' measured peaks, FLOPs counted from the graph, tile
functions per configuration, and the two pictures for docs/benchmarks.md."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

TileFn = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------------------------
# Peaks: one large GEMM per precision in the same runtimes that serve
# ---------------------------------------------------------------------------------------------


def _gemm_graph(n: int, int8: bool) -> bytes:
    a_t, b_t, o_t = (
        (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32) if int8 else (TensorProto.FLOAT,) * 3
    )
    rng = np.random.default_rng(0)
    if int8:
        b = helper.make_tensor(
            "B", b_t, [n, n], rng.integers(-64, 64, n * n, dtype=np.int8).tobytes(), raw=True
        )
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
    else:
        b = helper.make_tensor(
            "B", b_t, [n, n], rng.standard_normal(n * n).astype(np.float32).tobytes(), raw=True
        )
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
    g = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("A", a_t, [n, n])],
        [helper.make_tensor_value_info("Y", o_t, [n, n])],
        [b],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _conv_graph(c: int, hw: int) -> bytes:
    w = np.random.default_rng(0).standard_normal((c, c, 3, 3)).astype(np.float32) * 0.05
    g = helper.make_graph(
        [helper.make_node("Conv", ["X", "W"], ["Y"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor("W", TensorProto.FLOAT, list(w.shape), w.tobytes(), raw=True)],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _qdq_conv_graph(c: int, hw: int) -> bytes:
    """A 3×3 conv behind QuantizeLinear/DequantizeLinear on input and weight (per-channel), the form NNCF
    writes: OpenVINO runs it as an int8 convolution, so this is the int8 peak of its CPU plugin."""
    rng = np.random.default_rng(0)
    w = rng.integers(-63, 64, (c, c, 3, 3), dtype=np.int8)

    def t(name: str, arr: np.ndarray, dtype: int) -> onnx.TensorProto:
        return helper.make_tensor(name, dtype, list(arr.shape), arr.tobytes(), raw=True)

    inits = [
        t("W", w, TensorProto.INT8),
        t("ws", np.full(c, 0.01, np.float32), TensorProto.FLOAT),
        t("wz", np.zeros(c, np.int8), TensorProto.INT8),
        t("xs", np.array(0.02, np.float32), TensorProto.FLOAT),
        t("xz", np.array(0, np.uint8), TensorProto.UINT8),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["X", "xs", "xz"], ["Xq"]),
        helper.make_node("DequantizeLinear", ["Xq", "xs", "xz"], ["Xd"]),
        helper.make_node("DequantizeLinear", ["W", "ws", "wz"], ["Wd"], axis=0),
        helper.make_node("Conv", ["Xd", "Wd"], ["Y"], pads=[1, 1, 1, 1]),
    ]
    g = helper.make_graph(
        nodes,
        "qconv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, c, hw, hw])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _median_rate(fn: Callable[[], object], flop: float, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return flop / float(np.median(ts)) / 1e9


class Peaks:
    """The cores' peak per runtime and precision: the fastest of a few large GEMMs (n³) and 3×3
    convolutions (c→c on hw²) in the runtime that serves, GFLOP/s with 1 MAC = 2 FLOP. Sessions are built
    once; `measure()` runs every kernel once, so the peak can be taken in the same rounds as the tiles."""

    GEMMS = (1024, 2048)
    CONVS = ((256, 64), (512, 48))

    def __init__(self, threads: int) -> None:
        import onnxruntime as ort

        rng = np.random.default_rng(1)
        self.kernels: dict[str, list[tuple[str, float, Callable[[], object]]]] = {}
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads

        def ort_run(model: bytes, feed: dict[str, np.ndarray]) -> Callable[[], object]:
            s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            return lambda: s.run(None, feed)

        for label, int8 in (("ort-fp32", False), ("ort-int8", True)):
            ks = []
            for n in self.GEMMS:
                a = rng.integers(0, 255, (n, n)).astype(np.uint8 if int8 else np.float32)
                ks.append((f"gemm{n}", 2.0 * n**3, ort_run(_gemm_graph(n, int8), {"A": a})))
            if not int8:
                for c, hw in self.CONVS:
                    x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
                    ks.append(
                        (f"conv{c}@{hw}", 2.0 * c * c * 9 * hw * hw, ort_run(_conv_graph(c, hw), {"X": x}))
                    )
            self.kernels[label] = ks
        try:
            import openvino as ov
        except ImportError:
            return
        core = ov.Core()
        from service.backends.openvino import bf16_flags

        hints = (("ov-fp32", "f32"), ("ov-bf16", "bf16")) if bf16_flags() else (("ov-fp32", "f32"),)
        for label, hint in hints:  # without a bf16 unit OpenVINO has no bf16 kernels to measure
            cfg = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads}
            ks = []
            for n in self.GEMMS:
                cm = core.compile_model(core.read_model(_gemm_graph(n, False), b""), "CPU", cfg)
                a = rng.standard_normal((n, n)).astype(np.float32)
                ks.append((f"gemm{n}", 2.0 * n**3, lambda cm=cm, a=a: cm(a)))
            for c, hw in self.CONVS:
                cm = core.compile_model(core.read_model(_conv_graph(c, hw), b""), "CPU", cfg)
                x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
                ks.append((f"conv{c}@{hw}", 2.0 * c * c * 9 * hw * hw, lambda cm=cm, x=x: cm(x)))
            self.kernels[label] = ks
        cfg = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
        ks = []
        for c, hw in self.CONVS:  # int8 in OpenVINO: Q/DQ convolutions (VNNI/AMX where present, else AVX2)
            cm = core.compile_model(core.read_model(_qdq_conv_graph(c, hw), b""), "CPU", cfg)
            x = np.abs(rng.standard_normal((1, c, hw, hw))).astype(np.float32)
            ks.append((f"qconv{c}@{hw}", 2.0 * c * c * 9 * hw * hw, lambda cm=cm, x=x: cm(x)))
        self.kernels["ov-int8"] = ks
        for ks in self.kernels.values():  # first runs (allocation, JIT) outside the timings
            for _, _, fn in ks:
                fn()

    def measure(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for label, ks in self.kernels.items():
            out[label] = {}
            for name, flop, fn in ks:
                t0 = time.perf_counter()
                fn()
                out[label][name] = round(flop / (time.perf_counter() - t0) / 1e9, 1)
        return out


# ---------------------------------------------------------------------------------------------
# FLOPs of one tile, counted from the graph's convolutions and matmuls
# ---------------------------------------------------------------------------------------------


def graph_with_tile(path: Path, tile: int, scale: int) -> onnx.ModelProto:
    """The tile graph with its static tile edge changed (batch 1), shapes re-inferred."""
    m = onnx.load(str(path))
    del m.graph.value_info[:]
    for vi, edge in ((m.graph.input[0], tile), (m.graph.output[0], tile * scale)):
        dims = vi.type.tensor_type.shape.dim
        dims[0].Clear()
        dims[0].dim_value = 1
        dims[1].dim_value, dims[2].dim_value = edge, edge
    return onnx.shape_inference.infer_shapes(m, data_prop=True)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    g = model.graph
    shapes = {
        vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for vi in [*g.value_info, *g.input, *g.output]
    }
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    return shapes


def conv_macs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, float]]:
    """Multiply-accumulates of each Conv for one tile (batch 1); a Q/DQ weight is read through its
    DequantizeLinear."""
    shapes = _shapes(model)
    dq = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    out = []
    for n in model.graph.node:
        if n.op_type == "Conv":
            w, y = shapes.get(dq.get(n.input[1], n.input[1])), shapes.get(n.output[0])
            if not w or not y or 0 in y:
                raise ValueError(f"no shape for {n.name}")
            out.append((n, float(np.prod(y)) * float(np.prod(w[1:]))))
    return out


def tile_flops(model: onnx.ModelProto) -> float:
    """2 × multiply-accumulates of every Conv/MatMul/Gemm for one tile (batch 1)."""
    shapes = _shapes(model)
    total = 2.0 * sum(m for _, m in conv_macs(model))
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            a, y = shapes.get(n.input[0]), shapes.get(n.output[0])
            if a and y:
                total += 2.0 * float(np.prod(y)) * a[-1]
    return total


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else round(10 * float(np.log10(255.0**2 / mse)), 2)


# ---------------------------------------------------------------------------------------------
# Tile functions per configuration (ORT graphs by path, OpenVINO through its serving backend)
# ---------------------------------------------------------------------------------------------


def ort_fn(model: onnx.ModelProto | Path, threads: int, sessions: int = 1) -> list[TileFn]:
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    fns = []
    for _ in range(sessions):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        if sessions > 1:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        fns.append(lambda x, s=s: s.run(None, {"lr_tile": x})[0])
    return fns


def ov_fn(model: onnx.ModelProto | Path, hint: str, threads: int, streams: int = 1) -> list[TileFn]:
    import openvino as ov

    core = ov.Core()
    m = (
        core.read_model(model.SerializeToString(), b"")
        if isinstance(model, onnx.ModelProto)
        else core.read_model(str(model))
    )
    cfg: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": hint,
        "INFERENCE_NUM_THREADS": threads * streams,
        "NUM_STREAMS": streams,
        "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
    }
    cm = core.compile_model(m, "CPU", cfg)
    reqs = [cm.create_infer_request() for _ in range(streams)]

    def make(r: Any) -> TileFn:
        def fn(x: np.ndarray) -> np.ndarray:
            r.infer({0: x})
            return np.array(r.get_output_tensor(0).data, copy=True)

        return fn

    return [make(r) for r in reqs]


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def crop_picture(outputs: dict[str, np.ndarray], path: Path, zoom: int = 2) -> None:
    """Side by side: each configuration's SR crop (nearest ×zoom), then |int8 − fp32| × 8."""
    from PIL import Image, ImageDraw

    names = list(outputs)
    ref = outputs[names[0]].astype(np.int16)
    panels = [(n, outputs[n]) for n in names]
    for n in names[1:]:
        diff = np.clip(np.abs(outputs[n].astype(np.int16) - ref) * 8, 0, 255).astype(np.uint8)
        panels.append((f"|{n} - {names[0]}| x8", diff))
    h, w = ref.shape[:2]
    pad, label = 6, 18
    canvas = Image.new("RGB", (len(panels) * (w * zoom + pad) + pad, h * zoom + label + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, img) in enumerate(panels):
        x = pad + i * (w * zoom + pad)
        canvas.paste(Image.fromarray(img).resize((w * zoom, h * zoom), Image.NEAREST), (x, label + pad))
        draw.text((x, 3), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def plot_s_per_mp(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Grouped bars of wall s per output MP by size class and configuration; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    cfgs = list(dict.fromkeys(r["config"] for r in rows))
    fig, ax = plt.subplots(figsize=(7.5, 3.8), dpi=110)
    width = 0.8 / max(1, len(cfgs))
    for j, c in enumerate(cfgs):
        xs, ys = [], []
        for i, s in enumerate(sizes):
            v = [r["wall_s_per_mp"] for r in rows if r["size"] == s and r["config"] == c]
            if v:
                xs.append(i + (j - (len(cfgs) - 1) / 2) * width)
                ys.append(v[0])
        bars = ax.bar(xs, ys, width, label=c)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_ylabel("wall s per output MP (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True
