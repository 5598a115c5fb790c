"""Export fixes for spandrel architectures whose PyTorch code does not trace to a batch-agnostic graph.

The export traces one fixed tile at batch 2 and serves every batch size from 1 to max_batch, so
anything the trace freezes besides the tile shape is a bug in the served graph:

* **Window merges that compute the batch with ``int()``** (SwinIR, Swin2SR, HAT, DRCT, ATD, DCTLSA,
  Uformer, GRL: ``window_reverse``; DAT, RGT, CRAFT: ``windows2img``) freeze it at 2: at batch 1
  ONNX Runtime fails or, worse, mixes windows of the two halves of a tile. While tracing, those
  functions are swapped for ones that let the batch axis be ``-1``.
* **Adaptive pooling to a size computed from the input shape** (SAFMN) is a traced value ONNX cannot
  take; with a static tile it is plain pooling (kernel = stride = input / output).
* **``torch.sort(..., stable=False)``** (ATD sorts tokens by category) has no ONNX export through
  the ``stable`` overload; a full-length ``topk`` is the same sort and exports as ONNX TopK. Its
  ``index_reverse`` inverts the permutation with a Python loop over the batch; a ``scatter`` does
  the same for any batch.
* **Mixture-of-experts routing in Python** (SeemoRe picks its experts with a list comprehension over
  ``topk`` indices of a batch of one) becomes dense gating: every expert runs, weighted by the top-k
  softmax weights scattered into a zero vector — the same sum, as tensor ops, for any batch.

The swaps last only while tracing (``torch.jit.is_tracing()``); PyTorch runs spandrel's code
unchanged otherwise, which the parity check compares against.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["dense_moe", "tracing_fixes"]


def _merge(windows: torch.Tensor, wh: int, ww: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.reshape(-1, h // wh, w // ww, wh, ww, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def _window_reverse(orig: Callable[..., Any]) -> Callable[..., Any]:
    params = len(inspect.signature(orig).parameters)

    def window_reverse(windows: torch.Tensor, window_size: Any, *args: Any, **kwargs: Any) -> Any:
        ws = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
        if params == 3:  # GRL: window_reverse(windows, window_size, img_size)
            h, w = args[0] if args else kwargs["img_size"]
        else:
            h, w = args[:2]
            if (args[2:] and args[2] != 1) or kwargs.get("dilation_rate", 1) != 1:
                return orig(windows, window_size, *args, **kwargs)  # Uformer's dilated windows
        return _merge(windows, ws[0], ws[1], h, w)

    return window_reverse


def _windows2img(orig: Callable[..., Any]) -> Callable[..., Any]:
    def windows2img(img_splits_hw: torch.Tensor, h_sp: int, w_sp: int, h: int, w: int) -> torch.Tensor:
        return _merge(img_splits_hw, h_sp, w_sp, h, w)

    return windows2img


def _static_pool(orig: Callable[..., Any], pool: Callable[..., Any]) -> Callable[..., Any]:
    def adaptive(x: torch.Tensor, output_size: Any, *args: Any, **kwargs: Any) -> Any:
        sizes = list(output_size) if isinstance(output_size, list | tuple) else [output_size, output_size]
        if not any(isinstance(v, torch.Tensor) for v in sizes):
            return orig(x, output_size, *args, **kwargs)
        ih, iw = (int(v) for v in x.shape[-2:])
        oh, ow = (int(v) if v is not None else d for v, d in zip(sizes, (ih, iw), strict=True))
        if ih % oh or iw % ow:
            return orig(x, (oh, ow), *args, **kwargs)
        k = (ih // oh, iw // ow)
        return pool(x, k, k)

    return adaptive


def _topk_sort(orig: Callable[..., Any]) -> Callable[..., Any]:
    def sort(
        x: torch.Tensor, dim: int = -1, descending: bool = False, stable: bool | None = None, **kw: Any
    ) -> Any:
        if kw:
            return orig(x, dim=dim, descending=descending, stable=stable, **kw)
        n = x.shape[dim]
        key = x.float()
        if not x.is_floating_point():  # ties broken by position: the stable order PyTorch's CPU sort gives
            pos = torch.arange(n, device=x.device, dtype=torch.float32)
            shape = [1] * x.dim()
            shape[dim] = -1
            key = key * n + (-pos if descending else pos).reshape(shape)
        _, indices = torch.topk(key, n, dim=dim, largest=descending, sorted=True)
        return torch.return_types.sort((torch.gather(x, dim, indices), indices))

    return sort


def _index_reverse(orig: Callable[..., Any]) -> Callable[..., Any]:
    def index_reverse(index: torch.Tensor) -> torch.Tensor:
        ind = torch.arange(index.shape[-1], device=index.device).expand_as(index)
        return torch.zeros_like(index).scatter(-1, index, ind)

    return index_reverse


_SWAPS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "window_reverse": _window_reverse,
    "windows2img": _windows2img,
    "index_reverse": _index_reverse,
}


@contextlib.contextmanager
def tracing_fixes(arch: str) -> Iterator[None]:
    """While tracing: batch-agnostic window merges in ``arch``'s spandrel modules, static pooling."""
    if not torch.jit.is_tracing():
        yield
        return
    prefix = f"spandrel.architectures.{arch}."
    saved: list[tuple[Any, str, Any]] = []
    for name, mod in list(sys.modules.items()):
        if name.startswith(prefix) and mod is not None:
            for fn, make in _SWAPS.items():
                orig = getattr(mod, fn, None)
                if callable(orig):
                    saved.append((mod, fn, orig))
                    setattr(mod, fn, make(orig))
    if arch == "ATD":
        saved.append((torch, "sort", torch.sort))
        torch.sort = _topk_sort(torch.sort)  # type: ignore[assignment]
    saved += [
        (F, "adaptive_max_pool2d", F.adaptive_max_pool2d),
        (F, "adaptive_avg_pool2d", F.adaptive_avg_pool2d),
    ]
    F.adaptive_max_pool2d = _static_pool(saved[-2][2], F.max_pool2d)  # type: ignore[assignment]
    F.adaptive_avg_pool2d = _static_pool(saved[-1][2], F.avg_pool2d)  # type: ignore[assignment]
    try:
        yield
    finally:
        for mod, fn, orig in reversed(saved):
            setattr(mod, fn, orig)


def _dense_moe_forward(self: nn.Module, inputs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    logits = self.gate(inputs)
    weights = F.softmax(logits, dim=1, dtype=torch.float).to(inputs.dtype)
    top_w, top_i = torch.topk(weights, self.num_expert)
    gate = torch.zeros_like(weights).scatter(1, top_i, top_w)
    out = inputs.clone()
    for i, expert in enumerate(self.experts):
        out = out + expert(inputs, k) * gate[:, i : i + 1, None, None]
    return out


def dense_moe(model: nn.Module) -> int:
    """Give SeemoRe's mixture-of-experts layers dense gating (any batch, traceable); returns how many."""
    n = 0
    for m in model.modules():
        if type(m).__name__ == "MoELayer" and hasattr(m, "experts") and hasattr(m, "gate"):
            m.forward = types.MethodType(_dense_moe_forward, m)  # type: ignore[method-assign]
            n += 1
    return n
