"""`gendr-build export` (checkpoint → ONNX model repository) and `gendr-build verify` (parity table)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine_build.gendr.presets import GENDR_BUCKETS, GENDR_OVERLAP, GENDR_TILE

log = logging.getLogger(__name__)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def bucket_list(value: str) -> list[int]:
    """`--buckets 256,384` → [256, 384]; `none` (or an empty string) → no buckets."""
    if value.strip().lower() in ("", "none"):
        return []
    try:
        return [int(v) for v in _csv(value)]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected tile edges like 256,384 or 'none', got {value!r}") from e


def add_shape_options(p: argparse.ArgumentParser, default_buckets: tuple[int, ...], whole: bool) -> None:
    """--buckets (and, for single networks, --whole-image): the shape graphs beside the primary tile."""
    d = ",".join(map(str, default_buckets)) or "none"
    p.add_argument(
        "--buckets",
        type=bucket_list,
        default=None,
        metavar="LIST",
        help="smaller static tile edges also exported (shape buckets: a small image runs on the smallest "
        f"tile that holds it), comma-separated, or 'none' (default {d}: those below --tile that fit)",
    )
    if whole:
        p.add_argument(
            "--whole-image",
            dest="whole_image",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="also export a dynamic-height/width graph that runs a whole image in one call (ONNX "
            "Runtime; kept only when it matches PyTorch at other sizes; default: on for CNN architectures)",
        )
    else:
        p.add_argument(
            "--whole-image",
            dest="whole_image",
            action="store_true",
            help="refused for GenDR (its traced UNet has static sizes); listed so the refusal is clear",
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a GenDR checkpoint to ONNX (fp32 + fp16) into a model repository entry",
        description="Export the fused tile graph (uint8 lr_tile → uint8 sr_tile, fixed embeddings baked in, "
        "dynamic batch, static tile) into models/NAME with a manifest. Each step is skipped when its inputs "
        "are unchanged.",
    )
    p.add_argument(
        "--checkpoint", required=True, type=Path, help="GenDR checkpoint folder (diffusers layout)"
    )
    p.add_argument("--out", required=True, type=Path, help="model folder to write, e.g. models/gendr")
    p.add_argument("--name", help="model name in the manifest (default: the folder name)")
    p.add_argument(
        "--tile",
        type=int,
        default=GENDR_TILE,
        help=f"tile edge in graph-input pixels (default {GENDR_TILE}: GenDR's training crop, a 64² latent)",
    )
    p.add_argument(
        "--overlap",
        type=int,
        default=GENDR_OVERLAP,
        help=f"overlap between tiles in pixels (default {GENDR_OVERLAP} = 8 latent pixels of blending)",
    )
    p.add_argument(
        "--precision", type=_csv, default=["fp32", "fp16"], help="comma list of fp32,fp16 (default both)"
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (17-20; default 18)")
    p.add_argument(
        "--fp16-vae-decoder",
        choices=["auto", "fp16", "fp32"],
        default="auto",
        help="fp16 graph: run the VAE decoder in fp32 (auto: only if an activation scan on real "
        "photo tiles exceeds the fp16 headroom)",
    )
    p.add_argument(
        "--fp16-norms", choices=["fp32", "fp16"], default="fp32", help="GroupNorm/LayerNorm precision"
    )
    p.add_argument(
        "--fp16-attention",
        choices=["fp32", "fp16"],
        default="fp32",
        help="precision of attention scores (Q·Kᵀ, softmax)",
    )
    p.add_argument(
        "--fp16-fp32-node",
        action="append",
        default=[],
        metavar="REGEX",
        help="keep ONNX nodes whose name matches in fp32 (repeatable), e.g. '^/net/decoder/up_blocks\\.3/'",
    )
    p.add_argument(
        "--external-data",
        choices=["auto", "always", "never"],
        default="auto",
        help="write weights to model.onnx.data (auto: when over 1 GiB)",
    )
    p.add_argument(
        "--no-copy-checkpoint",
        action="store_true",
        help="do not copy the checkpoint into the repository (verify then needs --checkpoint)",
    )
    p.add_argument("--force", action="store_true", help="redo every step even when up to date")
    add_shape_options(p, GENDR_BUCKETS, whole=False)
    p.set_defaults(func=cmd_export)

    v = sub.add_parser(
        "verify",
        help="compare the repository's ONNX graphs (ONNX Runtime CPU) with the PyTorch reference",
        description="Max abs error and PSNR of uint8 outputs on tiles and whole images cut from real photos.",
    )
    v.add_argument("--model", required=True, type=Path, help="model folder, e.g. models/gendr")
    v.add_argument("--precision", type=_csv, help="comma list (default: every ONNX variant in the manifest)")
    v.add_argument("--images", type=Path, help="folder of photos (default: scikit-image's bundled photos)")
    v.add_argument("--tiles", type=int, default=8, help="tiles per variant (default 8)")
    v.add_argument(
        "--whole", type=int, default=3, help="whole images per variant (default 3; 0 = tiles only)"
    )
    v.add_argument("--batch", type=int, default=4, help="tiles per run")
    v.add_argument(
        "--checkpoint", type=Path, help="reference checkpoint (default: the repository's checkpoint/)"
    )
    v.add_argument("--json", type=Path, help="where to write the JSON report (default: MODEL/verify.json)")
    v.add_argument(
        "--min-psnr",
        action="append",
        default=[],
        metavar="PRECISION=DB",
        help="fail (exit 1) when a variant's worst PSNR is below DB, e.g. fp32=50 (repeatable)",
    )
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=cmd_verify)


def cmd_export(args: argparse.Namespace) -> int:
    from engine_build.export.exporter import ExportError, Fp16Options, describe, export_gendr
    from engine_build.export.keys import resolve_buckets
    from engine_build.export.shapes import check_whole_image
    from engine_build.gendr.checkpoint import CheckpointError
    from service.manifest import ManifestError

    check_whole_image("gendr", args.whole_image)  # before the checkpoint is read: a one-line refusal
    if args.buckets is None:  # the preset, where it fits this tile (GenDR's size multiple divides 256)
        buckets = list(resolve_buckets(GENDR_BUCKETS, args.tile, 1, strict=False))
    else:
        buckets = args.buckets

    ext = {"auto": None, "always": True, "never": False}[args.external_data]
    fp16 = Fp16Options(
        norms=args.fp16_norms,
        attention=args.fp16_attention,
        vae_decoder=args.fp16_vae_decoder,
        fp32_nodes=tuple(args.fp16_fp32_node),
    )
    try:
        res = export_gendr(
            args.checkpoint,
            args.out,
            name=args.name,
            tile=args.tile,
            overlap=args.overlap,
            precisions=args.precision,
            opset=args.opset,
            fp16=fp16,
            external_data=ext,
            copy_checkpoint=not args.no_copy_checkpoint,
            force=args.force,
            buckets=buckets,
        )
    except (CheckpointError, ExportError, ManifestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res.summary())
    print(describe(res.manifest))
    print(f"wrote {res.model_dir}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from engine_build.verify.parity import VerifyError, failures, load_photos, parse_thresholds, verify_model
    from service.manifest import ManifestError

    try:
        thresholds = parse_thresholds(args.min_psnr)
        photos = load_photos(args.images) if args.images else None
        report = verify_model(
            args.model,
            precisions=args.precision,
            photos=photos,
            n_tiles=args.tiles,
            n_images=args.whole,
            batch=args.batch,
            checkpoint=args.checkpoint,
            seed=args.seed,
        )
    except (VerifyError, ManifestError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    path = report.save(args.json or Path(args.model) / "verify.json")
    print(f"wrote {path}")
    bad = failures(report, thresholds)
    for b in bad:
        print(f"FAIL {b}", file=sys.stderr)
    return 1 if bad else 0
