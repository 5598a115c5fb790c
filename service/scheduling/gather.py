"""Gathering a batch's tiles into one engine input: views cut from each request's padded source."""

from __future__ import annotations

import numpy as np

from service.backends.base import Backend
from service.scheduling.lanes import Entry


class TileGatherer:
    """Owns the host buffers of static tile shapes (one per instance and tile, or the backend's own
    pinned one); a dynamic shape gets an array per call, and a whole image is passed as it is."""

    def __init__(self, backend: Backend, tiles: tuple[int, ...], max_batch: int) -> None:
        self.backend = backend
        self.tiles = tiles
        self.max_batch = max_batch
        self._bufs: dict[tuple[int, int], np.ndarray] = {}

    def _buffer(self, instance: int, bs: int, shape: tuple[int, int]) -> np.ndarray:
        th, tw = shape
        if th == tw and th in self.tiles:
            own = self.backend.input_buffer(instance, bs, th)
            if own is not None:
                return own
            buf = self._bufs.get((instance, th))
            if buf is None:
                buf = self._bufs[(instance, th)] = np.empty((self.max_batch, th, th, 3), np.uint8)
            return buf[:bs]
        return np.empty((bs, th, tw, 3), np.uint8)  # dynamic shapes: one call's worth, not kept

    def gather(self, instance: int, entries: list[Entry], n: int, bs: int) -> np.ndarray:
        first = entries[0][0]
        if bs == n == 1 and first.whole and first.source.flags.c_contiguous:
            return first.source[None]  # a whole image: the engine reads the padded source itself
        th, tw = first.shape
        x = self._buffer(instance, bs, first.shape)
        k = 0
        for t, idx in entries:
            src = t.source
            for i in idx:
                y0, x0 = t.positions[i]
                x[k] = src[y0 : y0 + th, x0 : x0 + tw]
                k += 1
        if bs > n:
            x[n:] = 0
        return x
