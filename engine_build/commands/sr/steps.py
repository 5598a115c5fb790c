"""Progress of the SR build commands: `[i/n] what ... done (x s)` lines and a ticking terminal bar."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["Steps", "logging_beside"]


class Steps:
    """`[i/n] what ... done (x s)` lines; on a terminal also a tqdm bar whose clock keeps ticking
    during long steps (tracing the ONNX graph takes tens of seconds on a laptop CPU)."""

    def __init__(self, total: int, title: str, stream: Any = None) -> None:
        self.total, self.title, self.i = total, title, 0
        self.stream = stream or sys.stderr
        self.t_start = time.perf_counter()
        self.bar = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                desc=title,
                file=self.stream,
                leave=False,
                bar_format="{desc}: {bar} {n_fmt}/{total_fmt} [{elapsed}]",
            )
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            if self.bar is not None:
                self.bar.refresh()

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[dict[str, str]]:
        """Yields a dict; set `note` in it to add a word to the done line."""
        self.i += 1
        info: dict[str, str] = {}
        if self.bar is not None:
            self.bar.set_description_str(f"{self.title} [{self.i}/{self.total}] {what}")
        else:
            self._write(f"[{self.i}/{self.total}] {what} ...")
        t0 = time.perf_counter()
        yield info
        note = f", {info['note']}" if info.get("note") else ""
        self._write(f"[{self.i}/{self.total}] {what}: done ({time.perf_counter() - t0:.1f} s{note})")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        if self.bar is not None:
            self.bar.close()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start


@contextlib.contextmanager
def logging_beside(steps: Steps) -> Iterator[None]:
    if steps.bar is None:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield
