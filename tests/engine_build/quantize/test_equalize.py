"""Channel equalization before int8 (engine_build/quantize/equalize.py): the float output does not change,
the activation channels come out more even, and a group that cannot be rescaled exactly is left alone.

On a hand-built ONNX graph with a residual stream (Conv → Add ← Mul 0.2 ← Conv over a Concat), a dense
LeakyReLU branch read through the Concat at a channel offset, a nearest Resize, a bias shared through an
Identity, and a side branch read by a Sigmoid (not rescalable).
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from engine_build.quantize.equalize import _channel_ranges, _share, channel_groups, equalize  # noqa: E402

W = 4  # channels of the stream and of the dense branch


def _conv(name: str, x: str, y: str, w: np.ndarray, inits: list) -> onnx.NodeProto:
    inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.w"))
    inits.append(numpy_helper.from_array(np.linspace(-0.1, 0.1, w.shape[0], dtype=np.float32), f"{name}.b"))
    pad = w.shape[-1] // 2
    return helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name, pads=[pad] * 4)


def _graph(extra_outputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    uneven = np.array([1.0, 0.05, 0.3, 3.0], dtype=np.float32)[:, None, None, None]  # channel scales
    inits: list = [
        numpy_helper.from_array(np.array(0.2, dtype=np.float32), "k"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales"),
    ]
    nodes = [
        _conv("A", "x", "a", rng.normal(size=(W, 3, 3, 3)) * uneven, inits),
        _conv("L", "a", "l", rng.normal(size=(W, W, 3, 3)) * uneven[::-1] * 0.3, inits),
        # L shares A's bias through an Identity, as the torch exporter writes equal tensors
        helper.make_node("Identity", ["A.b"], ["shared.b"], name="share"),
        helper.make_node("LeakyRelu", ["l"], ["la"], name="act", alpha=0.2),
        helper.make_node("Concat", ["a", "la"], ["c"], name="cat", axis=1),
        _conv("B", "c", "b", rng.normal(size=(W, 2 * W, 1, 1)) * 0.1, inits),
        helper.make_node("Mul", ["b", "k"], ["bk"], name="scale"),
        helper.make_node("Add", ["a", "bk"], ["s"], name="skip"),
        helper.make_node("Resize", ["s", "", "scales"], ["r"], name="up", mode="nearest"),
        _conv("C", "r", "y", rng.normal(size=(3, W, 3, 3)) * 0.1, inits),
        _conv("E", "x", "e", rng.normal(size=(W, 3, 1, 1)) * uneven, inits),
        helper.make_node("Sigmoid", ["e"], ["es"], name="gate"),
        _conv("F", "es", "f", rng.normal(size=(3, W, 1, 1)), inits),
    ]
    nodes[1].input[2] = "shared.b"
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "f", *extra_outputs)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])
    g = helper.make_graph(nodes, "eq", [x], outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _run(m: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})


def _tiles(n: int = 3) -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 1, size=(n, 3, 12, 12)).astype(np.float32)


def _weights(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def test_the_rescalable_groups() -> None:
    groups = channel_groups(_graph())
    by_writers = {frozenset(n.name for n in g.writers): g for g in groups}
    # the residual stream (A writes it, B adds into it through Mul/Add) and the dense LeakyReLU branch;
    # E's output is read by a Sigmoid: no group
    assert set(by_writers) == {frozenset({"A", "B"}), frozenset({"L"})}
    stream = by_writers[frozenset({"A", "B"})]
    assert {"a", "bk", "s", "r"} <= stream.tensors
    assert sorted((r.name, off) for r, off in stream.readers) == [("B", 0), ("C", 0), ("L", 0)]
    dense = by_writers[frozenset({"L"})]
    assert dense.tensors == {"l", "la"} and [(r.name, off) for r, off in dense.readers] == [("B", W)]


def test_equalized_graph_computes_the_same_and_evens_the_channels() -> None:
    m = _graph()
    x = _tiles()
    before = [_run(m, t[None]) for t in x]
    lo0, hi0 = _channel_ranges(m, ["a", "la"], x, "x")
    w0 = _weights(m)
    info = equalize(m, x, "x", alpha=1.0, max_gain=8.0)
    assert info["groups"] == 2 and info["median_gain"] > 1
    after = [_run(m, t[None]) for t in x]
    for b, a in zip(before, after, strict=True):
        for yb, ya in zip(b, a, strict=True):
            np.testing.assert_allclose(ya, yb, rtol=1e-4, atol=1e-5)
    lo1, hi1 = _channel_ranges(m, ["a", "la"], x, "x")
    for t in ("a", "la"):  # the narrowest channel now spans a larger share of its tensor's range
        assert _share(lo1[t], hi1[t]).min() > 2 * _share(lo0[t], hi0[t]).min()
    w1 = _weights(m)
    assert not np.array_equal(w1["A.w"], w0["A.w"]) and not np.array_equal(w1["C.w"], w0["C.w"])
    assert np.array_equal(w1["E.w"], w0["E.w"]) and np.array_equal(w1["F.w"], w0["F.w"])  # left alone


def test_a_group_that_is_also_a_graph_output_is_left_alone() -> None:
    m = _graph(extra_outputs=("la",))
    x = _tiles()
    before = _run(m, x[:1])
    b0 = _weights(m)["L.b"]
    info = equalize(m, x, "x", alpha=0.5)
    assert info["groups"] == 1  # the stream only: `la` is what the caller reads, it must not change
    assert np.array_equal(_weights(m)["L.b"], b0)  # L's output rows not rescaled (its inputs are: stream)
    np.testing.assert_allclose(_run(m, x[:1])[2], before[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("alpha", "max_gain"), [(0.0, 8.0), (1.5, 8.0), (0.5, 0.5)])
def test_bad_strengths_are_refused(alpha: float, max_gain: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        equalize(_graph(), _tiles(1), "x", alpha=alpha, max_gain=max_gain)
