"""Errors of the SR checkpoint tools (one module so every reader raises the same classes)."""

from __future__ import annotations

from engine_build.errors import BuildError

__all__ = ["NcnnConversionError", "SRModelError"]


class SRModelError(BuildError, ValueError):
    """An SR checkpoint that cannot be used: wrong format, unsupported architecture, bad scale."""


class NcnnConversionError(SRModelError):
    """The ncnn files do not hold the RRDBNet the converter expects (or are damaged)."""
