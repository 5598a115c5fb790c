"""Helpers for the runtime tests (fake-backend manifests, photo crops)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.manifest import Manifest, PipelineParams, TileGeometry, write_manifest


def fake_manifest(
    name: str = "fake", tile: int = 32, overlap: int = 8, scale: int = 1, kind: str = "single"
) -> Manifest:
    """A manifest with no artifacts: enough for the fake backend."""
    return Manifest(
        name=name,
        kind=kind,
        native_scale=scale if kind == "single" else 4,  # type: ignore[arg-type]
        tile=TileGeometry(tile=tile, overlap=overlap, graph_scale=scale, size_multiple=8),
        pipeline=PipelineParams() if kind == "gendr" else None,
    )


def write_fake_repo(root: Path, **kw: object) -> Path:
    m = fake_manifest(**kw)  # type: ignore[arg-type]
    write_manifest(root / m.name, m)
    return root


def nearest(img: np.ndarray, s: int) -> np.ndarray:
    return img.repeat(s, axis=0).repeat(s, axis=1) if s > 1 else img


def photo_crop(img: np.ndarray, h: int, w: int, y: int = 0, x: int = 0) -> np.ndarray:
    return np.ascontiguousarray(img[y : y + h, x : x + w])
