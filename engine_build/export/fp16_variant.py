"""fp16 variant of an export: the fp32 graph rewritten with explicit fp32 islands (export/fp16.py),
and the activation scan that decides whether the VAE decoder stays fp32."""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from engine_build.export.keys import FP16_OVERFLOW_LIMIT, Fp16Options
from engine_build.export.onnx_graph import (
    EXTERNAL_DATA_THRESHOLD,
    GRAPH_FILE,
    ExportError,
    finalize_onnx,
    initializer_bytes,
    save_onnx,
)
from engine_build.gendr.model import GenDR

log = logging.getLogger(__name__)

__all__ = ["FP16_OVERFLOW_LIMIT", "Fp16Options", "activation_absmax", "convert_graph_fp16", "fp16_decision"]


def activation_absmax(net: nn.Module, x: torch.Tensor, prefixes: Sequence[str] = ("",)) -> dict[str, float]:
    """Largest |activation| of every leaf module under each prefix, from one fp32 forward on x ([-1,1])."""
    found: dict[str, float] = {}
    hooks = []

    def hook(name: str) -> Callable:
        def fn(_m, _i, out) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                found[name] = max(found.get(name, 0.0), float(out.detach().abs().max()))

        return fn

    for name, m in net.named_modules():
        if not list(m.children()) and any(name.startswith(p) for p in prefixes):
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return found


def scan_tiles(tile: int, graph_scale: int, native_scale: int, n: int = 2) -> torch.Tensor:
    """Real-photo graph-input tiles ([-1,1] NCHW) for the fp16 activation scan."""
    from engine_build.verify.parity import builtin_photos, graph_input_tiles

    try:
        photos = builtin_photos()
    except Exception as e:  # scikit-image missing: a deterministic textured stand-in
        log.warning("fp16 scan: no bundled photos (%s); using a synthetic pattern", e)
        g = np.linspace(0, 255, 256, dtype=np.float32)
        rng = np.random.default_rng(0)
        img = (g[None, :, None] * 0.5 + g[:, None, None] * 0.5 + rng.normal(0, 20, (256, 256, 3))).clip(
            0, 255
        )
        photos = [("synthetic", img.astype(np.uint8))]
    tiles = graph_input_tiles(photos, tile, graph_scale, native_scale, n=n, seed=0)
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def fp16_decision(net: nn.Module, opts: Fp16Options, scan_input: torch.Tensor | None) -> dict[str, Any]:
    """Whether the VAE decoder runs in fp32, from the options or an activation scan on real tiles."""
    report: dict[str, Any] = {"decoder_fp32": opts.vae_decoder == "fp32"}
    if scan_input is None:
        return report
    t0 = time.perf_counter()
    has_decoder = isinstance(net, GenDR)
    amax = activation_absmax(net, scan_input)
    dec = max((v for k, v in amax.items() if k.startswith("vae.decoder")), default=0.0)
    other = max((v for k, v in amax.items() if not k.startswith("vae.decoder")), default=0.0)
    report["scan"] = {
        "decoder_absmax": dec,
        "other_absmax": other,
        "limit": opts.overflow_limit,
        "tiles": int(scan_input.shape[0]),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if has_decoder and opts.vae_decoder == "auto" and dec > opts.overflow_limit:
        report["decoder_fp32"] = True
        log.warning(
            "fp16: VAE decoder activations reach %.0f (> %.0f): keeping the decoder in fp32",
            dec,
            opts.overflow_limit,
        )
    if other > opts.overflow_limit:
        worst = sorted(((v, k) for k, v in amax.items() if not k.startswith("vae.decoder")), reverse=True)[:3]
        log.warning(
            "fp16: activations up to %.0f in %s; check `gendr-build verify` and keep those scopes in "
            "fp32 with --fp16-fp32-node",
            other,
            ", ".join(k for _, k in worst),
        )
    return report


def convert_graph_fp16(
    src: Path,
    dst_dir: Path,
    tile_out: int | None,
    opts: Fp16Options,
    decoder_fp32: bool,
    external_data: bool | None,
    tile: int | None,
    trt_strict: bool = True,
) -> tuple[Path, Path | None, dict[str, Any]]:
    """fp32 ONNX file → fp16 ONNX folder (checked like every export) and the conversion report
    (`tile`/`tile_out` None: a dynamic-H/W graph)."""
    from engine_build.export.fp16 import DECODER_SCOPES, convert_to_fp16, fp32_nodes

    model = onnx.load(str(src), load_external_data=True)
    patterns = list(opts.fp32_nodes) + (list(DECODER_SCOPES) if decoder_fp32 else [])
    keep = fp32_nodes(
        model.graph, norms=opts.norms == "fp32", attention=opts.attention == "fp32", name_patterns=patterns
    )
    if opts.fp32_nodes and not any(re.search(p, n) for p in opts.fp32_nodes for n in keep):
        raise ExportError(f"fp16: no ONNX node name matches {list(opts.fp32_nodes)}")
    model, rep = convert_to_fp16(model, keep)
    tmp = dst_dir.parent / f".{dst_dir.name}-raw"
    shutil.rmtree(tmp, ignore_errors=True)  # onnx appends to an existing external-data file
    tmp.mkdir(parents=True)
    try:
        raw = tmp / GRAPH_FILE
        save_onnx(model, raw, initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD)
        del model
        expect = (tile, tile, 3) if tile is not None else None
        graph, data = finalize_onnx(raw, dst_dir, tile_out, external_data, expect, trt_strict)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return graph, data, {"fp32_node_patterns": patterns, **rep.as_dict()}
