"""ONNX export of the fused tile graph into a model repository (`models/<name>/`).

The exported unit is `TileGraph(net)`: uint8 NHWC `lr_tile` [B, t, t, 3] → uint8 NHWC `sr_tile`
[B, t·s, t·s, 3] with normalisation, the network, clamping and rounding inside one graph; the fixed
prompt embeddings, timestep, α, β and scaling factor are constants of that graph. The batch axis is
dynamic; the tile shape is static (diffusers' UNet freezes its upsample sizes when traced, and static
shapes give the fastest TensorRT engines).

Steps, each one `engine_build.repository.run_step` (skipped when the manifest already holds an
artifact with the same key and the files match their sha256; redone when any input changed):

    checkpoint   copy of the checkpoint the export read (torch backend, verify)     gendr only
    onnx fp32    TorchScript exporter (dynamo=False: <1 s vs ≈19 s for the tiny model)
    onnx fp16    the fp32 graph rewritten to fp16 with fp32 islands (engine_build/fp16.py: norms,
                 Q·Kᵀ + softmax, timestep embedding, optionally the VAE decoder), every cast explicit

Writing and checking a graph is engine_build/onnx_graph.py (checker, shape inference, I/O, TensorRT's
rules); the fp16 rewrite is engine_build/export_fp16.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx
import torch
from torch import nn

from engine_build.export_fp16 import (
    FP16_OVERFLOW_LIMIT,
    Fp16Options,
    activation_absmax,
    convert_graph_fp16,
    fp16_decision,
    scan_tiles,
)
from engine_build.model import TileGraph
from engine_build.onnx_graph import (
    DATA_FILE,
    DEFAULT_OPSET,
    EXTERNAL_DATA_THRESHOLD,
    GRAPH_FILE,
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    check_io,
    finalize_onnx,
    save_onnx,
    trace_to_onnx,
)
from engine_build.repository import (
    CHECKPOINT_DIR,
    ONNX_DIR,
    StepResult,
    drop_stale,
    existing_manifest,
    replace_dir,
    run_step,
)
from service.manifest import (
    Artifact,
    Manifest,
    ManifestError,
    OnnxVariant,
    Source,
    TileGeometry,
    hash_inputs,
    make_artifact,
    sha256_file,
    write_manifest,
)

log = logging.getLogger(__name__)

__all__ = [  # the export API in one place (the pieces live in onnx_graph.py and export_fp16.py)
    "DATA_FILE",
    "DEFAULT_OPSET",
    "EXTERNAL_DATA_THRESHOLD",
    "FP16_OVERFLOW_LIMIT",
    "GRAPH_FILE",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportError",
    "Fp16Options",
    "activation_absmax",
    "check_io",
    "convert_graph_fp16",
    "export_gendr",
    "export_single",
    "finalize_onnx",
    "fp16_decision",
    "save_onnx",
    "scan_tiles",
    "trace_to_onnx",
]

#: Bump when the exported graph changes for identical inputs (invalidates every cached export).
EXPORT_FORMAT = 2  # 2: Cast-first/Cast-last tile I/O (TensorRT's uint8 rule)
#: GenDR defaults: 512-px tiles = the 512² training crops and SD2.1's native 64×64 latent;
#: 64-px overlap = 8 latent pixels of context/blending on each side.
GENDR_TILE = 512
GENDR_OVERLAP = 64

ExportPrecision = Literal["fp32", "fp16"]
EXPORT_PRECISIONS: tuple[str, ...] = ("fp32", "fp16")


# ---------------------------------------------------------------------------------------------
# Options, results
# ---------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    model_dir: Path
    manifest: Manifest
    steps: list[StepResult] = field(default_factory=list)

    def summary(self) -> str:
        rows = [
            f"{s.step:<12} {'skipped' if s.skipped else 'done':<8} {s.seconds:8.2f} s  {s.detail}"
            for s in self.steps
        ]
        return "\n".join(rows)


def tool_versions() -> dict[str, str]:
    """Versions that change the exported bytes; part of every export key."""
    import importlib.metadata as md

    out = {"torch": torch.__version__, "onnx": onnx.__version__}
    for pkg in ("diffusers", "spandrel"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# Repository helpers
# ---------------------------------------------------------------------------------------------


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
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def make_geometry(tile: int, overlap: int, graph_scale: int, size_multiple: int) -> TileGeometry:
    """TileGeometry, with validation failures as one-line ExportErrors."""
    from pydantic import ValidationError

    try:
        return TileGeometry(tile=tile, overlap=overlap, graph_scale=graph_scale, size_multiple=size_multiple)
    except ValidationError as e:
        msgs = "; ".join(str(err.get("msg", err)).removeprefix("Value error, ") for err in e.errors())
        raise ExportError(f"invalid tile geometry (tile {tile}, overlap {overlap}): {msgs}") from e


class _Plan:
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
    def net(self) -> nn.Module:
        """The [-1,1] → [-1,1] network, loaded on first use."""
        if self._net is None:
            t0 = time.perf_counter()
            self._net = self._load()
            self.load_seconds = time.perf_counter() - t0
        return self._net


def _export_variants(
    plan: _Plan,
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
    versions = tool_versions()
    base = {
        "format": EXPORT_FORMAT,
        "kind": plan.kind,
        "weights": plan.weights_digest,
        "tile": g.tile,
        "graph_scale": g.graph_scale,
        "opset": opset,
        "io": [INPUT_NAME, OUTPUT_NAME],
        "external_data": external_data,
        "versions": versions,
    }
    graph_base = hash_inputs("onnx-base", base)
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
    keys = {"fp32": hash_inputs("onnx-fp32", base)}
    keys["fp16"] = hash_inputs("onnx-fp16", keys["fp32"], fp16.key())
    # fp16 is derived from the fp32 graph, so fp32 is always exported (and kept) first
    order = [p for p in EXPORT_PRECISIONS if p in precisions or (p == "fp32" and "fp16" in precisions)]
    for p in order:
        key = keys[p]
        v = manifest.onnx.get(p)
        recorded = (v.key, [v.graph, v.external_data]) if v else None
        needs_net = p == "fp32" or fp16.vae_decoder == "auto" or plan.kind == "single"
        if needs_net and plan._net is None and (force or not (recorded and recorded[0] == key)):
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
                finalize_onnx(raw / GRAPH_FILE, final, g.out_tile, external_data, (g.tile, g.tile, 3))
            else:
                scan = None
                if needs_net and (fp16.vae_decoder == "auto" or plan.kind == "single"):
                    scan = scan_tiles(g.tile, g.graph_scale, plan.native_scale)
                report.update(fp16_decision(plan.net if needs_net else nn.Identity(), fp16, scan))
                report["attention"] = fp16.attention  # fp16: TensorRT's fused attention kernels apply
                src = model_dir / manifest.onnx["fp32"].graph.path
                t_conv = time.perf_counter()
                _, _, conv = convert_graph_fp16(
                    src, final, g.out_tile, fp16, report["decoder_fp32"], external_data, g.tile
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


def _base_manifest(plan: _Plan, old: Manifest | None, **fields: Any) -> Manifest:
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


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def _copy_checkpoint(
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


def _peek_checkpoint(root: Path) -> tuple[Any, int]:
    """Pipeline metadata and size multiple from the small files, without loading weights; anything
    odd is handed to load_checkpoint so the user gets its precise error."""
    from engine_build.checkpoint import load_checkpoint, read_metadata, refuse_pickles
    from engine_build.presets import VAE_FACTOR

    if not root.is_dir():
        load_checkpoint(root)  # raises the right CheckpointError
    refuse_pickles(root)
    params = read_metadata(root)
    try:
        cfg = json.loads((root / "unet" / "config.json").read_text())
        n_down = len(cfg["block_out_channels"]) - 1
    except (OSError, ValueError, KeyError, TypeError):
        load_checkpoint(root)
        raise
    return params, VAE_FACTOR * 2**n_down


def export_gendr(
    checkpoint: str | Path,
    out_dir: str | Path,
    name: str | None = None,
    tile: int = GENDR_TILE,
    overlap: int = GENDR_OVERLAP,
    precisions: Sequence[str] = ("fp32", "fp16"),
    opset: int = DEFAULT_OPSET,
    fp16: Fp16Options | None = None,
    external_data: bool | None = None,
    copy_checkpoint: bool = True,
    force: bool = False,
    source: Source | None = None,
) -> ExportResult:
    """Export a GenDR checkpoint folder into the model repository entry `out_dir` (= models/<name>).

    The graph is scale-1 (graph_scale 1): the runtime bicubic-resizes each request to its target size
    first and the tile graph restores detail at that size, so one graph serves every scale.
    """
    from engine_build.checkpoint import EMBEDS_FILE, load_checkpoint

    checkpoint, model_dir = Path(checkpoint), Path(out_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    name = name or model_dir.name
    steps: list[StepResult] = []
    t0 = time.perf_counter()
    params, size_multiple = _peek_checkpoint(checkpoint)
    digest, files = checkpoint_digest(checkpoint)
    steps.append(StepResult("hash", False, time.perf_counter() - t0, f"{len(files)} checkpoint files"))
    geometry = make_geometry(tile, overlap, 1, size_multiple)

    def load() -> nn.Module:
        model = load_checkpoint(checkpoint)  # validates every tensor against its config before use
        if model.size_multiple != size_multiple or model.params != params:
            raise ExportError(f"{checkpoint} changed while it was being exported")
        return model

    plan = _Plan(model_dir, name, "gendr", load, geometry, params.native_scale, digest, inplace_ok=True)
    old = existing_manifest(model_dir)
    src = source or Source(description=f"GenDR checkpoint {checkpoint.name}")
    src = src.model_copy(update={"checkpoint_sha256": digest})
    if copy_checkpoint:
        sources = {rel: checkpoint / rel for rel in files}
        ckpt_arts = _copy_checkpoint(sources, model_dir, files, old, steps)
        emb = next(a for a in ckpt_arts if a.path == f"{CHECKPOINT_DIR}/{EMBEDS_FILE}")
    else:
        ckpt_arts = []
        dst = model_dir / EMBEDS_FILE
        if not dst.is_file() or sha256_file(dst) != files[EMBEDS_FILE]:
            shutil.copyfile(checkpoint / EMBEDS_FILE, dst)
        emb = make_artifact(model_dir, dst)
    manifest = _base_manifest(plan, old, pipeline=params, prompt_embeds=emb, checkpoint=ckpt_arts, source=src)
    write_manifest(model_dir, manifest)
    manifest = _export_variants(
        plan, manifest, precisions, opset, fp16 or Fp16Options(), external_data, force, steps
    )
    return ExportResult(model_dir, manifest, steps)


def export_single(
    net: nn.Module,
    scale: int,
    out_dir: str | Path,
    name: str,
    tile: int,
    overlap: int,
    source: Source,
    precisions: Sequence[str] = ("fp32", "fp16"),
    opset: int = DEFAULT_OPSET,
    unit_range: bool = True,
    size_multiple: int = 1,
    checkpoint_files: Iterable[str | Path] = (),
    fp16: Fp16Options | None = None,
    external_data: bool | None = None,
    force: bool = False,
) -> ExportResult:
    """Export one image-to-image network with a native integer `scale` (the `single` kind).

    `net` maps [0,1] NCHW → [0,1] at `scale`× (spandrel's ESRGAN convention) when `unit_range`,
    else [-1,1] → [-1,1]. `checkpoint_files` (safetensors) are copied to `checkpoint/` so the torch
    backend and `verify` can rebuild the network (spandrel loads them). The caller's module is not
    modified. `out_dir` is the model folder (models/<name>).
    """
    from engine_build.model import UnitRangeAdapter

    model_dir = Path(out_dir)
    steps: list[StepResult] = []
    wrapped = UnitRangeAdapter(net) if unit_range else net
    wrapped = wrapped.eval().float()
    geometry = make_geometry(tile, overlap, scale, size_multiple)
    t0 = time.perf_counter()
    digest = state_dict_digest(wrapped)
    plan = _Plan(model_dir, name, "single", lambda: wrapped, geometry, scale, digest, inplace_ok=False)
    old = existing_manifest(model_dir)
    arts: list[Artifact] = []
    files = [Path(f) for f in checkpoint_files]
    for f in files:
        if f.suffix != ".safetensors":
            raise ExportError(f"{f}: only .safetensors checkpoints are copied (nothing is unpickled)")
    if files:
        sources = {f.name: f for f in files}
        arts = _copy_checkpoint(sources, model_dir, {f.name: sha256_file(f) for f in files}, old, steps)
    steps.append(StepResult("load", False, time.perf_counter() - t0, "weights hashed"))
    src = source.model_copy(update={"checkpoint_sha256": source.checkpoint_sha256 or digest})
    manifest = _base_manifest(plan, old, checkpoint=arts, source=src)
    write_manifest(model_dir, manifest)
    manifest = _export_variants(
        plan,
        manifest,
        precisions,
        opset,
        fp16 or Fp16Options(vae_decoder="fp16"),
        external_data,
        force,
        steps,
    )
    return ExportResult(model_dir, manifest, steps)


def onnx_path(model_dir: Path, manifest: Manifest, precision: str) -> Path:
    v = manifest.onnx.get(precision)
    if v is None:
        have = ", ".join(manifest.onnx) or "none"
        raise ManifestError(
            f"{model_dir}: no {precision} ONNX graph (have: {have}); run `gendr-build export`/`quantize`"
        )
    return model_dir / v.graph.path


def describe(manifest: Manifest) -> str:
    return json.dumps(
        {
            p: {
                "graph": v.graph.path,
                "MB": round((v.graph.size + (v.external_data.size if v.external_data else 0)) / 1e6, 1),
                "key": v.key[:12],
            }
            for p, v in manifest.onnx.items()
        },
        indent=2,
    )
