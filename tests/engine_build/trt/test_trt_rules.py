"""TensorRT's graph rules on CPU: each rule is broken by a crafted graph and reported; real exports pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine_build.trt.rules import TrtGraphError, check_graph, require_trt_compatible

T = 8  # crafted tiles: 8×8 RGB in and out


def _vi(name: str, dtype: int, dims: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, dims)


def tile_graph(
    middle: list[onnx.NodeProto] | None = None,
    *,
    head: list[onnx.NodeProto] | None = None,
    tail: list[onnx.NodeProto] | None = None,
    in_dims: list[int | str] | None = None,
    opset: int = 18,
    initializers: list[onnx.TensorProto] | None = None,
    functions: list[onnx.FunctionProto] | None = None,
    extra_opsets: list[onnx.OperatorSetIdProto] | None = None,
) -> onnx.ModelProto:
    """lr (uint8 NHWC) → Cast → Transpose → [middle: x → y] → Transpose → Cast(uint8) → sr (valid)."""
    head = head or [
        helper.make_node("Cast", ["lr"], ["lr_f"], name="cast_in", to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["lr_f"], ["x"], name="to_nchw", perm=[0, 3, 1, 2]),
    ]
    middle = middle if middle is not None else [helper.make_node("Relu", ["x"], ["y"], name="act")]
    tail = tail or [
        helper.make_node("Transpose", ["y"], ["y_nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Cast", ["y_nhwc"], ["sr"], name="cast_out", to=TensorProto.UINT8),
    ]
    graph = helper.make_graph(
        head + middle + tail,
        "tile",
        [_vi("lr", TensorProto.UINT8, in_dims or ["batch", T, T, 3])],
        [_vi("sr", TensorProto.UINT8, ["batch", T, T, 3])],
        initializer=initializers or [],
    )
    opsets = [helper.make_opsetid("", opset), *(extra_opsets or [])]
    return helper.make_model(graph, opset_imports=opsets, functions=functions or [], ir_version=10)


def _problem(problems: list[str], *needles: str) -> str:
    hits = [p for p in problems if all(n in p for n in needles)]
    assert hits, f"no problem mentions {needles}: {problems}"
    return hits[0]


def test_cast_first_cast_last_graph_passes() -> None:
    m = tile_graph()
    onnx.checker.check_model(m, full_check=True)
    assert check_graph(m, tile=T, out_tile=T) == []
    require_trt_compatible(m, tile=T, out_tile=T)


def test_identity_may_touch_the_uint8_boundary() -> None:
    head = [
        helper.make_node("Identity", ["lr"], ["lr_i"], name="id_in"),
        helper.make_node("Cast", ["lr_i"], ["lr_f"], name="cast_in", to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["lr_f"], ["x"], name="to_nchw", perm=[0, 3, 1, 2]),
    ]
    problems = check_graph(tile_graph(head=head))
    # Identity on the input is allowed, but its output is then an intermediate uint8 tensor
    assert problems == [_problem(problems, "'lr_i'", "intermediate uint8")]


def test_uint8_input_feeding_a_transpose_is_reported() -> None:
    head = [  # the pre-fix export: permute the uint8 tile, then cast
        helper.make_node("Transpose", ["lr"], ["lr_t"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["lr_t"], ["x"], name="cast_in", to=TensorProto.FLOAT),
    ]
    problems = check_graph(tile_graph(head=head), tile=T)
    p = _problem(problems, "uint8 input 'lr'", "node to_nchw (Transpose)")
    assert "Cast (or Identity)" in p
    _problem(problems, "'lr_t'", "intermediate uint8")


def test_uint8_output_from_a_transpose_is_reported() -> None:
    tail = [
        helper.make_node("Cast", ["y"], ["y_u8"], name="cast_out", to=TensorProto.UINT8),
        helper.make_node("Transpose", ["y_u8"], ["sr"], name="to_nhwc", perm=[0, 2, 3, 1]),
    ]
    problems = check_graph(tile_graph(tail=tail), tile=T)
    _problem(problems, "uint8 output 'sr'", "node to_nhwc (Transpose)")
    _problem(problems, "'y_u8'", "node cast_out (Cast)", "intermediate uint8")


def test_unsupported_and_unknown_ops_are_reported() -> None:
    unique = [helper.make_node("Unique", ["x"], ["u"], name="uniq"), helper.make_node("Relu", ["x"], ["y"])]
    _problem(check_graph(tile_graph(unique)), "node uniq (Unique)", "does not support Unique", "plugin")
    unknown = [helper.make_node("Sharpen", ["x"], ["y"], name="sharp")]
    _problem(check_graph(tile_graph(unknown)), "node sharp (Sharpen)", "not in onnx-tensorrt's matrix")


def test_custom_domain_op_needs_a_plugin() -> None:
    custom = [helper.make_node("FastUpscale", ["x"], ["y"], name="up", domain="com.example")]
    m = tile_graph(custom, extra_opsets=[helper.make_opsetid("com.example", 1)])
    _problem(check_graph(m), "node up (com.example.FastUpscale)", "custom domain", "plugin")


def test_model_local_function_is_checked_through_its_body() -> None:
    def fn(body_op: str) -> onnx.FunctionProto:
        body = [helper.make_node(body_op, ["a"], ["b"])]
        return helper.make_function("gendr.local", "Act", ["a"], ["b"], body, [helper.make_opsetid("", 18)])

    call = [helper.make_node("Act", ["x"], ["y"], name="act", domain="gendr.local")]
    ok = tile_graph(call, functions=[fn("Relu")], extra_opsets=[helper.make_opsetid("gendr.local", 1)])
    assert check_graph(ok) == []
    bad = tile_graph(call, functions=[fn("Unique")], extra_opsets=[helper.make_opsetid("gendr.local", 1)])
    _problem(check_graph(bad), "Unique", "plugin")


def test_dynamic_spatial_axis_is_reported() -> None:
    problems = check_graph(tile_graph(in_dims=["batch", "h", T, 3]))
    _problem(problems, "input 'lr' axis 1 is dynamic (h)", "only the batch axis")
    assert not any("axis 0" in p for p in problems)


def test_whole_image_graph_skips_only_the_static_shape_rule() -> None:
    """A dynamic-H/W graph is for ONNX Runtime (no engine): its spatial axes are fine, nothing else is."""
    assert check_graph(tile_graph(in_dims=["batch", "h", "w", 3]), static=False) == []
    uint8_transpose = [helper.make_node("Transpose", ["lr"], ["x_u8"], name="t_u8", perm=[0, 3, 1, 2])]
    uint8_transpose.append(helper.make_node("Cast", ["x_u8"], ["x"], name="c", to=TensorProto.FLOAT))
    bad = tile_graph(head=uint8_transpose, in_dims=["batch", "h", "w", 3])
    problems = check_graph(bad, static=False)
    _problem(problems, "t_u8")
    assert not any("dynamic" in p for p in problems)


def test_wrong_tile_size_is_reported() -> None:
    _problem(check_graph(tile_graph(), tile=16), "input 'lr'", "expected [batch, 16, 16, C]")
    _problem(check_graph(tile_graph(), out_tile=32), "output 'sr'", "expected [batch, 32, 32, C]")


def test_float64_and_string_tensors_are_reported() -> None:
    double = [
        helper.make_node("Cast", ["x"], ["x64"], name="up64", to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["x64"], ["y"], name="down32", to=TensorProto.FLOAT),
    ]
    _problem(check_graph(tile_graph(double)), "'x64'", "node up64 (Cast)", "DOUBLE", "clamping")
    label = helper.make_tensor("label", TensorProto.STRING, [1], [b"gendr"])
    string = [
        helper.make_node("Constant", [], ["tag"], name="tag", value=label),
        helper.make_node("Relu", ["x"], ["y"]),
    ]
    _problem(check_graph(tile_graph(string)), "'tag'", "STRING", "no such type")


def test_quantized_type_outside_qdq_is_reported() -> None:
    int8 = [  # an INT8 tensor fed to a float op (TensorRT's quantized types live only between Q and DQ)
        helper.make_node("Cast", ["x"], ["x8"], name="to_i8", to=TensorProto.INT8),
        helper.make_node("Relu", ["x8"], ["r8"], name="act8"),
        helper.make_node("Cast", ["r8"], ["y"], name="back", to=TensorProto.FLOAT),
    ]
    p = _problem(check_graph(tile_graph(int8)), "node act8 (Relu)", "'x8' is INT8")
    assert "BF16, FP16, FP32" in p


def test_qdq_pair_passes() -> None:
    scale = numpy_helper.from_array(np.array(0.02, np.float32), "scale")
    zp = numpy_helper.from_array(np.array(0, np.int8), "zp")
    qdq = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "scale", "zp"], ["y"], name="dq"),
    ]
    assert check_graph(tile_graph(qdq, opset=19, initializers=[scale, zp])) == []


def _qdq(zp: str | None) -> list[onnx.NodeProto]:
    ins = ["x", "scale", zp] if zp is not None else ["x", "scale"]
    return [
        helper.make_node("QuantizeLinear", ins, ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", *ins[1:]], ["y"], name="dq"),
    ]


def test_non_zero_zero_point_is_reported() -> None:
    """TensorRT's Q/DQ layers are symmetric only (NvInfer.h): an asymmetric zero point cannot build."""
    scale = numpy_helper.from_array(np.array(0.02, np.float32), "scale")
    zp = numpy_helper.from_array(np.array(-128, np.int8), "zp")
    problems = check_graph(tile_graph(_qdq("zp"), opset=19, initializers=[scale, zp]))
    p = _problem(problems, "node q (QuantizeLinear)", "zero point 'zp' is non-zero", "-128")
    assert "only symmetric quantization" in p
    _problem(problems, "node dq (DequantizeLinear)", "'zp'")


def test_computed_zero_point_is_reported_and_constant_or_absent_zeros_pass() -> None:
    scale = numpy_helper.from_array(np.array(0.02, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    computed = [helper.make_node("Identity", ["zero"], ["zp"], name="zp_id"), *_qdq("zp")]
    problems = check_graph(tile_graph(computed, opset=19, initializers=[scale, zero]))
    _problem(problems, "node q (QuantizeLinear)", "'zp' is computed")
    const = [helper.make_node("Constant", [], ["zp"], name="zp_c", value=zero), *_qdq("zp")]
    assert not any("zero point" in p for p in check_graph(tile_graph(const, opset=19, initializers=[scale])))
    absent = check_graph(tile_graph(_qdq(None), opset=19, initializers=[scale]))  # uint8: another rule's
    assert not any("zero point" in p for p in absent)


def test_onnx_runtime_quantizer_graph_breaks_the_zero_point_rule(tmp_path: Path) -> None:
    """The graph `gendr-build quantize --tool ort` writes (asymmetric int8 activations) is not TensorRT's."""
    pytest.importorskip("onnxruntime.quantization")
    from engine_build.quantize.ort import quantize_static_int8

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.2, (4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.2, (3, 4, 3, 3)).astype(np.float32), "w2")
    k = numpy_helper.from_array(np.array(1 / 255, np.float32), "k")
    head = [
        helper.make_node("Cast", ["lr"], ["lr_f"], name="cast_in", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["lr_f", "k"], ["lr_n"], name="norm"),
        helper.make_node("Transpose", ["lr_n"], ["x"], name="to_nchw", perm=[0, 3, 1, 2]),
    ]
    body = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"], name="act1"),
        helper.make_node("Conv", ["a1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save_model(tile_graph(body, head=head, initializers=[w1, w2, k]), str(src))
    tiles = rng.integers(0, 256, (4, T, T, 3), dtype=np.uint8)
    quantize_static_int8(src, dst, "lr", tiles)
    problems = check_graph(onnx.load(str(dst)), tile=T, out_tile=T)
    assert problems and all("symmetric quantization" in p for p in problems), problems
    _problem(problems, "(QuantizeLinear)", "is non-zero")


def test_opset_outside_the_parsers_range_is_reported() -> None:
    _problem(check_graph(tile_graph(opset=8)), "opset 8", "9..24")


def test_require_raises_with_every_problem_and_needs_no_weights(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.full((3, 3, 1, 1), 0.5, np.float32), "w")
    conv = [helper.make_node("Conv", ["x", "w"], ["y"], name="mix")]
    head = [
        helper.make_node("Transpose", ["lr"], ["lr_t"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["lr_t"], ["x"], name="cast_in", to=TensorProto.FLOAT),
    ]
    m = tile_graph(conv, head=head, initializers=[w])
    path = tmp_path / "model.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    (tmp_path / "model.onnx.data").unlink()  # the check must not read the weights
    with pytest.raises(TrtGraphError) as e:
        require_trt_compatible(path, tile=T)
    assert isinstance(e.value, RuntimeError)
    lines = str(e.value).splitlines()
    assert lines[0].startswith(str(path)) and "2 TensorRT incompatibilities" in lines[0]
    assert any("node to_nchw (Transpose)" in ln for ln in lines[1:])


def test_torch_export_of_the_old_tile_layout_is_caught(tmp_path: Path) -> None:
    """Real exporter output, not a crafted graph: permute-then-cast (the layout before the fix) fails."""
    torch = pytest.importorskip("torch")
    from engine_build.export.exporter import trace_to_onnx

    class PermuteFirst(torch.nn.Module):
        def forward(self, tile: torch.Tensor) -> torch.Tensor:
            x = tile.permute(0, 3, 1, 2).float() / 255.0
            return (x * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    trace_to_onnx(PermuteFirst(), T, tmp_path / "m.onnx")
    problems = check_graph(onnx.load(str(tmp_path / "m.onnx")), tile=T)
    _problem(problems, "uint8 input", "(Transpose)")
    _problem(problems, "uint8 output", "(Transpose)")


def _variant_problems(model_dir: Path, precision: str) -> list[str]:
    from service.manifest import read_manifest

    m = read_manifest(model_dir, verify=False)
    g = onnx.load(str(model_dir / m.onnx[precision].graph.path), load_external_data=False)
    return check_graph(g, tile=m.tile.tile, out_tile=m.tile.out_tile)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_tiny_export_passes(tiny_repo: Path, precision: str) -> None:
    assert _variant_problems(tiny_repo, precision) == []


def test_real_int8_qdq_graph_passes(int8_repo) -> None:
    pytest.importorskip("modelopt.onnx.quantization")
    assert _variant_problems(int8_repo.model_dir, "int8") == []


def test_real_fp8_qdq_graph_passes(repo_copy: Path) -> None:
    pytest.importorskip("modelopt.onnx.quantization")
    from engine_build.quantize.quantizer import quantize_model

    quantize_model(repo_copy, "fp8", calib="builtin", n_tiles=4, target_gpu="l20")
    assert _variant_problems(repo_copy, "fp8") == []
