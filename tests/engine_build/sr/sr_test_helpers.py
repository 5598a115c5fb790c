"""Helpers shared by the SR model tests (a module name of its own so it cannot shadow another)."""

from __future__ import annotations

import torch


def seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministic small random weights (spandrel's own init differs between versions)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()
