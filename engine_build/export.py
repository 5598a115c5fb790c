"""ONNX export of the fused tile graph into a model repository (`models/<name>/`).

The exported unit is `TileGraph(net)`: uint8 NHWC `lr_tile` [B, t, t, 3] → uint8 NHWC `sr_tile`
[B, t·s, t·s, 3] with normalisation, the network, clamping and rounding inside one graph; the fixed
prompt embeddings, timestep, α, β and scaling factor are constants of that graph. The batch axis is
dynamic; the tile shape is static (diffusers' UNet freezes its upsample sizes when traced, and static
shapes give the fastest TensorRT engines).

Steps, each idempotent (skipped when the manifest already holds an artifact with the same key and
the files match their sha256; redone when any input changed):

    checkpoint   copy of the checkpoint the export read (torch backend, verify)     gendr only
    onnx fp32    TorchScript exporter (dynamo=False: <1 s vs ≈19 s for the tiny model)
    onnx fp16    the fp32 graph rewritten to fp16 with fp32 islands (engine_build/fp16.py: norms,
                 Q·Kᵀ + softmax, timestep embedding, optionally the VAE decoder), every cast explicit

Graphs whose weights exceed EXTERNAL_DATA_THRESHOLD are written as `model.onnx` + one
`model.onnx.data` (protobuf cannot hold more than 2 GiB). Every graph passes `onnx.checker`
(full check) and strict shape inference before it is recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import nn

from engine_build.model import GenDR, TileGraph
from service.manifest import (
    MANIFEST_FILE,
    Artifact,
    Manifest,
    ManifestError,
    OnnxVariant,
    Source,
    TileGeometry,
    hash_inputs,
    make_artifact,
    read_manifest,
    sha256_file,
    verify_artifact,
    write_manifest,
)

log = logging.getLogger(__name__)

#: Bump when the exported graph changes for identical inputs (invalidates every cached export).
EXPORT_FORMAT = 1
#: opset 18: SDPA/LayerNormalization export cleanly (≥14 needed); ModelOpt lifts Q/DQ graphs to 19.
DEFAULT_OPSET = 18
#: Initializer bytes above which a graph is written with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30
ONNX_DIR = "onnx"
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
CHECKPOINT_DIR = "checkpoint"
INPUT_NAME = "lr_tile"
OUTPUT_NAME = "sr_tile"
#: GenDR defaults: 512-px tiles = the 512² training crops and SD2.1's native 64×64 latent;
#: 64-px overlap = 8 latent pixels of context/blending on each side.
GENDR_TILE = 512
GENDR_OVERLAP = 64
#: fp16 "auto" policy: an fp32 activation above this (fp16 max is 65504; 8× headroom for real
#: images brighter/more textured than the scan tiles) keeps the VAE decoder in fp32.
FP16_OVERFLOW_LIMIT = 8192.0

ExportPrecision = Literal["fp32", "fp16"]
EXPORT_PRECISIONS: tuple[str, ...] = ("fp32", "fp16")


class ExportError(RuntimeError):
    """An export step that cannot run or produced an invalid graph."""


# ---------------------------------------------------------------------------------------------
# Options, results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fp16Options:
    """Where the fp16 graph keeps fp32 (DESIGN.md §2: fp16 overflows or loses precision there)."""

    norms: Literal["fp32", "fp16"] = "fp32"  # GroupNorm / LayerNorm statistics (sum of squares)
    attention: Literal["fp32", "fp16"] = "fp32"  # Q·Kᵀ and softmax (SD2.1 needs upcast_attention)
    vae_decoder: Literal["auto", "fp32", "fp16"] = "auto"  # auto: fp32 if an activation scan overflows
    fp32_nodes: tuple[
        str, ...
    ] = ()  # ONNX node-name regexes kept in fp32, e.g. r"^/net/decoder/up_blocks\.3/"
    overflow_limit: float = FP16_OVERFLOW_LIMIT

    def key(self) -> dict[str, Any]:
        return {
            "norms": self.norms,
            "attention": self.attention,
            "vae_decoder": self.vae_decoder,
            "fp32_nodes": list(self.fp32_nodes),
            "overflow_limit": self.overflow_limit,
        }


@dataclass
class StepResult:
    step: str
    skipped: bool
    seconds: float
    detail: str = ""


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
# Low level: trace → ONNX file(s), checker, shape inference
# ---------------------------------------------------------------------------------------------


def trace_to_onnx(
    graph: nn.Module, tile: int, path: Path, opset: int = DEFAULT_OPSET, channels: int = 3
) -> None:
    """TorchScript-export `graph` (uint8 [B,t,t,C] → uint8) with a dynamic batch axis to `path`.

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
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def finalize_onnx(
    src: Path,
    dst_dir: Path,
    tile_out: int,
    external_data: bool | None = None,
    expect_input: tuple[int, ...] | None = None,
) -> tuple[Path, Path | None]:
    """Load `src` (with its external data), write `dst_dir/model.onnx` [+ model.onnx.data], then run
    the full checker and strict shape inference (the inferred graph, with value_info, is the result).
    """
    dst_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src), load_external_data=True)
    use_external = (
        external_data if external_data is not None else _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    )
    graph_path = dst_dir / GRAPH_FILE
    data_path = dst_dir / DATA_FILE if use_external else None
    for stale in (graph_path, dst_dir / DATA_FILE):  # onnx appends to an existing external-data file
        stale.unlink(missing_ok=True)
    model.producer_name = "gendr-serve"
    _declare_output_shape(model, tile_out)
    if use_external:
        onnx.save_model(
            model,
            str(graph_path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(graph_path))
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
    check_io(graph_path, tile_out, expect_input)
    return graph_path, data_path


def _declare_output_shape(model: onnx.ModelProto, tile_out: int) -> None:
    """Write the static output tile into the graph's declared output shape.

    The traced graph computes upsample sizes from Shape ops, which ONNX shape inference cannot fold, so
    the exporter leaves the spatial output dims symbolic. They are static by construction (fixed input
    tile); declaring them lets consumers (TensorRT, ORT, the runtime) see the real shape.
    """
    out = model.graph.output[0]
    dims = out.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ExportError(f"output {out.name} has rank {len(dims)}, expected 4 (NHWC)")
    for i in (1, 2):
        dims[i].Clear()
        dims[i].dim_value = tile_out
    if not dims[0].dim_param:
        dims[0].Clear()
        dims[0].dim_param = "batch"


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim
    ]


def check_io(graph_path: Path, tile_out: int, expect_input: tuple[int, ...] | None = None) -> None:
    """The graph has exactly `lr_tile` uint8 [batch,t,t,C] → `sr_tile` uint8 [batch,T,T,C]."""
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
    if tuple(do[1:3]) != (tile_out, tile_out):
        raise ExportError(f"{graph_path}: output tile {do[1:]} != {tile_out}×{tile_out} (shape inference)")


# ---------------------------------------------------------------------------------------------
# fp16: the fp32 graph rewritten with explicit fp32 islands (engine_build/fp16.py)
# ---------------------------------------------------------------------------------------------


def activation_absmax(net: nn.Module, x: torch.Tensor, prefixes: Sequence[str] = ("",)) -> dict[str, float]:
    """Largest |activation| of every leaf module under each prefix, from one fp32 forward on x ([-1,1])."""
    found: dict[str, float] = {}
    hooks = []

    def hook(name: str) -> Callable:
        def fn(_m, _i, out) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                found[name] = max(found.get(name, 0.0), float(out.detach().abs().max()))

        return fn

    for name, m in net.named_modules():
        if not list(m.children()) and any(name.startswith(p) for p in prefixes):
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return found


def scan_tiles(tile: int, graph_scale: int, native_scale: int, n: int = 2) -> torch.Tensor:
    """Real-photo graph-input tiles ([-1,1] NCHW) for the fp16 activation scan."""
    from engine_build.verify import builtin_photos, graph_input_tiles

    try:
        photos = builtin_photos()
    except Exception as e:  # scikit-image missing: a deterministic textured stand-in
        log.warning("fp16 scan: no bundled photos (%s); using a synthetic pattern", e)
        g = np.linspace(0, 255, 256, dtype=np.float32)
        rng = np.random.default_rng(0)
        img = (g[None, :, None] * 0.5 + g[:, None, None] * 0.5 + rng.normal(0, 20, (256, 256, 3))).clip(
            0, 255
        )
        photos = [("synthetic", img.astype(np.uint8))]
    tiles = graph_input_tiles(photos, tile, graph_scale, native_scale, n=n, seed=0)
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def fp16_decision(net: nn.Module, opts: Fp16Options, scan_input: torch.Tensor | None) -> dict[str, Any]:
    """Whether the VAE decoder runs in fp32, from the options or an activation scan on real tiles."""
    report: dict[str, Any] = {"decoder_fp32": opts.vae_decoder == "fp32"}
    if scan_input is None:
        return report
    t0 = time.perf_counter()
    has_decoder = isinstance(net, GenDR)
    amax = activation_absmax(net, scan_input)
    dec = max((v for k, v in amax.items() if k.startswith("vae.decoder")), default=0.0)
    other = max((v for k, v in amax.items() if not k.startswith("vae.decoder")), default=0.0)
    report["scan"] = {
        "decoder_absmax": dec,
        "other_absmax": other,
        "limit": opts.overflow_limit,
        "tiles": int(scan_input.shape[0]),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if has_decoder and opts.vae_decoder == "auto" and dec > opts.overflow_limit:
        report["decoder_fp32"] = True
        log.warning(
            "fp16: VAE decoder activations reach %.0f (> %.0f): keeping the decoder in fp32",
            dec,
            opts.overflow_limit,
        )
    if other > opts.overflow_limit:
        worst = sorted(((v, k) for k, v in amax.items() if not k.startswith("vae.decoder")), reverse=True)[:3]
        log.warning(
            "fp16: activations up to %.0f in %s; check `gendr-build verify` and keep those scopes in "
            "fp32 with --fp16-fp32-node",
            other,
            ", ".join(k for _, k in worst),
        )
    return report


def convert_graph_fp16(
    src: Path,
    dst_dir: Path,
    tile_out: int,
    opts: Fp16Options,
    decoder_fp32: bool,
    external_data: bool | None,
    tile: int,
) -> tuple[Path, Path | None, dict[str, Any]]:
    """fp32 ONNX file → fp16 ONNX folder (checked like every export) and the conversion report."""
    from engine_build.fp16 import DECODER_SCOPES, convert_to_fp16, fp32_nodes

    model = onnx.load(str(src), load_external_data=True)
    patterns = list(opts.fp32_nodes) + (list(DECODER_SCOPES) if decoder_fp32 else [])
    keep = fp32_nodes(
        model.graph, norms=opts.norms == "fp32", attention=opts.attention == "fp32", name_patterns=patterns
    )
    if opts.fp32_nodes and not any(re.search(p, n) for p in opts.fp32_nodes for n in keep):
        raise ExportError(f"fp16: no ONNX node name matches {list(opts.fp32_nodes)}")
    model, rep = convert_to_fp16(model, keep)
    tmp = dst_dir.parent / f".{dst_dir.name}-raw"
    shutil.rmtree(tmp, ignore_errors=True)  # onnx appends to an existing external-data file
    tmp.mkdir(parents=True)
    try:
        raw = tmp / GRAPH_FILE
        if _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
            onnx.save_model(
                model,
                str(raw),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=DATA_FILE,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(raw))
        del model
        graph, data = finalize_onnx(raw, dst_dir, tile_out, external_data, (tile, tile, 3))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return graph, data, {"fp32_node_patterns": patterns, **rep.as_dict()}


# ---------------------------------------------------------------------------------------------
# Repository helpers
# ---------------------------------------------------------------------------------------------


def _tmp_dir(parent: Path, tag: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=f".tmp-{tag}-"))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; the old one is removed only after the new one is there."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _variant_ok(model_dir: Path, v: OnnxVariant | None, key: str) -> bool:
    if v is None or v.key != key:
        return False
    try:
        verify_artifact(model_dir, v.graph)
        if v.external_data:
            verify_artifact(model_dir, v.external_data)
    except ManifestError as e:
        log.warning("%s", e)
        return False
    return True


def existing_manifest(model_dir: Path) -> Manifest | None:
    if not (model_dir / MANIFEST_FILE).is_file():
        return None
    try:
        return read_manifest(model_dir, verify=False)
    except ManifestError as e:
        log.warning("ignoring unreadable manifest: %s", e)
        return None


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
        t0 = time.perf_counter()
        if not force and _variant_ok(model_dir, manifest.onnx.get(p), key):
            steps.append(StepResult(f"onnx {p}", True, time.perf_counter() - t0, "same key, files match"))
            log.info("onnx %s: up to date (key %s…), skipped", p, key[:12])
            continue
        needs_net = p == "fp32" or fp16.vae_decoder == "auto" or plan.kind == "single"
        if needs_net and plan._net is None:
            plan.net  # noqa: B018 (loads the network; timed separately from the export itself)
            steps.append(StepResult("load", False, plan.load_seconds, "weights → torch"))
            t0 = time.perf_counter()
        log.info("onnx %s: exporting %s tile %d → %d (opset %d)", p, plan.name, g.tile, g.out_tile, opset)
        tmp = _tmp_dir(model_dir / ONNX_DIR, p)
        try:
            report: dict[str, Any] = {"graph_base": graph_base}
            final = tmp / "final"
            if p == "fp32":
                raw = tmp / "raw"
                raw.mkdir()
                t_trace = time.perf_counter()
                trace_to_onnx(TileGraph(plan.net), g.tile, raw / GRAPH_FILE, opset)
                report["trace_seconds"] = round(time.perf_counter() - t_trace, 2)
                graph_path, data_path = finalize_onnx(
                    raw / GRAPH_FILE, final, g.out_tile, external_data, (g.tile, g.tile, 3)
                )
                shutil.rmtree(raw)
            else:
                scan = None
                if needs_net and (fp16.vae_decoder == "auto" or plan.kind == "single"):
                    scan = scan_tiles(g.tile, g.graph_scale, plan.native_scale)
                report.update(fp16_decision(plan.net if needs_net else nn.Identity(), fp16, scan))
                src = model_dir / manifest.onnx["fp32"].graph.path
                t_conv = time.perf_counter()
                graph_path, data_path, conv = convert_graph_fp16(
                    src, final, g.out_tile, fp16, report["decoder_fp32"], external_data, g.tile
                )
                report.update(conv)
                report["convert_seconds"] = round(time.perf_counter() - t_conv, 2)
            target = model_dir / ONNX_DIR / p
            replace_dir(final, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        graph_path = target / GRAPH_FILE
        data = target / DATA_FILE if data_path is not None else None
        report["seconds"] = round(time.perf_counter() - t0, 2)
        variant = OnnxVariant(
            precision=p,
            graph=make_artifact(model_dir, graph_path),
            external_data=make_artifact(model_dir, data) if data else None,
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
            opset=opset,
            key=key,
            options=report,
        )
        manifest = drop_stale(manifest, model_dir, [p], f"the {p} graph was re-exported", keep_self=True)
        onnx_map = dict(manifest.onnx)
        onnx_map[p] = variant
        manifest = manifest.model_copy(update={"onnx": onnx_map})
        write_manifest(model_dir, manifest)
        size = variant.graph.size + (variant.external_data.size if variant.external_data else 0)
        steps.append(StepResult(f"onnx {p}", False, report["seconds"], f"{size / 1e6:.1f} MB"))
    return manifest


def drop_stale(
    manifest: Manifest, model_dir: Path, precisions: Sequence[str], reason: str, keep_self: bool = False
) -> Manifest:
    """Remove variants (unless keep_self), the quantized graphs derived from them and every engine built
    from any of those, files included. Returns the new manifest (not written)."""
    gone = set(precisions)
    for q, v in manifest.onnx.items():
        if v.quantization and v.quantization.get("base") in gone:
            gone.add(q)
    onnx_map = {q: v for q, v in manifest.onnx.items() if q not in gone or (keep_self and q in precisions)}
    engines = [e for e in manifest.engines if e.precision not in gone]
    for q in gone - (set(precisions) if keep_self else set()):
        if q in manifest.onnx:
            log.warning("onnx %s removed: %s; re-run the step that makes it", q, reason)
            shutil.rmtree(model_dir / ONNX_DIR / q, ignore_errors=True)
    for e in manifest.engines:
        if e not in engines:
            log.warning("TensorRT %s engine for sm_%s removed: %s", e.precision, e.compute_capability, reason)
            (model_dir / e.plan.path).unlink(missing_ok=True)
    return manifest.model_copy(update={"onnx": onnx_map, "engines": engines})


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
    src: Path, model_dir: Path, files: dict[str, str], old: Manifest | None, steps: list[StepResult]
) -> list[Artifact]:
    t0 = time.perf_counter()
    dst = model_dir / CHECKPOINT_DIR
    want = {f"{CHECKPOINT_DIR}/{rel}": digest for rel, digest in files.items()}
    if old is not None and {a.path: a.sha256 for a in old.checkpoint} == want:
        try:
            for a in old.checkpoint:
                verify_artifact(model_dir, a)
            steps.append(StepResult("checkpoint", True, time.perf_counter() - t0, "same files"))
            return list(old.checkpoint)
        except ManifestError as e:
            log.warning("%s", e)
    tmp = _tmp_dir(model_dir, "checkpoint")
    try:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, tmp / rel)
        replace_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    arts = [make_artifact(model_dir, dst / rel) for rel in files]
    for a in arts:
        if a.sha256 != want[a.path]:
            raise ExportError(f"{a.path} changed while it was copied")
    steps.append(
        StepResult("checkpoint", False, time.perf_counter() - t0, f"{sum(a.size for a in arts) / 1e6:.1f} MB")
    )
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
        ckpt_arts = _copy_checkpoint(checkpoint, model_dir, files, old, steps)
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
        tmp = _tmp_dir(model_dir, "checkpoint")
        try:
            for f in files:
                shutil.copyfile(f, tmp / f.name)
            replace_dir(tmp, model_dir / CHECKPOINT_DIR)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        arts = [make_artifact(model_dir, model_dir / CHECKPOINT_DIR / f.name) for f in files]
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
