"""Calibration and held-out parity tiles for `gendr-build quantize` (engine_build/quantize/quantizer.py).

Both are graph-input tiles cut from real photos, prepared exactly as the runtime prepares requests
(GenDR: bicubic ×native-scale crops; single networks: raw crops). Parity tiles use another seed, so
the PSNR figure `auto` trusts is never measured on the calibration crops. NNCF's `builtin` calibration
goes further: scikit-image photos that are not in the parity set at all (CALIBRATION_PHOTOS).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from service.manifest import Manifest, OnnxVariant

log = logging.getLogger("engine_build.quantize.quantizer")

#: Held-out parity tiles are cut with this seed offset, never the calibration crops.
PARITY_SEED_OFFSET = 1000
#: NNCF's accuracy-aware validation tiles: from the calibration photos, never the parity set.
VALIDATION_SEED_OFFSET = 500
#: scikit-image's bundled colour photos outside the parity set (engine_build.verify.parity.BUILTIN_PHOTOS):
#: a street scene (a stereo pair), stained tissue and a deep-sky photo (dark ground, bright points).
CALIBRATION_PHOTOS = ("motorcycle_left", "motorcycle_right", "immunohistochemistry", "hubble_deep_field")


def calibration_photos() -> list[tuple[str, np.ndarray]]:
    """The CALIBRATION_PHOTOS (inside scikit-image's wheel: no download)."""
    from engine_build.verify.parity import VerifyError

    try:
        from skimage import data
    except ImportError as e:
        raise VerifyError("scikit-image is not installed: pass a folder of photos instead") from e
    left, right, _ = data.stereo_motorcycle()
    photos = {
        "motorcycle_left": left,
        "motorcycle_right": right,
        "immunohistochemistry": data.immunohistochemistry(),
        "hubble_deep_field": data.hubble_deep_field(),
    }
    return [(n, np.ascontiguousarray(photos[n][..., :3])) for n in CALIBRATION_PHOTOS]


def calibration_tiles(
    manifest: Manifest, calib: str | Path | None, n_tiles: int, seed: int = 0, disjoint: bool = False
) -> np.ndarray:
    """uint8 [n, t, t, 3] graph-input tiles from a folder of photos (or scikit-image's bundled ones;
    `disjoint`: those outside the parity set)."""
    from engine_build.verify.parity import builtin_photos, graph_input_tiles, load_photos

    if calib in (None, "builtin"):
        photos = calibration_photos() if disjoint else builtin_photos()
    else:
        photos = load_photos(calib)
    g = manifest.tile
    return graph_input_tiles(photos, g.tile, g.graph_scale, manifest.native_scale, n_tiles, seed)


def tiles_digest(tiles: np.ndarray) -> str:
    """sha256 of the calibration tiles' bytes: part of the step key, so new photos mean a new graph."""
    return hashlib.sha256(tiles.tobytes()).hexdigest()


def int8_parity(
    model_dir: Path,
    manifest: Manifest,
    base_v: OnnxVariant,
    graph: Path,
    photos: str | Path | None,
    n: int,
    seed: int,
    tool: str = "ort",
) -> dict[str, Any]:
    """PSNR of the int8 graph vs the fp32 one (else the base) on real-photo tiles not used to calibrate
    (scikit-image's photos by default: a fixed reference set, whatever the calibration folder held).
    NNCF's graph is measured in both runtimes that may serve it; `psnr_db` is the worse one."""
    from engine_build.quantize.ort import parity_vs_fp32
    from service.backends.onnxruntime import INT8_MIN_PSNR_DB

    ref_v = manifest.onnx.get("fp32", base_v)
    tiles = calibration_tiles(manifest, photos, n, seed + PARITY_SEED_OFFSET)
    t0 = time.perf_counter()
    if tool == "nncf":
        from engine_build.quantize.nncf_ptq import runtime_parity
        from service.hardware import cpu_family, cpu_flags, cpu_model_name

        p = runtime_parity(model_dir / ref_v.graph.path, graph, base_v.input_name, tiles)
        # the runtimes ran this CPU's int8 kernels: which family they speak for (select.int8_sums_hold)
        p.update({"family": cpu_family(cpu_flags()), "cpu": cpu_model_name()})
    else:
        p = parity_vs_fp32(model_dir / ref_v.graph.path, graph, base_v.input_name, tiles)
    p.update(
        {
            "reference": ref_v.precision,
            "photos": "builtin" if photos in (None, "builtin") else Path(photos).name,
            "bound_db": INT8_MIN_PSNR_DB,
            "passes": p["psnr_db"] >= INT8_MIN_PSNR_DB,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    log.info("int8 parity vs %s: %.2f dB on %d held-out tiles", ref_v.precision, p["psnr_db"], n)
    return p
