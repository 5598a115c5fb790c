"""Reading ncnn model files: the text ``.param`` graph and the ``.bin`` weight stream.

Formats (github.com/Tencent/ncnn, ``src/paramdict.cpp``, ``src/modelbin.cpp``,
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

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine_build.sr.errors import NcnnConversionError

__all__ = ["BinReader", "NcnnLayer", "ParamValue", "parse_ncnn_param"]

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


_TAG_FP16 = 0x01306B47
_TAG_FP32 = 0x00000000
_TAG_FP32_SCALED = 0x0002C056  # ncnn: "raw data with extra scaling", stored as plain fp32
_TAG_INT8 = 0x000D4B38


class BinReader:
    """Sequential reader of an ncnn ``.bin``: storage-tagged weight blobs and raw fp32 arrays."""

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
