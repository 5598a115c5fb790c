"""Shape buckets: the same network at smaller static tiles, and (single CNN models) a whole-image graph.

A small image padded up to the primary tile wastes most of the call; each bucket is the same fused tile
graph traced at a smaller static square tile (`onnx/<precision>/t<tile>/model.onnx`), so the runtime runs
a small image on the smallest tile that holds it. The whole-image graph (`onnx/<precision>/dynamic/`)
has dynamic height and width and runs an image in one call; only for networks whose cost is about
linear in pixels, and kept only when it matches PyTorch at two sizes it was not traced at (a trace that
baked its size in, e.g. window attention, is refused with the measured figure).

Each graph is one `repository.run_step` (key = the variant's key + the tile), checked like the primary
graph (checker, shape inference, the I/O contract, TensorRT's rules: strict for GenDR at that tile; a
dynamic graph skips the static-shape rule, it is for ONNX Runtime only). fp16 buckets are converted from
the fp32 bucket with the primary fp16 graph's islands. Quantized graphs stay at the primary tile.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine_build.export.fp16_variant import convert_graph_fp16
from engine_build.export.keys import (
    DYNAMIC_REFUSED,
    BucketError,
    Fp16Options,
    export_order,
    shape_key,
    wanted_shapes,
)
from engine_build.export.onnx_graph import DATA_FILE, GRAPH_FILE, finalize_onnx, trace_to_onnx, trt_problems
from engine_build.export.steps import ExportPlan
from engine_build.gendr.model import TileGraph
from engine_build.repository import ONNX_DIR, StepResult, replace_dir, run_step
from engine_build.verify.shape_check import DYNAMIC_MIN_PSNR_DB, dynamic_check_sizes, dynamic_parity
from service.manifest import Manifest, ShapeGraph, make_artifact, write_manifest

log = logging.getLogger(__name__)

GENDR_WHOLE_IMAGE_REFUSAL = (
    "--whole-image: GenDR has no whole-image graph (diffusers' UNet freezes its upsample sizes when traced "
    "and attention cost grows with the square of the pixels); use --buckets for small images"
)


class DynamicRefused(Exception):
    """The whole-image graph does not match PyTorch at other sizes (or does not trace with dynamic H/W)."""


def shape_dir(precision: str, tile: int | None) -> str:
    return f"{ONNX_DIR}/{precision}/{f't{tile}' if tile is not None else 'dynamic'}"


def check_whole_image(kind: str, whole_image: bool) -> None:
    if whole_image and kind == "gendr":
        raise BucketError(GENDR_WHOLE_IMAGE_REFUSAL)


def export_shapes(
    plan: ExportPlan,
    manifest: Manifest,
    precisions: Sequence[str],
    opset: int,
    fp16: Fp16Options,
    external_data: bool | None,
    force: bool,
    steps: list[StepResult],
    buckets: Sequence[int],
    whole_image: bool,
) -> Manifest:
    """Export every wanted bucket / whole-image graph of each exported precision; drop unwanted ones."""
    check_whole_image(plan.kind, whole_image)
    want = wanted_shapes(buckets, whole_image)
    for p in export_order(precisions):
        manifest = drop_shapes(manifest, plan.model_dir, p, want)
        for t in want:
            manifest = _export_shape(plan, manifest, p, t, opset, fp16, external_data, force, steps)
    return manifest


def drop_shapes(manifest: Manifest, model_dir: Path, precision: str, want: Sequence[int | None]) -> Manifest:
    """Remove the shape graphs of `precision` not in `want` (files, entries and their engines)."""
    v = manifest.onnx.get(precision)
    if v is None:
        return manifest
    gone = [s for s in v.shapes if s.tile not in want]
    options = dict(v.options)
    stale_refusal = None not in want and options.pop(DYNAMIC_REFUSED, None) is not None
    if not gone and not stale_refusal:
        return manifest
    engines = list(manifest.engines)
    for s in gone:
        log.warning("%s removed: the %s bucket is no longer requested", shape_dir(precision, s.tile), s.tile)
        shutil.rmtree(model_dir / shape_dir(precision, s.tile), ignore_errors=True)
        for e in manifest.engines:
            if e.precision == precision and s.tile is not None and e.profile.tile == s.tile:
                (model_dir / e.plan.path).unlink(missing_ok=True)
                engines.remove(e)
    shapes = [s for s in v.shapes if s.tile in want]
    v = v.model_copy(update={"shapes": shapes, "options": options})
    manifest = manifest.model_copy(update={"onnx": {**manifest.onnx, precision: v}, "engines": engines})
    write_manifest(model_dir, manifest)
    return manifest


def _export_shape(
    plan: ExportPlan,
    manifest: Manifest,
    p: str,
    t: int | None,
    opset: int,
    fp16: Fp16Options,
    external_data: bool | None,
    force: bool,
    steps: list[StepResult],
) -> Manifest:
    model_dir, g, v = plan.model_dir, plan.geometry, manifest.onnx[p]
    key = shape_key(v.key, t)
    label = f"onnx {p} {'t' + str(t) if t is not None else 'dynamic'}"
    refused = v.options.get(DYNAMIC_REFUSED)
    if t is None and not force and isinstance(refused, dict) and refused.get("key") == key:
        log.warning("%s: no whole-image graph (%s): %s", plan.name, p, refused.get("reason"))
        steps.append(StepResult(label, True, 0.0, f"refused earlier: {refused.get('reason')}"))
        return manifest
    if p != "fp32" and manifest.shape_graph("fp32", t) is None:  # the fp32 whole-image graph was refused
        reason = "the fp32 whole-image graph was refused"
        return _record_refusal(manifest, model_dir, p, key, reason, steps, label)
    sg = manifest.shape_graph(p, t)
    recorded = (sg.key, [sg.graph, sg.external_data]) if sg else None
    needs_net = p == "fp32" or t is None
    if needs_net and not plan.loaded and (force or not (recorded and recorded[0] == key)):
        plan.net  # noqa: B018 (loads the network once; timed as its own step)
        steps.append(StepResult("load", False, plan.load_seconds, "weights → torch"))
    strict = plan.kind == "gendr"

    def produce(tmp: Path) -> tuple[Path, dict[str, Any]]:
        t0 = time.perf_counter()
        final, out_tile = tmp / "final", (t * g.graph_scale if t is not None else None)
        expect = (t, t, 3) if t is not None else None
        report: dict[str, Any] = {}
        if p == "fp32":
            raw = tmp / "raw"
            raw.mkdir()
            log.info("%s: tracing %s at %s", label, plan.name, t or f"{g.tile} with dynamic height/width")
            trace_to_onnx(TileGraph(plan.net), t or g.tile, raw / GRAPH_FILE, opset, dynamic_hw=t is None)
            finalize_onnx(raw / GRAPH_FILE, final, out_tile, external_data, expect, strict)
        else:
            src = model_dir / manifest.shape_graph("fp32", t).graph.path  # type: ignore[union-attr]
            decoder_fp32 = bool(v.options.get("decoder_fp32", False))
            ext = external_data
            _, _, conv = convert_graph_fp16(src, final, out_tile, fp16, decoder_fp32, ext, t, strict)
            report["fp32_node_patterns"] = conv.get("fp32_node_patterns", [])
        problems = trt_problems(final / GRAPH_FILE, out_tile)
        report["tensorrt"] = "ok" if not problems else problems
        if t is None:
            report["tensorrt"] = "no engine (dynamic height/width: ONNX Runtime only)"
            report["parity_db"] = _checked_parity(final / GRAPH_FILE, plan, p)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        return final, report

    def install(tmp: Path, made: tuple[Path, dict[str, Any]]) -> str:
        nonlocal manifest
        final, report = made
        target = model_dir / shape_dir(p, t)
        replace_dir(final, target)
        data = target / DATA_FILE
        new = ShapeGraph(
            tile=t,
            graph=make_artifact(model_dir, target / GRAPH_FILE),
            external_data=make_artifact(model_dir, data) if data.is_file() else None,
            key=key,
            options=report,
        )
        cur = manifest.onnx[p]
        shapes = [s for s in cur.shapes if s.tile != t] + [new]
        shapes.sort(key=lambda s: math.inf if s.tile is None else s.tile)
        options = {k: x for k, x in cur.options.items() if not (t is None and k == DYNAMIC_REFUSED)}
        cur = cur.model_copy(update={"shapes": shapes, "options": options})
        manifest = manifest.model_copy(update={"onnx": {**manifest.onnx, p: cur}})
        write_manifest(model_dir, manifest)
        return f"{new.graph.size / 1e6:.1f} MB"

    try:
        run_step(model_dir, label, key, recorded, produce, install, force=force, steps=steps,
                 parent=model_dir / ONNX_DIR)  # fmt: skip
    except DynamicRefused as e:
        return _record_refusal(manifest, model_dir, p, key, str(e), steps, label)
    return manifest


def _checked_parity(path: Path, plan: ExportPlan, p: str) -> dict[str, float | None]:
    """The whole-image graph's PSNR vs PyTorch at two untraced sizes; DynamicRefused below the bound."""
    from engine_build.verify.parity import builtin_photos

    g, photos = plan.geometry, builtin_photos()
    sizes = ", ".join(f"{h}×{w}" for h, w in dynamic_check_sizes(g.tile, g.size_multiple))
    try:
        figs = dynamic_parity(path, plan.net, g.tile, g.size_multiple, photos)
    except Exception as e:  # ONNX Runtime rejects a size the trace baked in (a Reshape to the tile)
        node = re.search(r"running (\w+) node\. Name:'([^']+)'", str(e))
        first = (
            f"{node[1]} {node[2]} fails" if node else (str(e).strip().splitlines() or [type(e).__name__])[0]
        )
        raise DynamicRefused(
            f"it does not run at {sizes} (the trace baked its size in): {first[:200]}"
        ) from e
    worst, bound = min(figs.values()), DYNAMIC_MIN_PSNR_DB.get(p, 40.0)
    if worst < bound:
        raise DynamicRefused(
            f"it matches PyTorch at only {worst:.1f} dB (< {bound:g} dB) at {sizes}: the trace baked "
            "sizes in (window attention / padding to a fixed size?)"
        )
    return {k: (None if math.isinf(x) else round(x, 2)) for k, x in figs.items()}


def _record_refusal(
    manifest: Manifest, model_dir: Path, p: str, key: str, reason: str, steps: list[StepResult], label: str
) -> Manifest:
    """Keep the repository without the whole-image graph; remember why, so a re-run does not retry it."""
    log.warning("%s: no whole-image graph (%s): %s", manifest.name, p, reason)
    steps.append(StepResult(label, False, 0.0, f"refused: {reason}"))
    shutil.rmtree(model_dir / shape_dir(p, None), ignore_errors=True)  # an older one, from other inputs
    v = manifest.onnx[p]
    shapes = [s for s in v.shapes if s.tile is not None]
    refusal = {DYNAMIC_REFUSED: {"key": key, "reason": reason}}
    v = v.model_copy(update={"shapes": shapes, "options": {**v.options, **refusal}})
    manifest = manifest.model_copy(update={"onnx": {**manifest.onnx, p: v}})
    write_manifest(model_dir, manifest)
    return manifest
