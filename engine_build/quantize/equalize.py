"""Per-channel equalization of a float graph before int8 (`gendr-build quantize --tool nncf --equalize`).

Why: int8 activations are per-tensor, so every channel gets the step of the widest one; in Real-ESRGAN
the median channel spans 0.39 of its tensor's range (docs/benchmarks.md), so most channels use under half
of the 256 levels. Scaling channel c of a tensor by g_c and dividing the weights that read channel c by
g_c changes nothing in float, for every op on the way that is linear per channel or positively
homogeneous: a Conv's output rows (weights and bias), LeakyReLU/ReLU, Add of two such tensors, Mul by a
positive scalar, Resize. The gain is SmoothQuant's migration, g_c = (R / r_c)^alpha clipped to
[1, max_gain] (r_c the channel's calibrated range, R the tensor's): alpha 1 evens the activations fully
and pushes the whole spread into the weights that read them, 0.5 splits it.

A *group* is a set of tensors tied by those ops (a dense block's LeakyReLU output and its Conv's output;
a residual trunk from its first Conv through every Add to the upsampling Resize); it is equalized only
when every tensor is written by a Conv or a tying op and read by a Conv (directly or through a channel
Concat) or a tying op. Anything else (a graph output, GroupNorm, a Softmax, a depthwise Conv) leaves the
group as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Ops that carry a per-channel scale from input to output unchanged (input 0 only, for Resize).
HOMOGENEOUS_OPS = ("LeakyRelu", "Relu", "Resize")
#: Serialized size above which the statistics pass is skipped (protobuf's 2 GB limit).
MAX_GRAPH_BYTES = 1_900_000_000


@dataclass
class Group:
    tensors: set[str]
    writers: list[Any] = field(default_factory=list)  # Conv nodes: scale their output rows
    readers: list[tuple[Any, int]] = field(default_factory=list)  # (Conv node, first input channel)


def equalize(
    model: Any, tiles: np.ndarray, input_name: str, alpha: float = 0.5, max_gain: float = 8.0
) -> dict[str, Any]:
    """Equalize `model` (an onnx.ModelProto, float) in place from its activations on `tiles`; returns
    what was done, for the manifest."""
    if not 0 < alpha <= 1 or max_gain < 1:
        raise ValueError(f"equalization needs 0 < alpha ≤ 1 and max_gain ≥ 1, got {alpha}, {max_gain}")
    if model.ByteSize() > MAX_GRAPH_BYTES:
        return {"groups": 0, "skipped": "graph over 2 GB: no statistics pass"}
    groups = channel_groups(model)
    if not groups:
        return {"groups": 0, "alpha": alpha}
    lo, hi = _channel_ranges(model, sorted({t for g in groups for t in g.tensors}), tiles, input_name)
    gains = []
    for g in groups:
        # each channel's share of its tensor's range, geometric mean over the group's tensors
        share = np.exp(np.mean([np.log(_share(lo[t], hi[t])) for t in g.tensors], axis=0))
        gain = np.clip(share**-alpha, 1.0, max_gain).astype(np.float32)
        _apply(model, g, gain)
        gains.append(gain)
    all_gains = np.concatenate(gains)
    return {
        "groups": len(groups),
        "tensors": sum(len(g.tensors) for g in groups),
        "alpha": alpha,
        "max_gain": max_gain,
        "median_gain": round(float(np.median(all_gains)), 3),
        "tiles": len(tiles),
    }


def channel_groups(model: Any) -> list[Group]:
    """The groups of tensors that can be rescaled per channel exactly (see the module docstring)."""
    from onnx import numpy_helper, shape_inference

    g = model.graph
    nodes = list(g.node)  # one wrapper per node, so id() names a node below
    inits = {t.name: t for t in g.initializer}
    consts = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in nodes
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }

    def scalar(name: str) -> float | None:
        a = numpy_helper.to_array(inits[name]) if name in inits else consts.get(name)
        return float(a.reshape(())) if a is not None and a.size == 1 else None

    def is_const(name: str) -> bool:
        return name in inits or name in consts

    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def tie(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    tying: set[int] = set()
    for n in nodes:
        if n.op_type in HOMOGENEOUS_OPS:
            tie(n.input[0], n.output[0])
        elif n.op_type == "Add" and not any(is_const(i) for i in n.input):
            tie(n.input[0], n.output[0])
            tie(n.input[1], n.output[0])
        elif n.op_type == "Mul" and len(n.input) == 2:
            k = [scalar(i) for i in n.input]
            if sum(v is not None and v > 0 for v in k) == 1 and sum(is_const(i) for i in n.input) == 1:
                tie(n.input[0] if k[0] is None else n.input[1], n.output[0])
            else:
                continue
        else:
            continue
        tying.add(id(n))
    writer = {o: n for n in nodes for o in n.output}
    readers: dict[str, list[Any]] = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    source = _parameter_sources(nodes, inits)
    outputs = {o.name for o in g.output}
    inferred = shape_inference.infer_shapes(model)
    channels = {
        v.name: v.type.tensor_type.shape.dim[1].dim_value
        for v in [*inferred.graph.value_info, *inferred.graph.input]
        if len(v.type.tensor_type.shape.dim) > 1
    }

    def plain_conv(n: Any, data: str) -> bool:
        return (
            n.op_type == "Conv"
            and n.input[0] == data
            and n.input[1] in source
            and (len(n.input) < 3 or n.input[2] in source)
            and all(a.name != "group" or a.i == 1 for a in n.attribute)
        )

    def concat_readers(c: Any, t: str) -> list[tuple[Any, int]] | None:
        if any(a.name == "axis" and a.i not in (1, -3) for a in c.attribute) or list(c.input).count(t) != 1:
            return None
        offset = 0
        for i in c.input:
            if i == t:
                break
            if not channels.get(i):
                return None
            offset += channels[i]
        out = [r for r in readers.get(c.output[0], [])]
        if not out or c.output[0] in outputs or not all(plain_conv(r, c.output[0]) for r in out):
            return None
        return [(r, offset) for r in out]

    members: dict[str, set[str]] = {}
    for t in parent:
        members.setdefault(find(t), set()).add(t)
    groups = []
    for tensors in members.values():
        grp: Group | None = Group(tensors)
        for t in tensors:
            w = writer.get(t)
            if w is None or t in outputs:
                grp = None
            elif id(w) not in tying:
                if plain_conv(w, w.input[0]):
                    grp.writers.append(w)
                else:
                    grp = None
            for r in readers.get(t, []) if grp is not None else []:
                if id(r) in tying:
                    continue
                if plain_conv(r, t):
                    grp.readers.append((r, 0))
                elif r.op_type == "Concat" and (rs := concat_readers(r, t)) is not None:
                    grp.readers.extend(rs)
                else:
                    grp = None
                    break
            if grp is None:
                break
        if grp is not None and grp.writers and grp.readers:
            groups.append(grp)
    return groups


def _channel_ranges(
    model: Any, names: list[str], tiles: np.ndarray, input_name: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-channel min and max of `names` over the tiles, in ONNX Runtime fp32."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    s = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    for t in tiles:
        for n, v in zip(names, s.run(names, {input_name: t[None]}), strict=True):
            a, b = v.min(axis=(0, 2, 3)), v.max(axis=(0, 2, 3))
            lo[n] = np.minimum(lo[n], a) if n in lo else a
            hi[n] = np.maximum(hi[n], b) if n in hi else b
    return lo, hi


def _share(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Each channel's range as a fraction of the whole tensor's (its min to its max)."""
    whole = max(float(hi.max() - lo.min()), 1e-12)
    return np.maximum(hi - lo, 1e-12 * whole) / whole


def _parameter_sources(nodes: list[Any], inits: dict[str, Any]) -> dict[str, str]:
    """Name → the initializer that holds it: itself, or the input of an Identity over one (the torch
    exporter shares equal tensors, e.g. zero biases, that way)."""
    src = {name: name for name in inits}
    src.update({n.output[0]: n.input[0] for n in nodes if n.op_type == "Identity" and n.input[0] in inits})
    return src


def _apply(model: Any, group: Group, gain: np.ndarray) -> None:
    """Scale the writers' output rows by `gain` and divide the readers' input columns by it, each Conv on
    its own copy of a parameter that other nodes share."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    source = _parameter_sources(list(g.node), inits)
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1

    def update(node: Any, k: int, fn: Any) -> None:
        name = node.input[k]
        if name not in inits or uses[name] > 1:  # shared or behind an Identity: a private copy
            private = f"{node.name or node.output[0]}.equalized.{k}"
            a = numpy_helper.to_array(inits[source[name]])
            g.initializer.append(numpy_helper.from_array(a, private))
            inits[private] = g.initializer[-1]
            uses[name] -= 1
            uses[private] = 1
            node.input[k] = name = private
        a = fn(numpy_helper.to_array(inits[name]).astype(np.float32, copy=True))
        inits[name].CopyFrom(numpy_helper.from_array(a, name))

    for w in group.writers:
        update(w, 1, lambda a: a * gain[:, None, None, None])
        if len(w.input) > 2:
            update(w, 2, lambda a: a * gain)
    for r, offset in {(id(r), o): (r, o) for r, o in group.readers}.values():
        end = offset + len(gain)

        def divide(a: np.ndarray, s: int = offset, e: int = end) -> np.ndarray:
            a[:, s:e] /= gain[None, :, None, None]
            return a

        update(r, 1, divide)
