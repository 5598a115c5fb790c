"""TensorRT's rules for an exported ONNX tile graph, checked on CPU before the graph is written.

A graph that breaks one of these parses or builds only on a GPU, hours later, in the engine-build Job —
or not at all. Each rule is TensorRT's, not ours:

- UINT8 only at the network boundary, adjacent to a Cast: a uint8 network input may feed only Cast
  (or Identity) nodes, a uint8 network output must be produced by one, and no intermediate tensor is
  uint8 (TensorRT's DataType.UINT8 docs; onnx-tensorrt operators.md "UINT8 is only supported as network
  input or output tensor types"; NVIDIA/TensorRT#3985, #4278: "Network-level output tensor … has
  datatype UInt8 but is not produced by an IIdentityLayer or ICastLayer").
- Every operator and tensor dtype in onnx-tensorrt's support matrix (engine_build/trt/ops.py), the
  default-domain opset within the parser's range; quantized types (INT8, FP8, …) only around Q/DQ.
- No operator that needs a plugin: custom domains and operators the matrix marks unsupported.
- Static tile shape: only the batch axis of the input and output may be dynamic (every shape bucket is
  its own static graph; a whole-image graph with dynamic H/W is checked without this rule: it is
  served by ONNX Runtime only and gets no engine).
- Symmetric Q/DQ only: a QuantizeLinear/DequantizeLinear zero point, when given, must be a constant of
  zeros (NvInfer.h, IQuantizeLayer/IDequantizeLayer: "only symmetric quantization is supported"). ONNX
  Runtime's quantizer with asymmetric activations (engine_build/quantize/ort.py) breaks it.

`check_graph` lists every problem (one line each, naming the node, op and dtype); `require_trt_compatible`
raises TrtGraphError with them. External-data graphs are checked without loading their weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, numpy_helper

from engine_build.errors import BuildError
from engine_build.trt.ops import MATRIX_VERSION, OPSET_MAX, OPSET_MIN, SUPPORTED, UNSUPPORTED

#: ONNX element type → the token onnx-tensorrt's matrix uses; absent types TensorRT cannot hold at all.
DTYPE_TOKENS: dict[int, str] = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.INT4: "INT4",
    TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.FLOAT4E2M1: "FP4",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
}
#: Casts (and Identity) are the only layers that may touch a uint8 network input or output.
UINT8_NEIGHBOURS = ("Cast", "Identity")
#: Q/DQ operators: TensorRT takes their zero point only as a constant of zeros.
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_DEFAULT_DOMAINS = ("", "ai.onnx")


class TrtGraphError(BuildError, RuntimeError):
    """The graph would not parse or build in TensorRT; the message lists every problem, one per line."""


def dtype_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"dtype {elem_type}"


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name → element type, from the graph's declarations and ONNX shape inference.

    Inference runs on a weight-less copy (initializers keep dims and data_type without their bytes), so
    a multi-GB external-data graph costs only its structure.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(_weightless(model), check_type=False, strict_mode=False)
    except Exception:  # an unknown (custom) op must not hide the other problems
        inferred = model
    types: dict[str, int] = {}
    g = inferred.graph
    for vi in [*g.value_info, *g.input, *g.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    for node in g.node:  # what inference may not know: Cast targets, Constant values
        if node.op_type == "Cast" and node.output:
            to = next((a.i for a in node.attribute if a.name == "to"), 0)
            types.setdefault(node.output[0], to)
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    types.setdefault(node.output[0], a.t.data_type)
    return types


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each initializer reduced to its name, dtype and dims (no bytes: a 10 GB graph is cheap
    to infer, and protobuf's 2 GiB limit does not apply)."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    g = model.graph
    m.graph.name = g.name
    for field in ("node", "input", "output", "value_info"):
        getattr(m.graph, field).extend(getattr(g, field))
    for init in g.initializer:
        m.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
    return m


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, including those in If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _nodes(sub)


def _label(node: onnx.NodeProto) -> str:
    return f"node {node.name or '<unnamed>'} ({node.domain + '.' if node.domain else ''}{node.op_type})"


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return []
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in vi.type.tensor_type.shape.dim
    ]


def _check_opset(model: onnx.ModelProto) -> Iterator[str]:
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS and not OPSET_MIN <= imp.version <= OPSET_MAX:
            yield (
                f"opset {imp.version}: TensorRT's ONNX parser ({MATRIX_VERSION}) imports opsets "
                f"{OPSET_MIN}..{OPSET_MAX}"
            )


def _check_ops(graph: onnx.GraphProto, local_functions: set[tuple[str, str]]) -> Iterator[str]:
    for node in _nodes(graph):
        if node.domain not in _DEFAULT_DOMAINS:
            if (node.domain, node.op_type) in local_functions:
                continue  # a model-local function: the parser inlines it (its body is checked)
            yield (
                f"{_label(node)}: custom domain {node.domain!r} — TensorRT would need a plugin for it; "
                "export standard ONNX ops"
            )
        elif node.op_type in UNSUPPORTED:
            yield (
                f"{_label(node)}: onnx-tensorrt does not support {node.op_type} (it would need a TensorRT "
                "plugin)"
            )
        elif node.op_type not in SUPPORTED:
            yield f"{_label(node)}: {node.op_type} is not in onnx-tensorrt's matrix ({MATRIX_VERSION})"
        elif node.op_type == "Resize":
            attrs = {a.name: a for a in node.attribute}
            if "antialias" in attrs and attrs["antialias"].i:
                yield f"{_label(node)}: TensorRT's Resize does not support antialias=1"
            policy = attrs.get("keep_aspect_ratio_policy")
            if policy is not None and policy.s not in (b"", b"stretch"):
                yield f"{_label(node)}: TensorRT's Resize supports keep_aspect_ratio_policy 'stretch' only"


def _check_dtypes(graph: onnx.GraphProto, types: dict[str, int]) -> Iterator[str]:
    seen: set[str] = set()
    producers = {o: n for n in graph.node for o in n.output}
    for name, t in types.items():
        if t not in DTYPE_TOKENS and name not in seen:
            seen.add(name)
            where = _label(producers[name]) if name in producers else "graph tensor"
            why = (
                "TensorRT has no DOUBLE: its parser casts it down to FLOAT, clamping (export float32)"
                if t == TensorProto.DOUBLE
                else "TensorRT has no such type"
            )
            yield f"tensor {name!r} ({where}) is {dtype_name(t)}: {why}"
    for node in graph.node:
        if node.domain not in _DEFAULT_DOMAINS or node.op_type not in SUPPORTED:
            continue  # reported by _check_ops
        allowed = SUPPORTED[node.op_type]
        data = next((i for i in node.input if i), None)
        name = data if data is not None else (node.output[0] if node.output else None)
        t = types.get(name) if name else None
        if t is None or t not in DTYPE_TOKENS:
            continue  # unknown, or already reported as a type TensorRT lacks
        token = DTYPE_TOKENS[t]
        if token == "UINT8":
            continue  # the boundary rule (_check_uint8) decides where uint8 may be
        if token not in allowed:
            yield (
                f"{_label(node)}: input {name!r} is {dtype_name(t)}; TensorRT's {node.op_type} takes "
                f"{', '.join(sorted(allowed))}"
            )


def _check_uint8(graph: onnx.GraphProto, types: dict[str, int]) -> Iterator[str]:
    inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for name in sorted(inputs):
        if types.get(name) != TensorProto.UINT8:
            continue
        for c in consumers.get(name, []):
            if c.op_type not in UINT8_NEIGHBOURS or c.domain not in _DEFAULT_DOMAINS:
                yield (
                    f"uint8 input {name!r} feeds {_label(c)}: TensorRT accepts a uint8 network input only "
                    "when it feeds a Cast (or Identity) directly — Cast first, then permute"
                )
    for name in sorted(outputs):
        if types.get(name) != TensorProto.UINT8:
            continue
        p = producers.get(name)
        if p is None:
            yield f"uint8 output {name!r} is not produced by any node (TensorRT needs a Cast to produce it)"
        elif p.op_type not in UINT8_NEIGHBOURS or p.domain not in _DEFAULT_DOMAINS:
            yield (
                f"uint8 output {name!r} is produced by {_label(p)}: TensorRT accepts a uint8 network "
                "output only from a Cast (or Identity) — permute, then the final Cast"
            )
    for name, p in producers.items():
        if types.get(name) == TensorProto.UINT8 and name not in outputs:
            yield (
                f"tensor {name!r} ({_label(p)}) is an intermediate uint8 tensor: TensorRT allows UINT8 "
                "only as a network input or output"
            )


def _check_shapes(graph: onnx.GraphProto, tile: int | None, out_tile: int | None) -> Iterator[str]:
    inits = {t.name for t in graph.initializer}
    ends = [("input", vi, tile) for vi in graph.input if vi.name not in inits]
    ends += [("output", vi, out_tile) for vi in graph.output]
    for kind, vi, size in ends:
        dims = _dims(vi)
        if not dims:
            yield f"{kind} {vi.name!r} has no declared shape: TensorRT needs a static tile shape"
            continue
        for axis, d in enumerate(dims[1:], start=1):
            if not isinstance(d, int) or d <= 0:
                yield (
                    f"{kind} {vi.name!r} axis {axis} is dynamic ({d}) in {dims}: only the batch axis may be "
                    "dynamic (TensorRT engines are built for a static tile shape)"
                )
        if size is not None and len(dims) == 4 and dims[1:3] != [size, size]:
            yield f"{kind} {vi.name!r} is {dims}, expected [batch, {size}, {size}, C] tiles"


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto | None]:
    """Tensor name → its value for every constant (initializers and Constant nodes, subgraphs included);
    None where the value is not in the file as loaded (external data, or a Constant form without a tensor)."""
    out: dict[str, onnx.TensorProto | None] = {}
    graphs = [graph] + [
        sub
        for n in _nodes(graph)
        for a in n.attribute
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))
    ]
    for g in graphs:
        for t in g.initializer:
            out[t.name] = None if t.data_location == TensorProto.EXTERNAL else t
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                out[n.output[0]] = next((a.t for a in n.attribute if a.name == "value"), None)
    return out


def _check_zero_points(graph: onnx.GraphProto) -> Iterator[str]:
    """TensorRT's Q/DQ layers are symmetric: a zero point must be absent or a constant of zeros."""
    consts = _constants(graph)
    why = "TensorRT's Q/DQ layers support only symmetric quantization (zero point 0)"
    for node in _nodes(graph):
        if node.op_type not in QDQ_OPS or node.domain not in _DEFAULT_DOMAINS:
            continue
        zp = node.input[2] if len(node.input) > 2 else ""
        if not zp:
            continue  # absent: 0
        if zp not in consts:
            yield f"{_label(node)}: zero point {zp!r} is computed in the graph, not constant zeros: {why}"
            continue
        t = consts[zp]
        if t is None:
            continue  # its bytes are not loaded here (external data): cannot tell
        try:
            values = numpy_helper.to_array(t).astype(np.float32)
        except (ValueError, TypeError):  # pragma: no cover - a type numpy cannot hold: the dtype rule says so
            continue
        nonzero = int(np.count_nonzero(values))
        if nonzero:
            first = values.flat[int(np.flatnonzero(values)[0])]
            yield (
                f"{_label(node)}: zero point {zp!r} is non-zero ({nonzero} of {values.size} values, e.g. "
                f"{first:g}): {why}; quantize symmetrically (gendr-build quantize --tool modelopt)"
            )


def check_graph(
    model: onnx.ModelProto, *, tile: int | None = None, out_tile: int | None = None, static: bool = True
) -> list[str]:
    """Every way `model` breaks TensorRT's rules (module docstring), one line each; empty when none.

    `tile`/`out_tile`, when given, are the input/output tile sizes the NHWC I/O must have. `static`
    False skips the static-shape rule: a whole-image (dynamic H/W) graph is for ONNX Runtime only.
    """
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    local = {(f.domain, f.name) for f in model.functions}
    types = _elem_types(model)
    problems: list[str] = []
    for rule in (
        _check_opset(model),
        _check_ops(model.graph, local),
        _check_dtypes(model.graph, types),
        _check_uint8(model.graph, types),
        _check_zero_points(model.graph),
        _check_shapes(model.graph, tile, out_tile) if static else iter(()),
    ):
        problems.extend(rule)
    return list(dict.fromkeys(problems))


def _load(model_or_path: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, str]:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, model_or_path.graph.name or "graph"
    return onnx.load(str(model_or_path), load_external_data=False), str(model_or_path)


def require_trt_compatible(
    model_or_path: onnx.ModelProto | str | Path, *, tile: int | None = None, out_tile: int | None = None
) -> None:
    """Raise TrtGraphError listing every TensorRT rule the graph breaks (checked without its weights)."""
    model, label = _load(model_or_path)
    problems = check_graph(model, tile=tile, out_tile=out_tile)
    if problems:
        raise TrtGraphError(_message(label, problems))


def _message(label: str, problems: Iterable[str]) -> str:
    lines = list(problems)
    return f"{label}: {len(lines)} TensorRT incompatibilit{'y' if len(lines) == 1 else 'ies'}:\n" + "\n".join(
        f"  - {p}" for p in lines
    )
