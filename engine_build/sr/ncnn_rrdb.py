"""The ncnn → spandrel RRDBNet (ESRGAN) converter: every layer checked against the architecture.

:func:`convert_ncnn_rrdbnet` reads a Real-ESRGAN ncnn model (``.param`` + ``.bin``), checks every
convolution against spandrel's RRDBNet, checks that the ``.bin`` is consumed exactly, and returns a
float32 state dict in spandrel's key names.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from spandrel.architectures.ESRGAN import ESRGAN as RRDBNet
from torch import nn

from engine_build.sr.errors import NcnnConversionError
from engine_build.sr.ncnn import BinReader, NcnnLayer, parse_ncnn_param

__all__ = ["RRDBNetConfig", "convert_ncnn_rrdbnet", "infer_rrdbnet_config", "ncnn_rrdbnet_mapping"]


@dataclass(frozen=True)
class _Conv:
    """The Convolution parameters that matter, with ncnn's defaults applied."""

    layer: NcnnLayer
    num_output: int
    kernel: tuple[int, int]  # (h, w)
    dilation: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]  # left, top, right, bottom
    bias_term: int
    weight_data_size: int
    int8_scale_term: int
    activation_type: int
    activation_params: tuple[float, ...]
    dynamic_weight: int

    @classmethod
    def of(cls, layer: NcnnLayer) -> _Conv:
        def i(key: int, default: int) -> int:
            v = layer.get(key, default)
            if not isinstance(v, int):
                raise NcnnConversionError(f"{layer.where()}: parameter {key}={v!r} should be an integer")
            return v

        kw = i(1, 0)
        dw = i(2, 1)
        sw = i(3, 1)
        pl = i(4, 0)
        pt = i(14, pl)
        act = layer.get(10, ())
        act = act if isinstance(act, tuple) else (act,)
        return cls(
            layer=layer,
            num_output=i(0, 0),
            kernel=(i(11, kw), kw),
            dilation=(i(12, dw), dw),
            stride=(i(13, sw), sw),
            pad=(pl, pt, i(15, pl), i(16, pt)),
            bias_term=i(5, 0),
            weight_data_size=i(6, 0),
            int8_scale_term=i(8, 0),
            activation_type=i(9, 0),
            activation_params=tuple(float(a) for a in act),  # type: ignore[arg-type]
            dynamic_weight=i(19, 0),
        )


@dataclass(frozen=True)
class RRDBNetConfig:
    """Hyperparameters of spandrel's RRDBNet, as read from an ncnn model."""

    in_nc: int
    out_nc: int
    num_filters: int
    num_blocks: int
    scale: int

    def build(self) -> RRDBNet:
        return RRDBNet(
            in_nc=self.in_nc,
            out_nc=self.out_nc,
            num_filters=self.num_filters,
            num_blocks=self.num_blocks,
            scale=self.scale,
        )


@dataclass(frozen=True)
class _Target:
    key: str  # spandrel module path, e.g. "model.1.sub.0.RDB1.conv1.0"
    name: str  # the Real-ESRGAN / basicsr name, e.g. "body.0.rdb1.conv1"
    conv: nn.Conv2d
    leaky_slope: float | None  # slope of the LeakyReLU applied right after, None if none
    after_upsample: bool


_RRDB_GROWTH = 32  # spandrel's RRDBNet hard-codes gc=32
_RESIDUAL_SCALE = 0.2  # RDB / RRDB residual scaling of ESRGAN


def _targets(model: nn.Module) -> list[_Target]:
    """The Conv2d layers of a spandrel RRDBNet in execution order, with basicsr-style names."""
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    for n, m in leaves:
        if not isinstance(m, nn.Conv2d | nn.LeakyReLU | nn.Upsample):
            raise NcnnConversionError(f"unexpected module {n} ({type(m).__name__}) in spandrel's RRDBNet")
    out: list[_Target] = []
    n_up = 0
    for idx, (key, m) in enumerate(leaves):
        if not isinstance(m, nn.Conv2d):
            continue
        nxt = leaves[idx + 1][1] if idx + 1 < len(leaves) else None
        prev = leaves[idx - 1][1] if idx > 0 else None
        rdb = re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0", key)
        if rdb:
            name = f"body.{rdb[1]}.rdb{rdb[2]}.conv{rdb[3]}"
        elif key == "model.0":
            name = "conv_first"
        elif key.startswith("model.1.sub."):
            name = "conv_body"
        elif isinstance(prev, nn.Upsample):
            n_up += 1
            name = f"conv_up{n_up}"
        else:
            name = "conv_hr" if nxt is not None else "conv_last"
        out.append(
            _Target(
                key=key,
                name=name,
                conv=m,
                leaky_slope=float(nxt.negative_slope) if isinstance(nxt, nn.LeakyReLU) else None,
                after_upsample=isinstance(prev, nn.Upsample),
            )
        )
    return out


def infer_rrdbnet_config(layers: list[NcnnLayer]) -> RRDBNetConfig:
    """Read RRDBNet's hyperparameters from parsed ncnn layers; refuse other networks clearly."""
    allowed = {"Input", "Convolution", "Split", "Concat", "Eltwise", "BinaryOp", "Interp"}
    other = sorted({ly.type for ly in layers} - allowed)
    if other:
        raise NcnnConversionError(
            f"not an RRDBNet (ESRGAN) ncnn model: it has {', '.join(other)} layers "
            f"(only {', '.join(sorted(allowed))} are expected)"
        )
    convs = [_Conv.of(ly) for ly in layers if ly.type == "Convolution"]
    interps = [ly for ly in layers if ly.type == "Interp"]
    for ly in interps:
        if ly.get(0, 0) != 1 or float(ly.get(1, 1.0)) != 2.0 or float(ly.get(2, 1.0)) != 2.0:  # type: ignore[arg-type]
            raise NcnnConversionError(
                f"{ly.where()}: expected a nearest ×2 upsample (0=1 1=2.0 2=2.0), got {ly.params}"
            )
    n_up = len(interps)
    blocks, rem = divmod(len(convs) - 4 - n_up, 15)
    if len(convs) < 6 or rem or blocks < 1:
        raise NcnnConversionError(
            f"not an RRDBNet: {len(convs)} convolutions and {n_up} upsamples do not make "
            f"1 + 15·num_blocks + 1 + {n_up} + 2 convolutions"
        )
    first, last = convs[0], convs[-1]
    nf = first.num_output
    kh, kw = first.kernel
    if nf <= 0 or kh * kw <= 0 or first.weight_data_size % (nf * kh * kw):
        raise NcnnConversionError(
            f"{first.layer.where()}: weight count {first.weight_data_size} is not "
            f"num_output {nf} × in × {kh}×{kw}"
        )
    in_nc = first.weight_data_size // (nf * kh * kw)
    out_nc = last.num_output
    if in_nc != out_nc:
        raise NcnnConversionError(
            f"RRDBNet with {in_nc} input and {out_nc} output channels (a pixel-unshuffle variant?) "
            "is not supported by this converter"
        )
    if convs[1].num_output != _RRDB_GROWTH:
        raise NcnnConversionError(
            f"{convs[1].layer.where()}: RRDB growth channels {convs[1].num_output}, "
            f"spandrel's RRDBNet supports only {_RRDB_GROWTH}"
        )
    return RRDBNetConfig(in_nc=in_nc, out_nc=out_nc, num_filters=nf, num_blocks=blocks, scale=2**n_up)


def _check_graph(layers: list[NcnnLayer], cfg: RRDBNetConfig) -> None:
    """Check the non-convolution layers: residual sums and the trunk shortcut."""
    elt = [ly for ly in layers if ly.type == "Eltwise"]
    if len(elt) != 4 * cfg.num_blocks:
        raise NcnnConversionError(
            f"expected {4 * cfg.num_blocks} residual sums (Eltwise) for {cfg.num_blocks} RRDB blocks, "
            f"found {len(elt)}"
        )
    for ly in elt:
        coeffs = ly.get(1, ())
        ok = (
            ly.get(0, 1) == 1
            and isinstance(coeffs, tuple)
            and len(coeffs) == 2
            and math.isclose(float(coeffs[0]), _RESIDUAL_SCALE, rel_tol=1e-6)
            and math.isclose(float(coeffs[1]), 1.0, rel_tol=1e-6)
        )
        if not ok:
            raise NcnnConversionError(
                f"{ly.where()}: expected the residual sum 0.2·branch + x "
                f"(0=1 -23301=2,0.2,1.0), got {ly.params}"
            )
    binops = [ly for ly in layers if ly.type == "BinaryOp"]
    if len(binops) != 1 or binops[0].get(0, 0) != 0:
        raise NcnnConversionError(
            f"expected exactly one BinaryOp add (the trunk shortcut), found {[b.params for b in binops]}"
        )


def _check_conv(conv: _Conv, target: _Target, index: int) -> None:
    m = target.conv
    where = f"convolution #{index} {conv.layer.where()} → {target.name} ({target.key})"
    kh, kw = m.kernel_size
    expected_w = m.out_channels * m.in_channels * kh * kw
    problems = []
    if conv.num_output != m.out_channels:
        problems.append(f"output channels {conv.num_output} ≠ {m.out_channels}")
    if conv.kernel != (kh, kw):
        problems.append(f"kernel {conv.kernel} ≠ {(kh, kw)}")
    if conv.weight_data_size != expected_w:
        ins = conv.weight_data_size / max(1, conv.num_output * conv.kernel[0] * conv.kernel[1])
        problems.append(
            f"weight count {conv.weight_data_size} ≠ {expected_w} (input channels {ins:g} ≠ {m.in_channels})"
        )
    if conv.stride != tuple(m.stride) or conv.dilation != tuple(m.dilation):
        problems.append(
            f"stride/dilation {conv.stride}/{conv.dilation} ≠ {tuple(m.stride)}/{tuple(m.dilation)}"
        )
    ph, pw = m.padding  # type: ignore[misc]
    if conv.pad != (pw, ph, pw, ph):
        problems.append(f"padding {conv.pad} ≠ {(pw, ph, pw, ph)}")
    if conv.bias_term != (1 if m.bias is not None else 0):
        problems.append(f"bias_term {conv.bias_term} ≠ {int(m.bias is not None)}")
    if conv.int8_scale_term or conv.dynamic_weight:
        problems.append("int8-quantized or dynamic-weight convolution")
    if target.leaky_slope is None:
        if conv.activation_type != 0:
            problems.append(f"fused activation type {conv.activation_type}, the architecture has none here")
    elif not (
        conv.activation_type == 2
        and len(conv.activation_params) == 1
        and math.isclose(conv.activation_params[0], target.leaky_slope, rel_tol=1e-5)
    ):
        problems.append(
            f"activation {conv.activation_type} {conv.activation_params} ≠ "
            f"leaky ReLU slope {target.leaky_slope}"
        )
    if problems:
        raise NcnnConversionError(f"{where}: " + "; ".join(problems))


def _check_upsample_wiring(layers: list[NcnnLayer], convs: list[_Conv], targets: list[_Target]) -> None:
    """conv_body, conv_up*, conv_hr have the same shape: tell them apart by what feeds them."""
    producer = {top: ly for ly in layers for top in ly.tops}
    for conv, t in zip(convs, targets, strict=True):
        src = producer.get(conv.layer.bottoms[0]) if len(conv.layer.bottoms) == 1 else None
        if src is None:
            raise NcnnConversionError(
                f"{conv.layer.where()}: expected exactly one input blob with a producer"
            )
        if t.after_upsample != (src.type == "Interp"):
            raise NcnnConversionError(
                f"{conv.layer.where()} maps to {t.name} but is fed by {src.where()}: the layer order "
                "does not match RRDBNet"
            )


def _mapped(
    param: str | os.PathLike[str],
) -> tuple[list[NcnnLayer], RRDBNetConfig, list[_Conv], list[_Target]]:
    layers = parse_ncnn_param(param)
    cfg = infer_rrdbnet_config(layers)
    _check_graph(layers, cfg)
    with torch.device("meta"):  # shapes only, no 16M-parameter init
        model = cfg.build()
    targets = _targets(model)
    convs = [_Conv.of(ly) for ly in layers if ly.type == "Convolution"]
    if len(convs) != len(targets):
        raise NcnnConversionError(f"{len(convs)} ncnn convolutions, RRDBNet{cfg} has {len(targets)}")
    for i, (conv, t) in enumerate(zip(convs, targets, strict=True)):
        _check_conv(conv, t, i)
    _check_upsample_wiring(layers, convs, targets)
    return layers, cfg, convs, targets


def ncnn_rrdbnet_mapping(param: str | os.PathLike[str]) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """The checked layer mapping: ``(ncnn layer name, basicsr name, spandrel key, weight shape)``."""
    _, _, convs, targets = _mapped(param)
    return [
        (c.layer.name, t.name, t.key, tuple(t.conv.weight.shape)) for c, t in zip(convs, targets, strict=True)
    ]


def convert_ncnn_rrdbnet(
    param: str | os.PathLike[str], bin: str | os.PathLike[str]
) -> dict[str, torch.Tensor]:
    """Convert an ncnn RRDBNet (Real-ESRGAN) into a float32 state dict for spandrel's RRDBNet.

    Every convolution is checked against the architecture (output channels, kernel, weight count =
    input channels, stride, padding, bias, fused activation), the up-convolutions against their
    Interp inputs, the residual sums against ESRGAN's 0.2 scaling; the whole ``.bin`` must be
    consumed exactly. The result loads with ``strict=True`` into
    ``spandrel.architectures.ESRGAN.ESRGAN`` (keys ``model.0.weight``, ``model.1.sub.N.RDBk.convj.0.*``, ...).
    """
    _, cfg, convs, targets = _mapped(param)
    reader = BinReader(Path(bin))
    state: dict[str, torch.Tensor] = {}
    # Weights are stored in .param layer order; no other layer type of an RRDBNet carries any.
    for i, (conv, t) in enumerate(zip(convs, targets, strict=True)):
        what = f"convolution #{i} {conv.layer.where()} ({t.name})"
        w = reader.weight(conv.weight_data_size, f"the weights of {what}")
        b = reader.raw_fp32(conv.num_output, f"the bias of {what}") if conv.bias_term else None
        if not np.isfinite(w).all() or (b is not None and not np.isfinite(b).all()):
            raise NcnnConversionError(f"{reader.path}: non-finite values in {what}")
        state[f"{t.key}.weight"] = torch.from_numpy(w).reshape(t.conv.weight.shape)
        if b is not None:
            state[f"{t.key}.bias"] = torch.from_numpy(b)
    reader.finish()
    with torch.device("meta"):
        model = cfg.build()
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # pragma: no cover - the checks above make this unreachable
        raise NcnnConversionError(f"converted weights do not load into RRDBNet: {e}") from e
    return state
