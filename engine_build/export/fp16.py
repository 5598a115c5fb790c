"""fp32 → fp16 conversion of an exported tile graph, at the ONNX level, with explicit fp32 islands.

Why here and not by tracing an fp16 PyTorch model: PyTorch's CPU kernels for fp16 are reference
implementations on CPUs without AVX512-FP16/AMX (one 128-channel 3×3 conv at 256² takes 175 s in
fp16 vs 0.7 s in fp32 on the 2-core CI machine), so tracing the full-size model in fp16 on a CPU takes
hours. Rewriting the fp32 graph is exact (weights are rounded once, fp32 → fp16), linear in the graph
size, and independent of the device.

What stays fp32 (each Cast is explicit in the graph, so strongly typed TensorRT keeps it):
- normalisation statistics: InstanceNormalization (GroupNorm as exported), LayerNormalization,
  GroupNormalization — sums of squares overflow fp16 first;
- attention scores: the Q·Kᵀ MatMul, its scaling and the Softmax (SD2.1's `upcast_attention`);
- the sinusoidal timestep embedding (Sin/Cos/Exp/Range/Pow/Log/Sqrt): t·freq with t≈500 loses
  ~0.25 rad of phase in fp16;
- the tile graph's own pre/post-processing (uint8 ↔ [-1,1], clamp, round): exact rounding to uint8;
- optionally whole scopes by node-name regex (e.g. the VAE decoder: `^/net/decoder/`).
Everything else (convolutions, linear layers, elementwise math, resizes) runs in fp16.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
NORM_OPS = frozenset({"InstanceNormalization", "LayerNormalization", "GroupNormalization"})
PRECISE_OPS = frozenset({"Sin", "Cos", "Exp", "Log", "Range", "Pow", "Sqrt", "Reciprocal"})
SCORE_CHAIN_OPS = frozenset({"Mul", "Div", "Add", "Where"})
#: Inputs that are not "data" and keep their own float type (Resize's roi/scales must be float32).
FIXED_FLOAT_INPUTS: dict[str, frozenset[int]] = {"Resize": frozenset({1, 2}), "Upsample": frozenset({1})}
#: Nodes of the tile graph itself (normalisation, clamp/round/uint8) carry no module scope.
NETWORK_SCOPE = "/net/"
DECODER_SCOPES = (r"^/net/(vae/)?decoder/", r"^/net/(vae/)?post_quant_conv/")
#: The sinusoidal timestep projection (diffusers `Timesteps`) and whatever feeds it.
TIMESTEP_SCOPES = (r"/time_proj/",)


@dataclass
class Fp16Report:
    fp32_nodes: int = 0
    fp16_nodes: int = 0
    casts_inserted: int = 0
    initializers_fp16: int = 0
    initializers_fp32: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "fp32_nodes": self.fp32_nodes,
            "fp16_nodes": self.fp16_nodes,
            "casts_inserted": self.casts_inserted,
            "initializers_fp16": self.initializers_fp16,
            "initializers_fp32": self.initializers_fp32,
            "fp32_reasons": dict(self.reasons),
        }


def _bypass_initializer_identities(graph: onnx.GraphProto) -> None:
    """The exporter aliases shared weights through Identity nodes; point consumers at the weight."""
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    keep = []
    for n in graph.node:
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs:
            alias[n.output[0]] = n.input[0]
        else:
            keep.append(n)
    if not alias:
        return
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(keep)


def _follow(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]], ops: tuple[str, ...]):
    """The single consumer of node's first output if it is one of `ops`, else None."""
    nxt = consumers.get(node.output[0], [])
    return nxt[0] if len(nxt) == 1 and nxt[0].op_type in ops else None


def fp32_nodes(
    graph: onnx.GraphProto,
    norms: bool = True,
    attention: bool = True,
    precise: bool = True,
    top_level: bool = True,
    name_patterns: Sequence[str] = (),
) -> dict[str, str]:
    """Node name → reason, for every node that must compute in fp32."""
    keep: dict[str, str] = {}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    pattern = re.compile("|".join(f"(?:{p})" for p in name_patterns)) if name_patterns else None
    for n in graph.node:
        if top_level and not n.name.startswith(NETWORK_SCOPE) and n.op_type not in ("Constant", "Identity"):
            keep[n.name] = "tile pre/post-processing"
        elif norms and n.op_type in NORM_OPS:
            keep[n.name] = "normalisation"
        elif precise and (n.op_type in PRECISE_OPS or any(re.search(p, n.name) for p in TIMESTEP_SCOPES)):
            keep[n.name] = "timestep embedding / scalar math"
        elif pattern is not None and pattern.search(n.name):
            keep[n.name] = "fp32 scope"
        if norms and n.op_type == "InstanceNormalization":  # GroupNorm = Reshape→IN→Reshape→Mul→Add
            prev = producer.get(n.input[0])
            if prev is not None and prev.op_type == "Reshape":
                keep[prev.name] = "normalisation"
            nxt = _follow(n, consumers, ("Reshape",))
            for op in ("Mul", "Add"):
                nxt = _follow(nxt, consumers, (op,)) if nxt is not None else None
                if nxt is not None:
                    keep[nxt.name] = "normalisation"
        if attention and n.op_type == "Softmax":
            keep[n.name] = "attention scores"
            p = producer.get(n.input[0])
            while p is not None and p.op_type in SCORE_CHAIN_OPS:
                keep[p.name] = "attention scores"
                p = producer.get(p.input[0])
            if p is not None and p.op_type in ("MatMul", "Gemm"):
                keep[p.name] = "attention scores"
    return keep


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


def convert_to_fp16(
    model: onnx.ModelProto, keep: dict[str, str] | Iterable[str]
) -> tuple[onnx.ModelProto, Fp16Report]:
    """Rewrite `model` (fp32, with value_info for every tensor) in place: fp16 everywhere except the
    nodes in `keep`, with a Cast wherever a tensor crosses between the two. Graph I/O types are kept.
    """
    g = model.graph
    _bypass_initializer_identities(g)
    keep_set = set(keep)
    report = Fp16Report()
    if isinstance(keep, dict):
        for r in keep.values():
            report.reasons[r] = report.reasons.get(r, 0) + 1
    types = _elem_types(model)
    missing = [o for n in g.node for o in n.output if o and o not in types]
    if missing:
        raise ValueError(
            f"no type for {len(missing)} tensors (e.g. {missing[:3]}); run shape inference first"
        )
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            if name:
                consumers.setdefault(name, []).append((n, i))

    def wants_fp32(node: onnx.NodeProto, index: int) -> bool:
        return node.name in keep_set or index in FIXED_FLOAT_INPUTS.get(node.op_type, ())

    def wants_half(name: str) -> bool:
        """A float constant becomes fp16 when at least one consumer computes in fp16."""
        return any(
            not wants_fp32(c, i) and c.op_type not in ("Shape", "Size") for c, i in consumers.get(name, [])
        )

    # precision of every float tensor after conversion
    prec: dict[str, int] = {}
    graph_io = {v.name for v in [*g.input, *g.output]}
    for name in graph_io:
        prec[name] = types.get(name, 0)
    for t in g.initializer:
        if t.data_type == FLOAT:
            if wants_half(t.name):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
                prec[t.name] = HALF
                report.initializers_fp16 += 1
            else:
                prec[t.name] = FLOAT
                report.initializers_fp32 += 1
    for n in g.node:
        half_node = n.name not in keep_set
        if n.op_type == "Constant":
            a = next(a for a in n.attribute if a.name == "value") if n.attribute else None
            if a is not None and a.t.data_type == FLOAT and wants_half(n.output[0]):
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
            if a is not None:
                prec[n.output[0]] = a.t.data_type
            continue
        if n.op_type == "ConstantOfShape":
            a = next((a for a in n.attribute if a.name == "value"), None)
            if a is not None and a.t.data_type == FLOAT and half_node:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
            elif a is None and half_node and types.get(n.output[0]) == FLOAT:
                n.attribute.append(
                    helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16)))
                )
        if n.op_type == "Cast":
            to = next(a for a in n.attribute if a.name == "to")
            if to.i == FLOAT and half_node:
                to.i = HALF
        report.fp16_nodes += half_node
        report.fp32_nodes += not half_node
        for o in n.output:
            t = types.get(o)
            if t == FLOAT and n.op_type not in ("Cast",):
                prec[o] = HALF if half_node else FLOAT
            elif n.op_type == "Cast":
                prec[o] = next(a.i for a in n.attribute if a.name == "to")
            elif n.op_type == "ConstantOfShape" and t == FLOAT:
                prec[o] = HALF if half_node else FLOAT
            else:
                prec[o] = t if t is not None else 0

    # insert casts where a float tensor meets a consumer of the other precision
    new_nodes: list[onnx.NodeProto] = []
    cast_cache: dict[tuple[str, int], str] = {}

    def cast_to(name: str, target: int) -> str:
        key = (name, target)
        if key not in cast_cache:
            out = f"{name}__to_{'fp32' if target == FLOAT else 'fp16'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=target, name=f"{out}_cast"))
            cast_cache[key] = out
            report.casts_inserted += 1
        return cast_cache[key]

    for n in g.node:
        if n.op_type not in ("Cast", "Shape", "Size", "Constant"):
            for i, name in enumerate(n.input):
                if not name or types.get(name) != FLOAT:
                    continue
                have = prec.get(name, FLOAT)
                need = FLOAT if wants_fp32(n, i) else HALF
                if have != need:
                    n.input[i] = cast_to(name, need)
        new_nodes.append(n)
    for o in g.output:
        if types.get(o.name) == FLOAT and prec.get(o.name) == HALF:
            raise ValueError(f"graph output {o.name} would become fp16; keep its producer in fp32")
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    return model, report
