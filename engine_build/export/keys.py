"""The export's step keys and its up-to-date check, without torch.

Every export step is keyed by a hash of all of its inputs (weights digest, tile, opset, tool versions,
fp16 options, the bucket tile); this module computes those keys from hashes and metadata only, so a
caller that knows the weights digest (the sha256 of a safetensors file) can tell that a repository is
up to date in about a second, before importing torch (`gendr-build default` on every `scripts/run.sh`).
"""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine_build.errors import BuildError
from engine_build.repository import artifacts_ok, variant_ok
from service.manifest import Manifest, hash_inputs

#: Bump when the exported graph changes for identical inputs (invalidates every cached export).
EXPORT_FORMAT = (
    3  # 2: Cast-first/Cast-last tile I/O (TensorRT's uint8 rule); 3: [0,1] nets without the [-1,1] detour
)
#: Bump when a shape-bucket / whole-image graph changes for identical inputs (or its checks do).
SHAPES_FORMAT = 1
EXPORT_PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
INPUT_NAME, OUTPUT_NAME = "lr_tile", "sr_tile"  # the tile graph's I/O names
#: opset 18: SDPA/LayerNormalization export cleanly (≥14 needed); ModelOpt lifts Q/DQ graphs to 19.
DEFAULT_OPSET = 18
#: fp16 "auto" policy: an fp32 activation above this (fp16 max is 65504; 8× headroom for real
#: images brighter/more textured than the scan tiles) keeps the VAE decoder in fp32.
FP16_OVERFLOW_LIMIT = 8192.0
#: Manifest key (in the primary variant's options) of a whole-image graph that was tried and refused.
DYNAMIC_REFUSED = "dynamic_refused"


class BucketError(BuildError, ValueError):
    """A --buckets / --whole-image request the model cannot have (exit 2)."""


@dataclass(frozen=True)
class Fp16Options:
    """Where the fp16 graph keeps fp32: where fp16 overflows or loses precision (docs/architecture.md)."""

    norms: Literal["fp32", "fp16"] = "fp32"  # GroupNorm / LayerNorm statistics (sum of squares)
    attention: Literal["fp32", "fp16"] = "fp32"  # Q·Kᵀ and softmax (SD2.1 needs upcast_attention)
    vae_decoder: Literal["auto", "fp32", "fp16"] = "auto"  # auto: fp32 if an activation scan overflows
    fp32_nodes: tuple[
        str, ...
    ] = ()  # ONNX node-name regexes kept in fp32, e.g. r"^/net/decoder/up_blocks\.3/"
    overflow_limit: float = FP16_OVERFLOW_LIMIT

    def key(self) -> dict[str, Any]:
        return {
            "norms": self.norms,
            "attention": self.attention,
            "vae_decoder": self.vae_decoder,
            "fp32_nodes": list(self.fp32_nodes),
            "overflow_limit": self.overflow_limit,
        }


def tool_versions() -> dict[str, str]:
    """Versions that change the exported bytes; part of every export key (package metadata: no import)."""
    out = {}
    for pkg in ("torch", "onnx", "diffusers", "spandrel"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@dataclass(frozen=True)
class ExportKeys:
    """`graph_base`: what any graph of this model depends on; `variants`: the fp32 / fp16 step keys."""

    graph_base: str
    variants: dict[str, str]


def export_keys(
    kind: str,
    weights_digest: str,
    tile: int,
    graph_scale: int,
    opset: int,
    external_data: bool | None,
    fp16: Fp16Options,
) -> ExportKeys:
    base = {
        "format": EXPORT_FORMAT,
        "kind": kind,
        "weights": weights_digest,
        "tile": tile,
        "graph_scale": graph_scale,
        "opset": opset,
        "io": [INPUT_NAME, OUTPUT_NAME],
        "external_data": external_data,
        "versions": tool_versions(),
    }
    fp32 = hash_inputs("onnx-fp32", base)
    return ExportKeys(
        hash_inputs("onnx-base", base), {"fp32": fp32, "fp16": hash_inputs("onnx-fp16", fp32, fp16.key())}
    )


def shape_key(variant_key: str, tile: int | None) -> str:
    """Key of the bucket (`tile`) or whole-image (None) graph derived from the variant with `variant_key`."""
    return hash_inputs("onnx-shape", SHAPES_FORMAT, variant_key, tile)


def export_order(precisions: Sequence[str]) -> list[str]:
    """fp16 is derived from the fp32 graph, so fp32 is always exported (and kept) first."""
    return [p for p in EXPORT_PRECISIONS if p in precisions or (p == "fp32" and "fp16" in precisions)]


def resolve_buckets(
    buckets: Sequence[int] | None, tile: int, size_multiple: int, *, strict: bool = True, minimum: int = 8
) -> tuple[int, ...]:
    """Bucket tile edges, sorted. Each must be a multiple of `size_multiple`, at least `minimum` and below
    the primary `tile`; `strict` False (preset defaults) drops those that are not, instead of refusing."""
    out: set[int] = set()
    for b in buckets or ():
        why = None
        if b < max(8, minimum):
            why = f"is below the network's minimum input of {max(8, minimum)} px"
        elif b >= tile:
            why = f"is not smaller than the primary tile {tile} (buckets are the smaller static tiles)"
        elif b % size_multiple:
            why = f"is not a multiple of {size_multiple}, which this network needs"
        if why and strict:
            raise BucketError(f"--buckets: {b} {why}")
        if not why:
            out.add(int(b))
    return tuple(sorted(out))


def wanted_shapes(buckets: Sequence[int], whole_image: bool) -> list[int | None]:
    return [*buckets, *([None] if whole_image else [])]


def shapes_up_to_date(
    model_dir: Path, manifest: Manifest, precision: str, buckets: Sequence[int], whole_image: bool
) -> bool:
    """The `precision` variant holds exactly the wanted shape graphs, each with its key and intact files
    (a whole-image graph refused for this key counts as done)."""
    v = manifest.onnx.get(precision)
    if v is None:
        return False
    want = wanted_shapes(buckets, whole_image)
    have = {s.tile: s for s in v.shapes}
    if set(have) - set(want):
        return False
    for t in want:
        key = shape_key(v.key, t)
        sg = have.get(t)
        if sg is None:
            refused = v.options.get(DYNAMIC_REFUSED)
            if t is None and isinstance(refused, dict) and refused.get("key") == key:
                continue
            return False
        if sg.key != key or not artifacts_ok(model_dir, [sg.graph, sg.external_data]):
            return False
    return True


def repository_up_to_date(
    model_dir: Path,
    manifest: Manifest,
    keys: ExportKeys,
    precisions: Sequence[str],
    buckets: Sequence[int],
    whole_image: bool,
) -> bool:
    """Every variant and shape graph an export with these keys would write is in place (hashes only)."""
    for p in export_order(precisions):
        v = manifest.onnx.get(p)
        if not variant_ok(model_dir, v, keys.variants[p]):
            return False
        if not shapes_up_to_date(model_dir, manifest, p, buckets, whole_image):
            return False
    return True
