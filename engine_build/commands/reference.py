"""`gendr-build make-tiny` and `gendr-build upscale` (the PyTorch reference path)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from service.backends.base import BackendUnavailable
from service.manifest import COLOR_FIXES

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg"), "webp": ("WEBP", ".webp")}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a deterministic tiny random GenDR checkpoint (tests, demos)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed → identical weights)")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("upscale", help="upscale images with the PyTorch reference pipeline")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders")
    p.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="GenDR checkpoint folder, or an ESRGAN-family .safetensors file",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--scale", type=float, help="output scale (default: the model's native scale)")
    size.add_argument("--width", type=int, help="output width (height keeps the aspect unless --height)")
    p.add_argument("--height", type=int, help="output height (width keeps the aspect unless --width)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--tile", type=int, help="tile edge in network-input pixels (default: 512 GenDR, 128 SR)")
    p.add_argument(
        "--overlap", type=int, help="tile overlap in network-input pixels (default: 64 GenDR, 16 SR)"
    )
    p.add_argument("--batch", type=int, default=1, help="tiles per forward pass")
    p.add_argument("--color-fix", default="default", choices=["default", *COLOR_FIXES])
    p.add_argument("--format", default="same", choices=["same", *FORMATS], help="output format")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality 1-100")
    p.set_defaults(func=cmd_upscale)


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from engine_build.gendr.checkpoint import make_tiny

    path = make_tiny(args.out, seed=args.seed)
    print(f"wrote tiny GenDR checkpoint to {path}")
    return 0


def collect_inputs(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()))
        else:
            files.append(p)  # a missing or unreadable file is reported per file, not fatal
    return files


def load_rgb(path: Path) -> tuple[np.ndarray, np.ndarray | None, Image.Image]:
    """RGB pixels (EXIF orientation applied), the alpha channel if any, and the opened image."""
    with Image.open(path) as im:
        im.load()
        fmt = im.format
        im = ImageOps.exif_transpose(im)
        im.format = fmt
    if im.mode.startswith("I"):  # 16/32-bit grayscale: convert("RGB") would clip it to white
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(a * 255 / 65535), 0, 255).astype(np.uint8))
        im.format = fmt
    alpha = None
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba)[:, :, 3]
        rgb = np.asarray(rgba.convert("RGB"))
    else:
        rgb = np.asarray(im.convert("RGB"))
    return rgb, alpha, im


def _load_runner(args: argparse.Namespace):
    """(runner, geometry, default colour fix, native scale) for a GenDR folder or an SR .safetensors."""
    from engine_build.gendr.presets import SR_OVERLAP, SR_TILE
    from engine_build.gendr.reference import DEFAULT_OVERLAP, DEFAULT_TILE, gendr_geometry
    from engine_build.verify.runners import torch_runner
    from service.manifest import TileGeometry

    ck: Path = args.checkpoint
    if ck.is_file() and ck.suffix == ".safetensors":
        from engine_build.gendr.model import UnitRangeAdapter
        from engine_build.sr.models import load_sr_safetensors
        from engine_build.sr.support import SpandrelCall

        desc = load_sr_safetensors(ck)
        net = UnitRangeAdapter(SpandrelCall(desc).eval())  # called as the export traced it
        tile, overlap = args.tile or SR_TILE, SR_OVERLAP if args.overlap is None else args.overlap
        geo = TileGeometry(tile=tile, overlap=overlap, graph_scale=int(desc.scale), size_multiple=1)
        return torch_runner(net, args.device, args.dtype, geo, args.batch), geo, "none", int(desc.scale)
    from engine_build.gendr.checkpoint import load_checkpoint

    model = load_checkpoint(ck)
    tile = args.tile or DEFAULT_TILE
    overlap = DEFAULT_OVERLAP if args.overlap is None else args.overlap
    geo = gendr_geometry(model, tile, overlap)
    return (
        torch_runner(model, args.device, args.dtype, geo, args.batch),
        geo,
        model.params.color_fix,
        model.params.native_scale,
    )


def save_image(
    rgb: np.ndarray,
    alpha: np.ndarray | None,
    src: Image.Image,
    out_dir: Path,
    stem: str,
    fmt: str,
    quality: int,
) -> Path:
    if fmt == "same":
        fmt = {"JPEG": "jpeg", "WEBP": "webp"}.get(src.format or "", "png")
        if alpha is not None and fmt == "jpeg":
            fmt = "png"
    pil_fmt, suffix = FORMATS[fmt]
    im = Image.fromarray(rgb)
    if alpha is not None and fmt != "jpeg":
        from service.pixels.imageops import resize_rgb

        a = resize_rgb(alpha[:, :, None], rgb.shape[0], rgb.shape[1])[:, :, 0]
        im.putalpha(Image.fromarray(a))
    kwargs: dict[str, object] = {}
    if fmt in ("jpeg", "webp"):
        kwargs["quality"] = quality
    if (icc := src.info.get("icc_profile")) and src.mode not in ("CMYK", "I", "I;16", "I;16B", "I;16L"):
        kwargs["icc_profile"] = icc
    out = out_dir / f"{stem}{suffix}"
    im.save(out, pil_fmt, **kwargs)
    return out


def cmd_upscale(args: argparse.Namespace) -> int:
    from service.pixels.imageops import target_size

    if args.quality < 1 or args.quality > 100:
        print("error: --quality must be 1-100", file=sys.stderr)
        return 2
    try:
        runner, geo, default_fix, native = _load_runner(args)
    except (ValueError, OSError, BackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    color_fix = default_fix if args.color_fix == "default" else args.color_fix
    files = collect_inputs(args.inputs)
    if not files:
        print("error: no input images found", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[Path, str]] = []
    t0 = time.perf_counter()
    with tqdm(files, desc="images", unit="img") as bar:
        for path in bar:
            bar.set_postfix_str(path.name)
            try:
                rgb, alpha, src = load_rgb(path)
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
                failed.append((path, f"unreadable image: {e}"))
                continue
            try:
                h, w = rgb.shape[:2]
                oh, ow = target_size(
                    h, w, scale=args.scale, out_width=args.width, out_height=args.height, default_scale=native
                )
                from service.pixels.pipeline import make_plan, run_sync

                n = make_plan(h, w, oh, ow, geo).n_tiles
                with tqdm(total=n, desc="  tiles", unit="tile", leave=False) as tbar:
                    out = run_sync(
                        rgb, oh, ow, geo, runner, batch=args.batch, color_fix=color_fix, progress=tbar.update
                    )
                save_image(out, alpha, src, args.out, path.stem, args.format, args.quality)
            except (ValueError, RuntimeError, OSError) as e:
                failed.append((path, str(e)))
    done = len(files) - len(failed)
    print(f"upscaled {done}/{len(files)} image(s) into {args.out} in {time.perf_counter() - t0:.1f} s")
    for path, why in failed:
        print(f"failed: {path}: {why}", file=sys.stderr)
    return 1 if failed else 0
