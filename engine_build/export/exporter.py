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
    onnx fp16    the fp32 graph rewritten to fp16 with fp32 islands (engine_build/export/fp16.py: norms,
                 Q·Kᵀ + softmax, timestep embedding, optionally the VAE decoder), every cast explicit
    onnx P tN    shape buckets: the same graph at smaller static tiles (`buckets`), and for single
    onnx P dynamic  CNNs a whole-image graph with dynamic H/W (engine_build/export/shapes.py)

Writing and checking a graph is engine_build/export/onnx_graph.py (checker, shape inference, I/O, TensorRT's
rules); the fp16 rewrite is engine_build/export/fp16_variant.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from engine_build.export.fp16_variant import (
    FP16_OVERFLOW_LIMIT,
    Fp16Options,
    activation_absmax,
    convert_graph_fp16,
    fp16_decision,
    scan_tiles,
)
from engine_build.export.keys import resolve_buckets
from engine_build.export.onnx_graph import (
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
from engine_build.export.shapes import check_whole_image, export_shapes
from engine_build.export.steps import (
    ExportPlan,
    base_manifest,
    checkpoint_digest,
    copy_checkpoint_files,
    export_variants,
    make_geometry,
    state_dict_digest,
)
from engine_build.gendr.presets import GENDR_OVERLAP, GENDR_TILE
from engine_build.repository import (
    CHECKPOINT_DIR,
    ONNX_DIR,
    StepResult,
    existing_manifest,
    replace_dir,
)
from service.manifest import (
    Artifact,
    Manifest,
    Source,
    make_artifact,
    sha256_file,
    write_manifest,
)

log = logging.getLogger(__name__)

__all__ = [
    "DATA_FILE",
    "DEFAULT_OPSET",
    "EXTERNAL_DATA_THRESHOLD",
    "FP16_OVERFLOW_LIMIT",
    "GRAPH_FILE",
    "INPUT_NAME",
    "ONNX_DIR",
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
    "replace_dir",  # the export API in one place (the pieces live in onnx_graph.py and export_fp16.py)
    "save_onnx",
    "scan_tiles",
    "trace_to_onnx",
]


ExportPrecision = Literal["fp32", "fp16"]


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
            f"{s.step:<18} {'skipped' if s.skipped else 'done':<8} {s.seconds:8.2f} s  {s.detail}"
            for s in self.steps
        ]
        return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Repository helpers
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def _peek_checkpoint(root: Path) -> tuple[Any, int]:
    """Pipeline metadata and size multiple from the small files, without loading weights; anything
    odd is handed to load_checkpoint so the user gets its precise error."""
    from engine_build.gendr.checkpoint import load_checkpoint, read_metadata, refuse_pickles
    from engine_build.gendr.presets import VAE_FACTOR

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
    buckets: Sequence[int] = (),
    whole_image: bool = False,
) -> ExportResult:
    """Export a GenDR checkpoint folder into the model repository entry `out_dir` (= models/<name>).

    The graph is scale-1 (graph_scale 1): the runtime bicubic-resizes each request to its target size
    first and the tile graph restores detail at that size, so one graph serves every scale. `buckets`:
    smaller static tiles exported beside the primary one (engine_build/export/shapes.py).
    """
    from engine_build.gendr.checkpoint import EMBEDS_FILE, load_checkpoint

    check_whole_image("gendr", whole_image)
    checkpoint, model_dir = Path(checkpoint), Path(out_dir)
    name = name or model_dir.name
    steps: list[StepResult] = []
    t0 = time.perf_counter()
    params, size_multiple = _peek_checkpoint(checkpoint)
    buckets = resolve_buckets(buckets, tile, size_multiple)  # refused before anything is written
    model_dir.mkdir(parents=True, exist_ok=True)
    digest, files = checkpoint_digest(checkpoint)
    steps.append(StepResult("hash", False, time.perf_counter() - t0, f"{len(files)} checkpoint files"))
    geometry = make_geometry(tile, overlap, 1, size_multiple)

    def load() -> nn.Module:
        model = load_checkpoint(checkpoint)  # validates every tensor against its config before use
        if model.size_multiple != size_multiple or model.params != params:
            raise ExportError(f"{checkpoint} changed while it was being exported")
        return model

    plan = ExportPlan(model_dir, name, "gendr", load, geometry, params.native_scale, digest, inplace_ok=True)
    old = existing_manifest(model_dir)
    src = source or Source(description=f"GenDR checkpoint {checkpoint.name}")
    src = src.model_copy(update={"checkpoint_sha256": digest})
    if copy_checkpoint:
        sources = {rel: checkpoint / rel for rel in files}
        ckpt_arts = copy_checkpoint_files(sources, model_dir, files, old, steps)
        emb = next(a for a in ckpt_arts if a.path == f"{CHECKPOINT_DIR}/{EMBEDS_FILE}")
    else:
        ckpt_arts = []
        dst = model_dir / EMBEDS_FILE
        if not dst.is_file() or sha256_file(dst) != files[EMBEDS_FILE]:
            shutil.copyfile(checkpoint / EMBEDS_FILE, dst)
        emb = make_artifact(model_dir, dst)
    manifest = base_manifest(plan, old, pipeline=params, prompt_embeds=emb, checkpoint=ckpt_arts, source=src)
    write_manifest(model_dir, manifest)
    fp16 = fp16 or Fp16Options()
    manifest = export_variants(plan, manifest, precisions, opset, fp16, external_data, force, steps)
    manifest = export_shapes(
        plan, manifest, precisions, opset, fp16, external_data, force, steps, buckets, False
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
    buckets: Sequence[int] = (),
    whole_image: bool = False,
    weights_digest: str | None = None,
) -> ExportResult:
    """Export one image-to-image network with a native integer `scale` (the `single` kind).

    `net` maps [0,1] NCHW → [0,1] at `scale`× (spandrel's ESRGAN convention) when `unit_range`,
    else [-1,1] → [-1,1]. `checkpoint_files` (safetensors) are copied to `checkpoint/` so the torch
    backend and `verify` can rebuild the network (spandrel loads them). The caller's module is not
    modified. `out_dir` is the model folder (models/<name>). `buckets` / `whole_image`: the same network
    at smaller static tiles / with dynamic height and width (engine_build/export/shapes.py).
    `weights_digest` (e.g. the sha256 of the safetensors file the network was built from) replaces the
    hash of its state dict in the step keys, so `export_keys.repository_up_to_date` can check without torch.
    """
    from engine_build.gendr.model import UnitRangeAdapter

    model_dir = Path(out_dir)
    steps: list[StepResult] = []
    wrapped = UnitRangeAdapter(net) if unit_range else net
    wrapped = wrapped.eval().float()
    geometry = make_geometry(tile, overlap, scale, size_multiple)
    buckets = resolve_buckets(buckets, tile, size_multiple)  # refused before anything is written
    t0 = time.perf_counter()
    digest = weights_digest or state_dict_digest(wrapped)
    plan = ExportPlan(model_dir, name, "single", lambda: wrapped, geometry, scale, digest, inplace_ok=False)
    old = existing_manifest(model_dir)
    arts: list[Artifact] = []
    files = [Path(f) for f in checkpoint_files]
    for f in files:
        if f.suffix != ".safetensors":
            raise ExportError(f"{f}: only .safetensors checkpoints are copied (nothing is unpickled)")
    if files:
        sources = {f.name: f for f in files}
        arts = copy_checkpoint_files(sources, model_dir, {f.name: sha256_file(f) for f in files}, old, steps)
    steps.append(StepResult("load", False, time.perf_counter() - t0, "weights hashed"))
    src = source.model_copy(update={"checkpoint_sha256": source.checkpoint_sha256 or digest})
    manifest = base_manifest(plan, old, checkpoint=arts, source=src)
    write_manifest(model_dir, manifest)
    fp16 = fp16 or Fp16Options(vae_decoder="fp16")
    manifest = export_variants(plan, manifest, precisions, opset, fp16, external_data, force, steps)
    manifest = export_shapes(
        plan, manifest, precisions, opset, fp16, external_data, force, steps, buckets, whole_image
    )
    return ExportResult(model_dir, manifest, steps)


def describe(manifest: Manifest) -> str:
    return json.dumps(
        {
            p: {
                "graph": v.graph.path,
                "MB": round((v.graph.size + (v.external_data.size if v.external_data else 0)) / 1e6, 1),
                "key": v.key[:12],
                "shapes": [s.graph.path for s in v.shapes],
            }
            for p, v in manifest.onnx.items()
        },
        indent=2,
    )
