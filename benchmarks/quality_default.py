"""Quality of the default model (Real-ESRGAN ×4plus, exported ONNX) on real photos vs bicubic.

For each bundled photo (scikit-image: astronaut, coffee, chelsea, rocket; scikit-learn: china,
flower — no download) and each degradation:

* ``bicubic``: HR → bicubic ×¼ (Pillow, the pipeline's own resize): the classic LR/HR protocol;
* ``blur-jpeg``: Gaussian blur (σ = 1) → bicubic ×¼ → JPEG quality 75: closer to real uploads;

the LR image is upscaled ×4 by bicubic and by Real-ESRGAN through the exported ONNX graph in ONNX
Runtime (CPU) driven by ``service.pixels.pipeline.run_sync`` (the service's own tiling and stitching), and
both are compared with the original:

* PSNR (RGB, peak 255, ``--shave`` = 4 border pixels ignored as usual for ×4 SR) and SSIM (luma);
* gradient energy: mean squared horizontal + vertical luma differences, as a ratio to the
  original's (1.0 = as much fine detail/edge contrast as the original; bicubic is far below).

A GAN-trained model like Real-ESRGAN restores texture and edges that are plausible rather than
exact, so it is expected to be much sharper than bicubic at a *lower* PSNR (PSNR rewards the blur
that averages over all possible details); docs/default-model.md gives the measured band.

Outputs in ``--out-dir``: one side-by-side PNG per photo and degradation (LR-bicubic | Real-ESRGAN |
original, the whole image on top and a nearest-neighbour zoom of its most detailed 128² region
below), a table on
stdout and ``quality.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "china", "flower")
DEGRADATIONS = ("bicubic", "blur-jpeg")
SCALE = 4


# ---------------------------------------------------------------------------------------------
# Metrics (same definitions as tests/engine_build)
# ---------------------------------------------------------------------------------------------


def luma(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def psnr(a: np.ndarray, b: np.ndarray, shave: int = 0) -> float:
    if shave:
        a, b = a[shave:-shave, shave:-shave], b[shave:-shave, shave:-shave]
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def gradient_energy(img: np.ndarray) -> float:
    y = luma(img)
    return float(np.mean(np.diff(y, axis=0) ** 2) + np.mean(np.diff(y, axis=1) ** 2))


def ssim_luma(a: np.ndarray, b: np.ndarray, shave: int = 0) -> float | None:
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return None
    if shave:
        a, b = a[shave:-shave, shave:-shave], b[shave:-shave, shave:-shave]
    return float(structural_similarity(luma(a), luma(b), data_range=255.0))


# ---------------------------------------------------------------------------------------------
# Photos and degradations
# ---------------------------------------------------------------------------------------------


def load_photo(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        from skimage import data

        img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def prepare_hr(img: np.ndarray, max_side: int) -> np.ndarray:
    """Centre crop to at most max_side per side and to a multiple of the scale."""
    h, w = img.shape[:2]
    ch, cw = min(h, max_side) // SCALE * SCALE, min(w, max_side) // SCALE * SCALE
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(img[y : y + ch, x : x + cw])


def degrade(hr: np.ndarray, kind: str) -> np.ndarray:
    from PIL import Image, ImageFilter

    from service.pixels.imageops import resize_rgb

    h, w = hr.shape[:2]
    if kind == "bicubic":
        return resize_rgb(hr, h // SCALE, w // SCALE)
    if kind == "blur-jpeg":
        blurred = np.asarray(Image.fromarray(hr).filter(ImageFilter.GaussianBlur(radius=1.0)))
        lr = resize_rgb(blurred, h // SCALE, w // SCALE)
        buf = io.BytesIO()
        Image.fromarray(lr).save(buf, "JPEG", quality=75)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    raise ValueError(f"unknown degradation {kind!r} (known: {', '.join(DEGRADATIONS)})")


# ---------------------------------------------------------------------------------------------
# Side-by-side picture
# ---------------------------------------------------------------------------------------------


def detailed_window(img: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the size×size window with the most gradient energy (coarse search)."""
    h, w = img.shape[:2]
    if h <= size or w <= size:
        return 0, 0
    y = luma(img)
    g = np.zeros_like(y)
    g[:-1, :] += np.diff(y, axis=0) ** 2
    g[:, :-1] += np.diff(y, axis=1) ** 2
    best, pos = -1.0, (0, 0)
    step = max(8, size // 4)
    for yy in range(0, h - size + 1, step):
        for xx in range(0, w - size + 1, step):
            e = float(g[yy : yy + size, xx : xx + size].mean())
            if e > best:
                best, pos = e, (yy, xx)
    return pos


def side_by_side(panels: list[tuple[str, np.ndarray]], zoom_from: np.ndarray, crop: int = 128) -> np.ndarray:
    from PIL import Image, ImageDraw

    h, w = panels[0][1].shape[:2]
    crop = min(crop, h, w)
    cy, cx = detailed_window(zoom_from, crop)
    z = min(4, max(1, w // crop))  # zoomed crop as wide as the panel (nearest, at most ×4)
    label_h, gap = 22, 6
    zh = crop * z
    canvas = Image.new(
        "RGB", (len(panels) * w + (len(panels) - 1) * gap, label_h + h + gap + zh), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for i, (label, img) in enumerate(panels):
        x0 = i * (w + gap)
        draw.text((x0 + 4, 4), label, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(img), (x0, label_h))
        draw.rectangle(
            [x0 + cx, label_h + cy, x0 + cx + crop - 1, label_h + cy + crop - 1], outline=(255, 0, 0)
        )
        zoomed = Image.fromarray(np.ascontiguousarray(img[cy : cy + crop, cx : cx + crop])).resize(
            (crop * z, crop * z), Image.Resampling.NEAREST
        )
        canvas.paste(zoomed, (x0, label_h + h + gap))
    return np.asarray(canvas)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def ort_tile_fn(graph: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    iname, oname = session.get_inputs()[0].name, session.get_outputs()[0].name

    def fn(batch: np.ndarray) -> np.ndarray:
        return session.run([oname], {iname: np.ascontiguousarray(batch)})[0]

    return fn


def evaluate(
    model_dir: Path,
    photos: list[str],
    degradations: list[str],
    out_dir: Path | None,
    max_side: int = 512,
    shave: int = SCALE,
    threads: int = 0,
    batch: int = 1,
    log: Any = print,
) -> dict[str, Any]:
    from PIL import Image

    from service.manifest import read_manifest
    from service.pixels.imageops import resize_rgb
    from service.pixels.pipeline import run_sync

    manifest = read_manifest(model_dir, verify=True)
    if manifest.native_scale != SCALE or "fp32" not in manifest.onnx:
        raise SystemExit(f"{model_dir}: expected a ×{SCALE} model with an fp32 ONNX graph")
    geo = manifest.tile
    fn = ort_tile_fn(model_dir / manifest.onnx["fp32"].graph.path, threads)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in photos:
        hr = prepare_hr(load_photo(name), max_side)
        h, w = hr.shape[:2]
        for kind in degradations:
            lr = degrade(hr, kind)
            bic = resize_rgb(lr, h, w)
            t0 = time.perf_counter()
            sr = run_sync(lr, h, w, geo, fn, batch=batch, color_fix="none")
            dt = time.perf_counter() - t0
            g_hr, g_bic, g_sr = gradient_energy(hr), gradient_energy(bic), gradient_energy(sr)
            row = {
                "photo": name,
                "degradation": kind,
                "hr": f"{w}x{h}",
                "lr": f"{lr.shape[1]}x{lr.shape[0]}",
                "psnr_bicubic": round(psnr(hr, bic, shave), 3),
                "psnr_sr": round(psnr(hr, sr, shave), 3),
                "ssim_bicubic": ssim_luma(hr, bic, shave),
                "ssim_sr": ssim_luma(hr, sr, shave),
                "grad_hr": round(g_hr, 2),
                "grad_bicubic": round(g_bic, 2),
                "grad_sr": round(g_sr, 2),
                "grad_ratio_bicubic": round(g_bic / g_hr, 3),
                "grad_ratio_sr": round(g_sr / g_hr, 3),
                "sr_seconds": round(dt, 2),
            }
            row["psnr_delta"] = round(row["psnr_sr"] - row["psnr_bicubic"], 3)
            for k in ("ssim_bicubic", "ssim_sr"):
                row[k] = None if row[k] is None else round(row[k], 4)
            if out_dir:
                pic = side_by_side(
                    [
                        (f"LR x4 bicubic ({kind}) PSNR {row['psnr_bicubic']:.2f}", bic),
                        (f"Real-ESRGAN x4plus (ONNX) PSNR {row['psnr_sr']:.2f}", sr),
                        (f"original {w}x{h}", hr),
                    ],
                    hr,
                )
                path = out_dir / f"{name}-{kind}.png"
                Image.fromarray(pic).save(path)
                row["image"] = str(path)
            rows.append(row)
            log(
                f"{name:<10} {kind:<9} PSNR bic {row['psnr_bicubic']:6.2f} sr {row['psnr_sr']:6.2f} "
                f"(Δ {row['psnr_delta']:+5.2f})  grad/HR bic {row['grad_ratio_bicubic']:.2f} "
                f"sr {row['grad_ratio_sr']:.2f}  {dt:5.1f} s"
            )
    summary = {}
    for kind in degradations:
        sel = [r for r in rows if r["degradation"] == kind]
        summary[kind] = {
            "psnr_delta_min": min(r["psnr_delta"] for r in sel),
            "psnr_delta_mean": round(float(np.mean([r["psnr_delta"] for r in sel])), 3),
            "psnr_delta_max": max(r["psnr_delta"] for r in sel),
            "grad_ratio_sr_min": min(r["grad_ratio_sr"] for r in sel),
            "grad_ratio_sr_max": max(r["grad_ratio_sr"] for r in sel),
            "grad_ratio_bicubic_max": max(r["grad_ratio_bicubic"] for r in sel),
            "sharpening_min": round(min(r["grad_sr"] / r["grad_bicubic"] for r in sel), 2),
        }
    return {
        "model": manifest.name,
        "tile": geo.model_dump(),
        "shave": shave,
        "rows": rows,
        "summary": summary,
    }


def table(result: dict[str, Any]) -> str:
    head = (
        f"{'photo':<10} {'degradation':<11} {'HR':>9} {'PSNR bic':>8} {'PSNR SR':>8} {'Δ dB':>6} "
        f"{'SSIM bic':>8} {'SSIM SR':>8} {'grad bic/HR':>11} {'grad SR/HR':>10} {'s':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        s_b = "-" if r["ssim_bicubic"] is None else f"{r['ssim_bicubic']:.3f}"
        s_s = "-" if r["ssim_sr"] is None else f"{r['ssim_sr']:.3f}"
        lines.append(
            f"{r['photo']:<10} {r['degradation']:<11} {r['hr']:>9} {r['psnr_bicubic']:>8.2f} "
            f"{r['psnr_sr']:>8.2f} {r['psnr_delta']:>+6.2f} {s_b:>8} {s_s:>8} "
            f"{r['grad_ratio_bicubic']:>11.2f} {r['grad_ratio_sr']:>10.2f} {r['sr_seconds']:>6.1f}"
        )
    lines.append("-" * len(head))
    for kind, s in result["summary"].items():
        lines.append(
            f"{kind}: PSNR SR − bicubic {s['psnr_delta_min']:+.2f} … {s['psnr_delta_max']:+.2f} dB "
            f"(mean {s['psnr_delta_mean']:+.2f}); gradient energy SR/HR {s['grad_ratio_sr_min']:.2f} … "
            f"{s['grad_ratio_sr_max']:.2f} (bicubic ≤ {s['grad_ratio_bicubic_max']:.2f}); "
            f"SR ≥ {s['sharpening_min']:.1f}× bicubic"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("models/realesrgan-x4plus"))
    p.add_argument("--build", action="store_true", help="run `gendr-build default` for --model-dir first")
    p.add_argument("--cache", type=Path, default=None, help="conversion cache (gendr-build default --cache)")
    p.add_argument("--photos", default=",".join(PHOTOS), help=f"comma-separated, from {', '.join(PHOTOS)}")
    p.add_argument("--degradations", default=",".join(DEGRADATIONS), help=f"from {', '.join(DEGRADATIONS)}")
    p.add_argument("--max-side", type=int, default=512, help="centre-crop the originals to at most this")
    p.add_argument("--shave", type=int, default=SCALE, help="border pixels left out of PSNR/SSIM")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = default)")
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("out/quality-default"),
        help="side-by-side PNGs and quality.json go here",
    )
    args = p.parse_args(argv)
    if args.build:
        from engine_build.commands.sr.cli import build_default

        build_default(args.model_dir.parent, name=args.model_dir.name, cache_dir=args.cache)
    if not (args.model_dir / "manifest.json").is_file():
        raise SystemExit(
            f"{args.model_dir}: no model; run `gendr-build default --out {args.model_dir.parent}` "
            "first (or pass --build)"
        )
    result = evaluate(
        args.model_dir,
        args.photos.split(","),
        args.degradations.split(","),
        args.out_dir,
        args.max_side,
        args.shave,
        args.threads,
    )
    print()
    print(table(result))
    path = args.out_dir / "quality.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nside-by-side images and {path.name} in {args.out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
