"""The export's variant steps: keys from every input, the lazily loaded network, the fp32 → fp16
sequence, the checkpoint copy — each one `engine_build.repository.run_step`."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from engine_build.export.fp16_variant import convert_graph_fp16, fp16_decision, scan_tiles
from engine_build.export.keys import EXPORT_FORMAT, EXPORT_PRECISIONS, Fp16Options, export_keys, export_order
from engine_build.export.onnx_graph import (
    DATA_FILE,
    GRAPH_FILE,
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    finalize_onnx,
    trace_to_onnx,
)
from engine_build.gendr.model import TileGraph
from engine_build.repository import CHECKPOINT_DIR, ONNX_DIR, StepResult, drop_stale, replace_dir, run_step
from service.manifest import (
    Artifact,
    Manifest,
    OnnxVariant,
    TileGeometry,
    hash_inputs,
    make_artifact,
    sha256_file,
    write_manifest,
)

log = logging.getLogger(__name__)


def checkpoint_digest(root: Path) -> tuple[str, dict[str, str]]:
    """sha256 of every file of a checkpoint folder, and one digest over all of them."""
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    }
    return hash_inputs(files), files


def state_dict_digest(net: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def make_geometry(tile: int, overlap: int, graph_scale: int, size_multiple: int) -> TileGeometry:
    """TileGeometry, with validation failures as one-line ExportErrors."""
    from pydantic import ValidationError

    try:
        return TileGeometry(tile=tile, overlap=overlap, graph_scale=graph_scale, size_multiple=size_multiple)
    except ValidationError as e:
        msgs = "; ".join(str(err.get("msg", err)).removeprefix("Value error, ") for err in e.errors())
        raise ExportError(f"invalid tile geometry (tile {tile}, overlap {overlap}): {msgs}") from e


class ExportPlan:
    """What the generic variant exporter needs to know about one model (the network loads lazily, so an
    up-to-date repository is checked from hashes alone)."""

    def __init__(
        self,
        model_dir: Path,
        name: str,
        kind: Literal["gendr", "single"],
        load: Callable[[], nn.Module],
        geometry: TileGeometry,
        native_scale: int,
        weights_digest: str,
        inplace_ok: bool,
    ) -> None:
        self.model_dir, self.name, self.kind = model_dir, name, kind
        self.geometry, self.native_scale = geometry, native_scale
        self.weights_digest, self.inplace_ok = weights_digest, inplace_ok
        self._load = load
        self._net: nn.Module | None = None
        self.load_seconds = 0.0

    @property
    def loaded(self) -> bool:
        """Whether the network was loaded already (an up-to-date step never loads it)."""
        return self._net is not None

    @property
    def net(self) -> nn.Module:
        """The [-1,1] → [-1,1] network, loaded on first use."""
        if self._net is None:
            t0 = time.perf_counter()
            self._net = self._load()
            self.load_seconds = time.perf_counter() - t0
        return self._net


def export_variants(
    plan: ExportPlan,
    manifest: Manifest,
    precisions: Sequence[str],
    opset: int,
    fp16: Fp16Options,
    external_data: bool | None,
    force: bool,
    steps: list[StepResult],
) -> Manifest:
    """Export fp32 then fp16 (as requested), updating and writing the manifest after each step."""
    model_dir = plan.model_dir
    for p in precisions:
        if p not in EXPORT_PRECISIONS:
            raise ExportError(
                f"unknown export precision {p!r} (export writes {', '.join(EXPORT_PRECISIONS)}; "
                "int8/fp8 come from `gendr-build quantize`)"
            )
    g = plan.geometry
    keys = export_keys(plan.kind, plan.weights_digest, g.tile, g.graph_scale, opset, external_data, fp16)
    graph_base = keys.graph_base
    stale = [
        q
        for q in EXPORT_PRECISIONS
        if q in manifest.onnx
        and q not in precisions
        and manifest.onnx[q].options.get("graph_base") != graph_base
    ]
    if stale:  # e.g. fp16 from another tile size, while only fp32 is re-exported now
        manifest = drop_stale(manifest, model_dir, stale, "it was exported for other weights/tile/opset")
        write_manifest(model_dir, manifest)
    order = export_order(precisions)
    for p in order:
        key = keys.variants[p]
        v = manifest.onnx.get(p)
        recorded = (v.key, [v.graph, v.external_data]) if v else None
        needs_net = p == "fp32" or fp16.vae_decoder == "auto" or plan.kind == "single"
        if needs_net and not plan.loaded and (force or not (recorded and recorded[0] == key)):
            plan.net  # noqa: B018 (loads the network; timed separately from the export itself)
            steps.append(StepResult("load", False, plan.load_seconds, "weights → torch"))

        def produce(tmp: Path, p: str = p, needs_net: bool = needs_net) -> tuple[Path, dict[str, Any]]:
            log.info("onnx %s: exporting %s tile %d → %d (opset %d)", p, plan.name, g.tile, g.out_tile, opset)
            t0 = time.perf_counter()
            report: dict[str, Any] = {"graph_base": graph_base}
            final = tmp / "final"
            if p == "fp32":
                raw = tmp / "raw"
                raw.mkdir()
                trace_to_onnx(TileGraph(plan.net), g.tile, raw / GRAPH_FILE, opset)
                report["trace_seconds"] = round(time.perf_counter() - t0, 2)
                finalize_onnx(
                    raw / GRAPH_FILE,
                    final,
                    g.out_tile,
                    external_data,
                    (g.tile, g.tile, 3),
                    plan.kind == "gendr",
                )
            else:
                scan = None
                if needs_net and (fp16.vae_decoder == "auto" or plan.kind == "single"):
                    scan = scan_tiles(g.tile, g.graph_scale, plan.native_scale)
                report.update(fp16_decision(plan.net if needs_net else nn.Identity(), fp16, scan))
                report["attention"] = fp16.attention  # fp16: TensorRT's fused attention kernels apply
                src = model_dir / manifest.onnx["fp32"].graph.path
                t_conv = time.perf_counter()
                _, _, conv = convert_graph_fp16(
                    src,
                    final,
                    g.out_tile,
                    fp16,
                    report["decoder_fp32"],
                    external_data,
                    g.tile,
                    plan.kind == "gendr",
                )
                report.update(conv)
                report["convert_seconds"] = round(time.perf_counter() - t_conv, 2)
            report["seconds"] = round(time.perf_counter() - t0, 2)
            return final, report

        def install(tmp: Path, made: tuple[Path, dict[str, Any]], p: str = p, key: str = key) -> str:
            nonlocal manifest
            final, report = made
            target = model_dir / ONNX_DIR / p
            replace_dir(final, target)
            data = target / DATA_FILE
            variant = OnnxVariant(
                precision=p,  # type: ignore[arg-type]
                graph=make_artifact(model_dir, target / GRAPH_FILE),
                external_data=make_artifact(model_dir, data) if data.is_file() else None,
                input_name=INPUT_NAME,
                output_name=OUTPUT_NAME,
                opset=opset,
                key=key,
                options=report,
            )
            manifest = drop_stale(manifest, model_dir, [p], f"the {p} graph was re-exported", keep_self=True)
            manifest = manifest.model_copy(update={"onnx": {**manifest.onnx, p: variant}})
            write_manifest(model_dir, manifest)
            size = variant.graph.size + (variant.external_data.size if variant.external_data else 0)
            return f"{size / 1e6:.1f} MB"

        run_step(
            model_dir,
            f"onnx {p}",
            key,
            recorded,
            produce,
            install,
            force=force,
            steps=steps,
            parent=model_dir / ONNX_DIR,
        )
    return manifest


def base_manifest(plan: ExportPlan, old: Manifest | None, **fields: Any) -> Manifest:
    """The manifest to build on: the previous one when it describes the same model, else a new one."""
    fresh = Manifest(
        name=plan.name,
        kind=plan.kind,
        native_scale=plan.native_scale,
        tile=plan.geometry,
        created_by=f"gendr-build export (format {EXPORT_FORMAT})",
        **fields,
    )
    if old is None:
        return fresh
    if old.kind != plan.kind or old.name != plan.name:
        log.warning("%s: existing manifest is for %s %r; replacing it", plan.model_dir, old.kind, old.name)
        return fresh
    keep = {"onnx": old.onnx, "engines": old.engines}
    if old.tile.tile != plan.geometry.tile or old.tile.graph_scale != plan.geometry.graph_scale:
        keep["engines"] = []
    return fresh.model_copy(update=keep)


def copy_checkpoint_files(
    src: dict[str, Path],
    model_dir: Path,
    files: dict[str, str],
    old: Manifest | None,
    steps: list[StepResult],
) -> list[Artifact]:
    """The checkpoint the export read (relative path → source file, relative path → sha256), copied
    into the repository's checkpoint/ (the torch backend and verify rebuild the network from it)."""
    want = {f"{CHECKPOINT_DIR}/{rel}": digest for rel, digest in files.items()}
    key = hash_inputs("checkpoint", want)
    recorded = None
    if old is not None and old.checkpoint:
        recorded = (hash_inputs("checkpoint", {a.path: a.sha256 for a in old.checkpoint}), old.checkpoint)
    arts: list[Artifact] = list(old.checkpoint) if old is not None else []

    def produce(tmp: Path) -> None:
        for rel in files:
            (tmp / "copy" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src[rel], tmp / "copy" / rel)

    def install(tmp: Path, _: None) -> str:
        nonlocal arts
        dst = model_dir / CHECKPOINT_DIR
        replace_dir(tmp / "copy", dst)
        arts = [make_artifact(model_dir, dst / rel) for rel in files]
        for a in arts:
            if a.sha256 != want[a.path]:
                raise ExportError(f"{a.path} changed while it was copied")
        return f"{sum(a.size for a in arts) / 1e6:.1f} MB"

    run_step(model_dir, "checkpoint", key, recorded, produce, install, steps=steps)
    return arts
