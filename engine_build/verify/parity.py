"""Parity of exported graphs against the PyTorch reference, on real photos.

`verify_model(models/NAME)` runs every ONNX variant of the repository in ONNX Runtime (CPU) and the
PyTorch `TileGraph` (fp32) on the same inputs:

- tile rows: graph-input tiles cut from real photos (for GenDR: a crop of the photo bicubic-upsampled
  by the native scale, exactly what the runtime feeds the graph; for single networks: a raw crop);
- image rows: whole photos, downscaled by the native scale (bicubic, the usual LR/HR protocol), then
  through the full request pipeline (pre-resize → tiles → graph → stitch) with each backend.

Metrics are on the uint8 outputs: max abs error, mean abs error and PSNR (peak 255). The photos are
scikit-image's bundled images (no download, docs/architecture.md, test data) unless a folder is given.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine_build.errors import BuildError
from engine_build.verify.report import Row, VerifyReport, failures, parse_thresholds
from engine_build.verify.runners import onnx_runner, torch_runner
from service.manifest import Manifest, ManifestError, TileGeometry, read_manifest

# the tile functions verify runs and the report it returns, for its callers
__all__ = ["Row", "VerifyReport", "failures", "onnx_runner", "parse_thresholds", "torch_runner"]

log = logging.getLogger(__name__)

#: scikit-image's bundled colour photos (inside the wheel, docs/architecture.md, test data).
BUILTIN_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
TileFn = Callable[[np.ndarray], np.ndarray]


class VerifyError(BuildError, RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Photos and tiles
# ---------------------------------------------------------------------------------------------


def builtin_photos(names: Sequence[str] = BUILTIN_PHOTOS) -> list[tuple[str, np.ndarray]]:
    try:
        from skimage import data
    except ImportError as e:
        raise VerifyError("scikit-image is not installed: pass a folder of photos instead") from e
    return [(n, np.ascontiguousarray(getattr(data, n)()[..., :3])) for n in names]


def load_photos(folder: str | Path, limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    """RGB uint8 images from a folder (sorted by name); unreadable files are skipped with a warning."""
    from PIL import Image, ImageOps

    folder = Path(folder)
    if not folder.is_dir():
        raise VerifyError(f"{folder}: not a folder of images")
    out: list[tuple[str, np.ndarray]] = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            with Image.open(p) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                out.append((p.name, np.asarray(im, dtype=np.uint8).copy()))
        except Exception as e:  # Pillow raises many types
            log.warning("skipping %s: %s", p, e)
        if limit and len(out) >= limit:
            break
    if not out:
        raise VerifyError(f"{folder}: no readable images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return out


def resize_bicubic(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """The pipeline's own bicubic resize (Pillow), so tiles look like what the runtime feeds the graph."""
    from service.pixels.imageops import resize_rgb

    return resize_rgb(img, height, width)


def graph_input_tiles(
    photos: Sequence[tuple[str, np.ndarray]],
    tile: int,
    graph_scale: int,
    native_scale: int,
    n: int,
    seed: int = 0,
) -> np.ndarray:
    """n uint8 tiles [n, tile, tile, 3] as the runtime feeds them to the graph.

    The graph sees requests resized by native_scale / graph_scale (GenDR: bicubic ×4 of the photo;
    a ×4 single network: the photo itself), so each tile is a crop of tile·graph_scale/native_scale
    photo pixels resized to the tile. Crops are spread over the photos round-robin, seeded.
    """
    rng = np.random.default_rng(seed)
    crop = max(1, round(tile * graph_scale / native_scale))
    tiles = []
    for i in range(n):
        _, img = photos[i % len(photos)]
        h, w = img.shape[:2]
        if h < crop or w < crop:
            img = np.pad(img, ((0, max(0, crop - h)), (0, max(0, crop - w)), (0, 0)), mode="reflect")
            h, w = img.shape[:2]
        y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        tiles.append(resize_bicubic(np.ascontiguousarray(img[y : y + crop, x : x + crop]), tile, tile))
    return np.stack(tiles)


def reference_net(model_dir: Path, manifest: Manifest, checkpoint: str | Path | None = None) -> Any:
    """The [-1,1] → [-1,1] PyTorch network the repository was exported from."""
    model_dir = Path(model_dir)
    if manifest.kind == "gendr":
        from engine_build.gendr.checkpoint import load_checkpoint

        src = Path(checkpoint) if checkpoint else model_dir / "checkpoint"
        if not src.is_dir():
            raise VerifyError(f"{model_dir}: no checkpoint/ copy in the repository; pass --checkpoint DIR")
        return load_checkpoint(src)
    from engine_build.gendr.model import UnitRangeAdapter

    if checkpoint:
        files = [Path(checkpoint)]
    else:
        files = [model_dir / a.path for a in manifest.checkpoint if a.path.endswith(".safetensors")]
    if not files:
        raise VerifyError(
            f"{model_dir}: no safetensors checkpoint to rebuild the reference; pass --checkpoint FILE"
        )
    from engine_build.sr.models import load_sr_safetensors

    desc = load_sr_safetensors(files[0])
    if int(desc.scale) != manifest.native_scale:
        raise VerifyError(f"{files[0]}: network scale {desc.scale} != manifest {manifest.native_scale}")
    from engine_build.sr.support import SpandrelCall

    return UnitRangeAdapter(SpandrelCall(desc).eval())  # called as the export traced it


# ---------------------------------------------------------------------------------------------
# Metrics, whole images
# ---------------------------------------------------------------------------------------------


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    if a.shape != b.shape:
        raise VerifyError(f"shape mismatch {a.shape} vs {b.shape}")
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mse = float(np.mean(d.astype(np.float64) ** 2))
    return {
        "max_abs_err": int(d.max()) if d.size else 0,
        "mean_abs_err": float(d.mean()) if d.size else 0.0,
        "psnr_db": math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse),
    }


def run_whole(
    image: np.ndarray, out_h: int, out_w: int, geometry: TileGeometry, fn: TileFn, batch: int = 4
) -> np.ndarray:
    """Whole-image request through the runtime's own pipeline (resize plan → tiles → stitch)."""
    from service.pixels.pipeline import run_sync

    return run_sync(image, out_h, out_w, geometry, fn, batch=batch, color_fix="none")


def _run_batched(fn: TileFn, tiles: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([fn(tiles[i : i + batch]) for i in range(0, len(tiles), batch)])


def verify_model(
    model_dir: str | Path,
    precisions: Sequence[str] | None = None,
    photos: Sequence[tuple[str, np.ndarray]] | None = None,
    n_tiles: int = 8,
    n_images: int = 3,
    batch: int = 4,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    runners: dict[str, TileFn] | None = None,
    reference: Any = None,
) -> VerifyReport:
    """Compare each ONNX variant (ORT CPU) with the fp32 PyTorch reference; see the module docstring.

    `runners` may supply extra tile functions by label (e.g. a TensorRT engine on a GPU machine);
    `reference` overrides the [-1,1] reference network (default: rebuilt from the repository).
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir, verify=True)  # refuses artifacts whose hash does not match
    g = manifest.tile
    available = list(manifest.onnx)
    wanted = list(precisions) if precisions else available
    missing = [p for p in wanted if p not in manifest.onnx]
    if missing:
        raise ManifestError(f"{model_dir}: no ONNX graph for {missing} (have: {available})")
    photos = list(photos) if photos is not None else builtin_photos()
    t0 = time.perf_counter()
    ref_net = reference if reference is not None else reference_net(model_dir, manifest, checkpoint)
    ref_fn = torch_runner(ref_net, geometry=manifest.tile)
    report = VerifyReport(model=manifest.name, reference="PyTorch TileGraph fp32 (CPU)")
    report.info = {
        "tile": g.tile,
        "overlap": g.overlap,
        "graph_scale": g.graph_scale,
        "native_scale": manifest.native_scale,
        "photos": [n for n, _ in photos],
        "n_tiles": n_tiles,
        "n_images": n_images,
        "batch": batch,
    }
    tiles = (
        graph_input_tiles(photos, g.tile, g.graph_scale, manifest.native_scale, n_tiles, seed)
        if n_tiles
        else None
    )
    ref_tiles = _run_batched(ref_fn, tiles, batch) if tiles is not None else None
    s = manifest.native_scale
    images = []
    for name, img in photos[:n_images]:
        h, w = img.shape[:2]
        lr = resize_bicubic(img, max(1, h // s), max(1, w // s))  # LR/HR protocol: bicubic ×1/s
        out_h, out_w = lr.shape[0] * s, lr.shape[1] * s
        images.append((name, lr, out_h, out_w, run_whole(lr, out_h, out_w, g, ref_fn, batch)))
    report.info["reference_seconds"] = round(time.perf_counter() - t0, 2)

    fns: dict[str, TileFn] = {}
    for p in wanted:
        fns[p] = onnx_runner(model_dir, p, manifest=manifest)
    fns.update(runners or {})
    for label, fn in fns.items():
        if tiles is not None:
            t1 = time.perf_counter()
            out = _run_batched(fn, tiles, batch)
            dt = (time.perf_counter() - t1) / len(tiles)
            for i in range(len(tiles)):
                m = compare(out[i], ref_tiles[i])
                report.rows.append(
                    Row(
                        label,
                        "tile",
                        f"{photos[i % len(photos)][0]}#{i}",
                        "x".join(map(str, out[i].shape[:2])),
                        seconds=round(dt, 3),
                        **m,
                    )
                )
        for name, lr, out_h, out_w, ref_img in images:
            t1 = time.perf_counter()
            out = run_whole(lr, out_h, out_w, g, fn, batch)
            m = compare(out, ref_img)
            report.rows.append(
                Row(
                    label,
                    "image",
                    f"{name} {lr.shape[1]}x{lr.shape[0]}",
                    f"{out_w}x{out_h}",
                    seconds=round(time.perf_counter() - t1, 2),
                    **m,
                )
            )
        log.info("verify %s done", label)
    if n_tiles:
        report.rows.extend(_shape_rows(model_dir, manifest, wanted, ref_net, photos, n_tiles, seed))
    return report


def _shape_rows(
    model_dir: Path,
    manifest: Manifest,
    precisions: Sequence[str],
    ref_net: Any,
    photos: Sequence[tuple[str, np.ndarray]],
    n: int,
    seed: int,
) -> list[Row]:
    """Tile rows for every shape bucket (`fp32@t32`: n tiles at its edge) and whole-image graph
    (`fp32@dynamic`: one photo crop at each size the export checked), against PyTorch at that shape."""
    from engine_build.verify.shape_check import dynamic_check_sizes, onnx_file_fn, photo_input, torch_fn

    g, ref, rows = manifest.tile, torch_fn(ref_net), []
    for p in precisions:
        for sg in manifest.onnx[p].shapes:
            label = f"{p}@{'t' + str(sg.tile) if sg.tile is not None else 'dynamic'}"
            if sg.tile is not None:
                xs = [graph_input_tiles(photos, sg.tile, g.graph_scale, manifest.native_scale, n, seed)]
            else:
                sizes = dynamic_check_sizes(g.tile, g.size_multiple)
                xs = [photo_input(h, w, i, photos) for i, (h, w) in enumerate(sizes)]
            fn = onnx_file_fn(model_dir / sg.graph.path)
            for i, x in enumerate(xs):
                t1 = time.perf_counter()
                out = fn(x)
                dt, want = (time.perf_counter() - t1) / len(x), ref(x)
                for j in range(len(x)):
                    k = i + j
                    shape = "x".join(map(str, out[j].shape[:2]))
                    name, m = f"{photos[k % len(photos)][0]}#{k}", compare(out[j], want[j])
                    rows.append(Row(label, "tile", name, shape, seconds=round(dt, 3), **m))
    return rows
