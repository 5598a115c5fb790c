"""Shape buckets and the whole-image graph (engine_build/export/shapes.py), on the tiny models the suite
builds: the tiny GenDR checkpoint (tile 64 + a 32 bucket) and the toy ×4 CNN (tile 32 + a 16 bucket + a
dynamic-H/W graph)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from conftest import OVERLAP, TILE, ToySR  # noqa: E402

from engine_build.cli import main  # noqa: E402
from engine_build.export.exporter import export_gendr, export_single  # noqa: E402
from engine_build.gendr.model import UnitRangeAdapter  # noqa: E402
from engine_build.verify.parity import builtin_photos, failures, graph_input_tiles, verify_model  # noqa: E402
from engine_build.verify.shape_check import onnx_file_fn, photo_input, psnr, torch_fn  # noqa: E402
from service.manifest import MANIFEST_FILE, Source, read_manifest  # noqa: E402

BUCKET = 32  # tiny GenDR: a multiple of its size multiple 16, below the 64 tile
TOY_TILE, TOY_BUCKET = 32, 16


def _dims(v: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]


def _mtimes(model_dir: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (model_dir / "onnx").rglob("*.onnx*")}


@pytest.fixture(scope="module")
def gendr_buckets(tiny_repo: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the tiny repository re-exported with --buckets 32 (the primary graphs are skipped)."""
    dst = tmp_path_factory.mktemp("buckets") / "tiny"
    shutil.copytree(tiny_repo, dst)
    res = export_gendr(tiny_checkpoint, dst, tile=TILE, overlap=OVERLAP, buckets=(BUCKET,))
    return dst, res


@pytest.fixture(scope="module")
def toy_shapes(tmp_path_factory: pytest.TempPathFactory):
    net = ToySR().eval()
    out = tmp_path_factory.mktemp("toy-shapes") / "toy-sr"
    res = export_single(net, 4, out, "toy-sr", TOY_TILE, 4, Source(), buckets=(TOY_BUCKET,), whole_image=True)
    return net, res


def test_gendr_bucket_graphs_are_in_the_manifest_and_checked(gendr_buckets) -> None:
    model_dir, res = gendr_buckets
    m = read_manifest(model_dir, verify=True)  # every bucket graph matches its sha256
    steps = {s.step: s.skipped for s in res.steps}
    assert steps["onnx fp32"] and steps["onnx fp16"]  # the primary graphs were up to date
    assert not steps[f"onnx fp32 t{BUCKET}"] and not steps[f"onnx fp16 t{BUCKET}"]
    for p in ("fp32", "fp16"):
        assert m.tiles(p) == (BUCKET, TILE)
        sg = m.shape_graph(p, BUCKET)
        assert sg is not None and sg.graph.path == f"onnx/{p}/t{BUCKET}/model.onnx" and len(sg.key) == 64
        assert sg.options["tensorrt"] == "ok"  # TensorRT's rules, strict for GenDR, at that tile
        g = onnx.load(str(model_dir / sg.graph.path)).graph
        assert isinstance(_dims(g.input[0])[0], str) and _dims(g.input[0])[1:] == [BUCKET, BUCKET, 3]
        assert _dims(g.output[0])[1:] == [BUCKET, BUCKET, 3]
    assert m.shape_graph("fp32", None) is None  # GenDR never gets a whole-image graph


def test_gendr_bucket_graph_matches_pytorch_at_its_tile(gendr_buckets, small_photos) -> None:
    from engine_build.gendr.checkpoint import load_checkpoint

    model_dir, _ = gendr_buckets
    ref = torch_fn(load_checkpoint(model_dir / "checkpoint"))
    tiles = graph_input_tiles(small_photos, BUCKET, 1, 4, n=3, seed=1)
    m = read_manifest(model_dir)
    got = onnx_file_fn(model_dir / m.shape_graph("fp32", BUCKET).graph.path)(tiles)
    assert got.shape == (3, BUCKET, BUCKET, 3)
    assert psnr(got, ref(tiles)) >= 50.0
    # verify reports the bucket graphs as their own rows, held to their precision's bound
    report = verify_model(model_dir, photos=small_photos, n_tiles=2, n_images=0, reference=None)
    labels = {r.precision for r in report.rows}
    assert {f"fp32@t{BUCKET}", f"fp16@t{BUCKET}"} <= labels
    assert report.worst()[f"fp32@t{BUCKET}"]["min_psnr_db"] >= 50.0
    assert not failures(report, {"fp32": 50.0, "fp16": 40.0})
    assert failures(report, {"fp32": 1000.0}) and all("fp32" in f for f in failures(report, {"fp32": 1000.0}))


def test_same_flags_rewrite_nothing_and_dropping_a_bucket_removes_it(
    gendr_buckets, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    src, _ = gendr_buckets
    model_dir = tmp_path / "tiny"
    shutil.copytree(src, model_dir)
    before, graphs = (model_dir / MANIFEST_FILE).read_bytes(), _mtimes(model_dir)
    res = export_gendr(tiny_checkpoint, model_dir, tile=TILE, overlap=OVERLAP, buckets=(BUCKET,))
    assert all(s.skipped for s in res.steps if s.step != "hash"), res.summary()
    assert "load" not in [s.step for s in res.steps]  # hashes only: the network is never loaded
    assert _mtimes(model_dir) == graphs and (model_dir / MANIFEST_FILE).read_bytes() == before
    # drop the bucket: its graphs, folders and manifest entries go; the primary graphs stay untouched
    res = export_gendr(tiny_checkpoint, model_dir, tile=TILE, overlap=OVERLAP, buckets=())
    m = read_manifest(model_dir, verify=True)
    assert all(v.shapes == [] for v in m.onnx.values()) and m.tiles("fp32") == (TILE,)
    assert not (model_dir / "onnx" / "fp32" / f"t{BUCKET}").exists()
    assert not (model_dir / "onnx" / "fp16" / f"t{BUCKET}").exists()
    primary = model_dir / "onnx" / "fp32" / "model.onnx"
    assert primary.stat().st_mtime_ns == graphs[primary]


@pytest.mark.parametrize(
    ("value", "message"),
    [("40", "not a multiple of 16"), ("64", "not smaller than the primary tile 64"), ("96", "not smaller")],
)
def test_bad_bucket_values_exit_2_before_anything_is_written(
    tiny_checkpoint: Path, tmp_path: Path, capsys, value: str, message: str
) -> None:
    out = tmp_path / "models" / "bad"
    args = ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--tile", "64"]
    assert main([*args, "--overlap", "16", "--buckets", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --buckets") and message in err[0], err
    assert not out.exists()


def test_whole_image_is_refused_for_gendr(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "models" / "gendr"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--whole-image"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GenDR has no whole-image graph" in err[0] and "--buckets" in err[0], err
    assert not out.exists()
    with pytest.raises(ValueError, match="whole-image"):
        export_gendr(tiny_checkpoint, out, whole_image=True)


def test_sr_bucket_equals_the_primary_graph_on_the_same_content(toy_shapes, small_photos) -> None:
    """The toy CNN's context is ~3 input px: away from the borders a 16 tile cut from the middle of a 32
    tile gives the primary graph's pixels."""
    _, res = toy_shapes
    m = read_manifest(res.model_dir, verify=True)
    for p, bound in (("fp32", 50.0), ("fp16", 45.0)):
        assert m.tiles(p) == (TOY_BUCKET, TOY_TILE)
        big = graph_input_tiles(small_photos, TOY_TILE, 4, 4, n=2, seed=2)
        lo = (TOY_TILE - TOY_BUCKET) // 2
        small = np.ascontiguousarray(big[:, lo : lo + TOY_BUCKET, lo : lo + TOY_BUCKET])
        prim = onnx_file_fn(res.model_dir / m.onnx[p].graph.path)(big)
        buck = onnx_file_fn(res.model_dir / m.shape_graph(p, TOY_BUCKET).graph.path)(small)
        assert buck.shape == (2, TOY_BUCKET * 4, TOY_BUCKET * 4, 3)
        margin = 4 * 4  # 4 input px of context, ×4 output
        inner = slice(margin, TOY_BUCKET * 4 - margin)
        inner_prim = slice(lo * 4 + margin, (lo + TOY_BUCKET) * 4 - margin)
        assert psnr(buck[:, inner, inner], prim[:, inner_prim, inner_prim]) >= bound, p


def test_sr_whole_image_graph_runs_any_size_like_pytorch(toy_shapes) -> None:
    net, res = toy_shapes
    m = read_manifest(res.model_dir, verify=True)
    sg = m.shape_graph("fp32", None)
    assert sg is not None and sg.graph.path == "onnx/fp32/dynamic/model.onnx"
    figures = sg.options["parity_db"]  # PSNR at the two sizes the export checked (None: identical)
    assert len(figures) == 2 and all(x is None or x >= 50.0 for x in figures.values()), figures
    g = onnx.load(str(res.model_dir / sg.graph.path)).graph
    assert all(isinstance(d, str) for d in _dims(g.input[0])[:3])  # batch, height, width all dynamic
    fn, ref = onnx_file_fn(res.model_dir / sg.graph.path), torch_fn(UnitRangeAdapter(net))
    for h, w in ((40, 56), (72, 24)):  # neither the tile nor the sizes the export checked
        x = photo_input(h, w, 1, builtin_photos())
        got = fn(x)
        assert got.shape == (1, h * 4, w * 4, 3)
        assert psnr(got, ref(x)) >= 50.0
    assert m.shape_graph("fp16", None) is not None  # every exported precision gets one
    assert m.tiles("fp32") == (TOY_BUCKET, TOY_TILE)  # the dynamic graph is not a static tile


def test_sr_same_flags_rewrite_nothing(toy_shapes, tmp_path: Path) -> None:
    net, res = toy_shapes
    model_dir = tmp_path / "toy-sr"
    shutil.copytree(res.model_dir, model_dir)
    before, graphs = (model_dir / MANIFEST_FILE).read_bytes(), _mtimes(model_dir)
    again = export_single(
        net, 4, model_dir, "toy-sr", TOY_TILE, 4, Source(), buckets=(TOY_BUCKET,), whole_image=True
    )
    assert all(s.skipped for s in again.steps if s.step.startswith("onnx")), again.summary()
    assert _mtimes(model_dir) == graphs and (model_dir / MANIFEST_FILE).read_bytes() == before
    # whole image off: the dynamic graphs go, the bucket stays
    export_single(net, 4, model_dir, "toy-sr", TOY_TILE, 4, Source(), buckets=(TOY_BUCKET,))
    m = read_manifest(model_dir, verify=True)
    assert [s.tile for s in m.onnx["fp32"].shapes] == [TOY_BUCKET]
    assert not (model_dir / "onnx" / "fp32" / "dynamic").exists()


def test_whole_image_refused_when_the_trace_bakes_its_size_in(tmp_path: Path, caplog) -> None:
    """Window attention (SwinIR) reshapes to its traced size: the repository is kept without the graph,
    with the reason, and a re-run does not try again."""
    pytest.importorskip("spandrel")
    from engine_build.sr.zoo import entries

    net = next(e for e in entries(["SwinIR"]) if e.variant == "x2 light").build(0)
    out = tmp_path / "swin"
    kw = {"precisions": ("fp32",), "size_multiple": 8, "whole_image": True}
    res = export_single(net, 2, out, "swin", 32, 8, Source(), **kw)
    m = read_manifest(out, verify=True)
    assert m.onnx["fp32"].shapes == [] and not (out / "onnx" / "fp32" / "dynamic").exists()
    reason = m.onnx["fp32"].options["dynamic_refused"]["reason"]
    assert "does not run at" in reason or "dB" in reason
    assert any("no whole-image graph" in r.getMessage() for r in caplog.records)
    again = export_single(net, 2, out, "swin", 32, 8, Source(), **kw)
    step = next(s for s in again.steps if s.step == "onnx fp32 dynamic")
    assert step.skipped and "refused earlier" in step.detail
    assert [s.step for s in res.steps].count("onnx fp32 dynamic") == 1
