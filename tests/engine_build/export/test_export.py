"""ONNX export of the fused tile graph into a model repository (tiny GenDR, toy single network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from engine_build.export.exporter import (
    DATA_FILE,
    INPUT_NAME,
    OUTPUT_NAME,
    Fp16Options,
    export_gendr,
)
from engine_build.verify.parity import compare, graph_input_tiles, onnx_runner, torch_runner
from service.manifest import MANIFEST_FILE, ManifestError, read_manifest

TILE, OVERLAP = 64, 16  # as in conftest.py

torch = pytest.importorskip("torch")


def _dims(v: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]


def test_repository_layout_and_manifest(tiny_repo: Path) -> None:
    m = read_manifest(tiny_repo, verify=True)  # every artifact matches its sha256
    assert m.kind == "gendr" and m.name == "tiny" and m.native_scale == 4
    assert (m.tile.tile, m.tile.overlap, m.tile.graph_scale, m.tile.size_multiple) == (TILE, OVERLAP, 1, 16)
    assert set(m.onnx) == {"fp32", "fp16"}
    assert m.pipeline is not None and m.prompt_embeds is not None
    assert m.prompt_embeds.path == "checkpoint/prompt_embeds.safetensors"
    assert {a.path for a in m.checkpoint} >= {"checkpoint/gendr.json", "checkpoint/unet/config.json"}
    assert m.source.checkpoint_sha256 and len(m.source.checkpoint_sha256) == 64
    for p, v in m.onnx.items():
        assert v.graph.path == f"onnx/{p}/model.onnx" and v.external_data is None  # tiny: inline weights
        assert (v.input_name, v.output_name, v.opset) == (INPUT_NAME, OUTPUT_NAME, 18)
        assert len(v.key) == 64


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graph_io_checker_and_shapes(tiny_repo: Path, precision: str) -> None:
    path = tiny_repo / "onnx" / precision / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(path), str(path.with_suffix(".inferred")), strict_mode=True)
    path.with_suffix(".inferred").unlink()
    g = onnx.load(str(path)).graph
    (inp,), (out,) = list(g.input), list(g.output)
    assert (inp.name, out.name) == ("lr_tile", "sr_tile")
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert isinstance(_dims(inp)[0], str) and _dims(inp)[1:] == [
        TILE,
        TILE,
        3,
    ]  # dynamic batch, static NHWC tile
    assert isinstance(_dims(out)[0], str) and _dims(out)[1:] == [TILE, TILE, 3]
    # the fixed prompt embeddings are baked in: a [1,77,32] constant, no text-encoder input
    consts = [onnx.numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"]
    shapes = {tuple(t.dims) for t in g.initializer} | {c.shape for c in consts}
    assert (1, 77, 32) in shapes


def test_fp16_graph_keeps_the_overflow_prone_ops_in_fp32(tiny_repo: Path) -> None:
    m = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_repo / "onnx" / "fp16" / "model.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.value_info) + list(m.graph.output)}
    types.update({t.name: t.data_type for t in m.graph.initializer})
    inits = [t for t in m.graph.initializer if len(t.dims) == 4]  # conv weights
    assert inits and sum(t.data_type == onnx.TensorProto.FLOAT16 for t in inits) > 0.8 * len(inits)
    softmax_in = [types.get(n.input[0]) for n in m.graph.node if n.op_type == "Softmax"]
    norms_in = [
        types.get(n.input[0])
        for n in m.graph.node
        if n.op_type in ("InstanceNormalization", "GroupNormalization", "LayerNormalization")
    ]
    assert softmax_in and set(softmax_in) == {onnx.TensorProto.FLOAT}  # attention scores in fp32
    assert norms_in and set(norms_in) == {onnx.TensorProto.FLOAT}  # GroupNorm / LayerNorm statistics in fp32
    opts = read_manifest(tiny_repo).onnx["fp16"].options
    assert {"normalisation", "attention scores", "timestep embedding / scalar math"} <= set(
        opts["fp32_reasons"]
    )
    assert opts["scan"]["decoder_absmax"] < opts["scan"]["limit"] and opts["decoder_fp32"] is False  # auto


def test_fp32_onnx_matches_pytorch_on_real_photos_at_50db(tiny_repo: Path, small_photos) -> None:
    from engine_build.gendr.checkpoint import load_checkpoint

    ref = torch_runner(load_checkpoint(tiny_repo / "checkpoint"))
    ort_fn = onnx_runner(tiny_repo, "fp32")
    tiles = graph_input_tiles(small_photos, TILE, 1, 4, n=6, seed=3)
    for batch in (tiles[:1], tiles[1:4], tiles):  # the batch axis is dynamic
        got, want = ort_fn(batch), ref(batch)
        assert got.shape == want.shape == (len(batch), TILE, TILE, 3) and got.dtype == np.uint8
        m = compare(got, want)
        assert m["psnr_db"] >= 50.0, m
        assert m["max_abs_err"] <= 2, m


def test_second_export_is_skipped_and_keeps_the_manifest(repo_copy: Path, tiny_checkpoint: Path) -> None:
    before = (repo_copy / MANIFEST_FILE).read_bytes()
    graphs = {p: p.stat().st_mtime_ns for p in (repo_copy / "onnx").rglob("*.onnx*")}
    res = export_gendr(tiny_checkpoint, repo_copy, tile=TILE, overlap=OVERLAP)
    # hashing only: no graph was rewritten (a speed bound would depend on the machine)
    assert {p: p.stat().st_mtime_ns for p in (repo_copy / "onnx").rglob("*.onnx*")} == graphs
    assert [s.step for s in res.steps] == ["hash", "checkpoint", "onnx fp32", "onnx fp16"]  # no "load"
    assert all(s.skipped for s in res.steps if s.step != "hash"), res.summary()
    assert (repo_copy / MANIFEST_FILE).read_bytes() == before


def test_changing_an_option_re_exports_what_it_affects(repo_copy: Path, tiny_checkpoint: Path) -> None:
    old = read_manifest(repo_copy)
    res = export_gendr(
        tiny_checkpoint, repo_copy, tile=TILE, overlap=OVERLAP, fp16=Fp16Options(vae_decoder="fp32")
    )
    steps = {s.step: s.skipped for s in res.steps}
    assert steps["onnx fp32"] is True and steps["onnx fp16"] is False
    new = read_manifest(repo_copy, verify=True)
    assert new.onnx["fp32"] == old.onnx["fp32"]
    assert new.onnx["fp16"].key != old.onnx["fp16"].key
    assert new.onnx["fp16"].options["decoder_fp32"] is True
    assert new.onnx["fp16"].options["fp32_reasons"]["fp32 scope"] > 100  # every decoder node
    # overlap is a runtime setting, not part of the graph: the manifest changes, nothing is re-exported
    res = export_gendr(tiny_checkpoint, repo_copy, tile=TILE, overlap=8, precisions=("fp32",))
    assert all(s.skipped for s in res.steps if s.step.startswith("onnx"))
    assert read_manifest(repo_copy).tile.overlap == 8


def test_manifest_hash_mismatch_is_a_clear_error(repo_copy: Path, tiny_checkpoint: Path) -> None:
    graph = repo_copy / "onnx" / "fp32" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    graph.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"onnx/fp32/model\.onnx sha256 .* does not match the manifest"):
        read_manifest(repo_copy, verify=True)
    from engine_build.cli import main

    assert main(["verify", "--model", str(repo_copy), "--tiles", "1", "--whole", "0"]) == 2
    # the export notices the corrupt artifact and redoes that step (and only that one)
    res = export_gendr(tiny_checkpoint, repo_copy, tile=TILE, overlap=OVERLAP)
    steps = {s.step: s.skipped for s in res.steps}
    assert steps["onnx fp32"] is False and steps["onnx fp16"] is True
    read_manifest(repo_copy, verify=True)


def test_export_cli_with_external_data(
    tiny_checkpoint: Path, tiny_repo: Path, tmp_path: Path, small_photos, capsys
) -> None:
    from engine_build.cli import main

    out = tmp_path / "models" / "cli-tiny"
    base = [
        "export",
        "--checkpoint",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "--tile",
        "64",
        "--overlap",
        "16",
    ]
    assert main([*base, "--precision", "fp32", "--external-data", "always", "--no-copy-checkpoint"]) == 0
    assert "onnx fp32" in capsys.readouterr().out
    m = read_manifest(out, verify=True)
    v = m.onnx["fp32"]
    assert m.name == "cli-tiny" and list(m.onnx) == ["fp32"]
    assert v.external_data is not None and v.external_data.path == f"onnx/fp32/{DATA_FILE}"
    assert m.checkpoint == [] and m.prompt_embeds.path == "prompt_embeds.safetensors"
    tiles = graph_input_tiles(small_photos, TILE, 1, 4, n=2)
    a = onnx_runner(out, "fp32")(tiles)
    b = onnx_runner(tiny_repo, "fp32")(tiles)
    assert np.array_equal(a, b)  # same graph, weights stored outside


def test_export_cli_bad_inputs_are_one_line_errors(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from engine_build.cli import main

    out = str(tmp_path / "models" / "bad")
    ck = str(tiny_checkpoint)
    assert (
        main(["export", "--checkpoint", ck, "--out", out, "--tile", "72", "--overlap", "16"]) == 2
    )  # not ×16
    assert (
        main(["export", "--checkpoint", ck, "--out", out, "--tile", "64", "--overlap", "32"]) == 2
    )  # ≥ tile/2
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--out", out]) == 2
    assert (
        main(
            [
                "export",
                "--checkpoint",
                ck,
                "--out",
                out,
                "--tile",
                "64",
                "--overlap",
                "16",
                "--precision",
                "int8",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err), err
    assert "multiple of 16" in err[0] and "less than half the tile" in err[1] and "quantize" in err[3]


def test_export_single_network(toy_sr_export, small_photos) -> None:
    net, res = toy_sr_export
    m = read_manifest(res.model_dir, verify=True)
    assert m.kind == "single" and m.native_scale == 4 and m.tile.graph_scale == 4 and m.pipeline is None
    assert {"fp32", "fp16"} <= set(m.onnx)
    from engine_build.gendr.model import UnitRangeAdapter

    ref = torch_runner(UnitRangeAdapter(net))
    tiles = graph_input_tiles(small_photos, 32, 4, 4, n=4)
    for p, min_db in (("fp32", 50.0), ("fp16", 45.0)):
        got = onnx_runner(res.model_dir, p)(tiles)
        assert got.shape == (4, 128, 128, 3)
        assert compare(got, ref(tiles))["psnr_db"] >= min_db, p
    # the caller's module is untouched (fp16 conversion works on a copy)
    assert next(net.parameters()).dtype == torch.float32


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_service_runtime_loads_the_repository(tiny_repo: Path, small_photos, precision: str) -> None:
    """The ONNX Runtime backend of the service (no torch) serves what the export wrote."""
    from service.backends.onnxruntime import OnnxRuntimeBackend

    m = read_manifest(tiny_repo, verify=True)
    backend = OnnxRuntimeBackend(m, tiny_repo, provider="cpu", precision=precision, max_batch=2)
    backend.load()
    tiles = graph_input_tiles(small_photos, TILE, 1, 4, n=2)
    out = backend.infer(0, tiles)
    assert out.shape == (2, TILE, TILE, 3) and out.dtype == np.uint8
    ref = onnx_runner(tiny_repo, precision)(tiles)
    assert np.array_equal(out, ref)
