"""The quantize step's errors: one base, and the case a caller may skip (a tool is not installed)."""

from __future__ import annotations


class QuantizeError(RuntimeError):
    """The quantize step cannot run or failed; the message says why in one line."""


class QuantizeToolMissing(QuantizeError):
    """A tool the step needs is not installed (ModelOpt, ONNX Runtime's quantizer, scikit-image for the
    `builtin` photos): a caller may skip the step and say why, unlike a quantization that ran and failed."""
