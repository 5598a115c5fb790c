"""The ONNX side of an export: trace → file(s), checker, shape inference, the I/O contract and
TensorRT's rules, and the one function that saves a graph.

Graphs whose weights exceed EXTERNAL_DATA_THRESHOLD are written as `model.onnx` + one
`model.onnx.data` (protobuf cannot hold more than 2 GiB). Every graph passes `onnx.checker` (full
check), strict shape inference, the I/O check and TensorRT's graph rules before it is recorded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from engine_build.errors import BuildError
from engine_build.export.keys import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME
from engine_build.trt.rules import check_graph

log = logging.getLogger(__name__)


#: Initializer bytes above which a graph is written with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


GRAPH_FILE = "model.onnx"


DATA_FILE = "model.onnx.data"


class ExportError(BuildError, RuntimeError):
    """An export step that cannot run or produced an invalid graph."""


def trace_to_onnx(
    graph: nn.Module,
    tile: int,
    path: Path,
    opset: int = DEFAULT_OPSET,
    channels: int = 3,
    dynamic_hw: bool = False,
) -> None:
    """TorchScript-export `graph` (uint8 [B,t,t,C] → uint8) with a dynamic batch axis to `path`
    (`dynamic_hw`: height and width dynamic too, traced at t×t; the whole-image graph).

    Large models come out with one external file per tensor next to `path`; `finalize_onnx`
    consolidates them.
    """
    import warnings

    example = torch.randint(0, 256, (2, tile, tile, channels), dtype=torch.uint8)
    graph = graph.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from diffusers' shape asserts are expected
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=_dynamic_axes(dynamic_hw),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _dynamic_axes(dynamic_hw: bool) -> dict[str, dict[int, str]]:
    if not dynamic_hw:
        return {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    return {
        INPUT_NAME: {0: "batch", 1: "height", 2: "width"},
        OUTPUT_NAME: {0: "batch", 1: "out_height", 2: "out_width"},
    }


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def save_onnx(model: onnx.ModelProto, path: Path, external_data: bool) -> Path | None:
    """Write `model` to `path` (and its weights to one `model.onnx.data` beside it when asked): the one
    place graphs are saved. Returns the data file or None."""
    data = path.parent / DATA_FILE
    for stale in (path, data):  # onnx appends to an existing external-data file
        stale.unlink(missing_ok=True)
    if external_data:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,
            size_threshold=1024,
        )
        return data
    onnx.save_model(model, str(path))
    return None


def finalize_onnx(
    src: Path,
    dst_dir: Path,
    tile_out: int | None,
    external_data: bool | None = None,
    expect_input: tuple[int, ...] | None = None,
    trt_strict: bool = True,
) -> tuple[Path, Path | None]:
    """Load `src` (with its external data), write `dst_dir/model.onnx` [+ model.onnx.data], then run
    the full checker and strict shape inference (the inferred graph, with value_info, is the result).
    `tile_out` None: a dynamic-H/W graph (output height and width stay symbolic).
    """
    dst_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src), load_external_data=True)
    use_external = (
        external_data if external_data is not None else initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    )
    graph_path = dst_dir / GRAPH_FILE
    model.producer_name = "gendr-serve"
    _declare_output_shape(model, tile_out)
    data_path = save_onnx(model, graph_path, use_external)
    del model
    try:
        onnx.checker.check_model(str(graph_path), full_check=True)
        inferred = dst_dir / ".inferred.onnx"
        onnx.shape_inference.infer_shapes_path(
            str(graph_path), str(inferred), check_type=True, strict_mode=True
        )
        os.replace(inferred, graph_path)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{graph_path}: ONNX checker/shape inference failed: {e}") from e
    check_io(graph_path, tile_out, expect_input, trt_strict=trt_strict)
    return graph_path, data_path


def _declare_output_shape(model: onnx.ModelProto, tile_out: int | None) -> None:
    """Write the static output tile into the graph's declared output shape.

    The traced graph computes upsample sizes from Shape ops, which ONNX shape inference cannot fold, so
    the exporter leaves the spatial output dims symbolic. They are static by construction (fixed input
    tile); declaring them lets consumers (TensorRT, ORT, the runtime) see the real shape.
    """
    out = model.graph.output[0]
    dims = out.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ExportError(f"output {out.name} has rank {len(dims)}, expected 4 (NHWC)")
    for i, sym in ((1, "out_height"), (2, "out_width")):
        if tile_out is None and dims[i].dim_param:
            continue
        dims[i].Clear()
        if tile_out is None:
            dims[i].dim_param = sym
        else:
            dims[i].dim_value = tile_out
    if not dims[0].dim_param:
        dims[0].Clear()
        dims[0].dim_param = "batch"


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim
    ]


def check_io(
    graph_path: Path,
    tile_out: int | None,
    expect_input: tuple[int, ...] | None = None,
    *,
    trt_strict: bool = True,
) -> None:
    """The graph has exactly `lr_tile` uint8 [batch,t,t,C] → `sr_tile` uint8 [batch,T,T,C]
    (`tile_out` None: [batch,H,W,C] → [batch,H',W',C] with H, W dynamic, for ONNX Runtime only)."""
    m = onnx.load(str(graph_path), load_external_data=False)
    ins = [i for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
    outs = list(m.graph.output)
    if [i.name for i in ins] != [INPUT_NAME] or [o.name for o in outs] != [OUTPUT_NAME]:
        raise ExportError(
            f"{graph_path}: expected {INPUT_NAME} → {OUTPUT_NAME}, "
            f"got {[i.name for i in ins]} → {[o.name for o in outs]}"
        )
    for v in (ins[0], outs[0]):
        if v.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
            raise ExportError(f"{graph_path}: {v.name} must be uint8")
    di, do = _dims(ins[0]), _dims(outs[0])
    if not isinstance(di[0], str) or not isinstance(do[0], str):
        raise ExportError(f"{graph_path}: batch axis is not dynamic ({di} → {do})")
    if expect_input and tuple(di[1:]) != tuple(expect_input):
        raise ExportError(f"{graph_path}: input tile {di[1:]} != {expect_input}")
    if tile_out is None:
        if len(di) != 4 or not all(isinstance(d, str) for d in (*di[1:3], *do[1:3])):
            raise ExportError(f"{graph_path}: height/width are not dynamic ({di} → {do})")
    elif tuple(do[1:3]) != (tile_out, tile_out):
        raise ExportError(f"{graph_path}: output tile {do[1:]} != {tile_out}×{tile_out} (shape inference)")
    # Every variant (fp32, fp16, int8/fp8 Q/DQ) passes here before it is recorded: a graph TensorRT
    # cannot parse or build fails now, on the CPU, not in the engine-build Job on a GPU node. GenDR
    # graphs (made for TensorRT) must pass; a community SR network that breaks a rule is still served
    # by ONNX Runtime, so it is a warning there and `gendr-build engine` refuses it with the reasons.
    # a dynamic graph is for ONNX Runtime only (no engine): TensorRT's static-shape rule does not apply
    problems = trt_problems(m, tile_out)
    if problems and trt_strict:
        raise ExportError(
            f"{graph_path.name} breaks TensorRT's rules (engine_build/trt/rules.py): " + "; ".join(problems)
        )
    if problems and tile_out is not None:
        log.warning(
            "%s: TensorRT cannot build this graph (ONNX Runtime serves it; engines are refused): %s",
            graph_path,
            "; ".join(problems),
        )


def trt_problems(model: onnx.ModelProto | Path, tile_out: int | None) -> list[str]:
    """TensorRT's rules for a tile graph (or file); a dynamic graph (`tile_out` None) skips the static-shape
    rule, since it is served by ONNX Runtime only."""
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    ins = [i for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
    di = _dims(ins[0]) if ins else []
    tile = di[1] if len(di) > 1 and isinstance(di[1], int) else None
    return check_graph(m, tile=tile, out_tile=tile_out, static=tile_out is not None)
