"""CPU seconds and peak RSS of a server's whole process tree, read from /proc (Linux).

CPU: utime + stime + cutime + cstime of every process in the tree. A child that exits and is reaped
moves its time into its parent's cutime/cstime, so the sum over the live tree never loses it, and a
live child is never counted twice. RSS: the tree's summed resident set, sampled every 0.2 s.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its closing parenthesis
    return raw[raw.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """`root` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat(int(entry))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(root: int) -> float:
    """CPU seconds used so far by the tree under `root` (including reaped children)."""
    total = 0
    for pid in tree(root):
        f = _stat(pid)
        if f is not None:  # fields 14–17 (1-based) are utime stime cutime cstime; f starts at field 3
            total += sum(int(x) for x in f[11:15])
    return total / _TICK


def rss_bytes(root: int) -> int:
    total = 0
    for pid in tree(root):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


class Monitor:
    """Samples the tree's RSS every `period` s on a thread; `cpu` before/after brackets a cell."""

    def __init__(self, root: int, period: float = 0.2) -> None:
        self.root, self.period = root, period
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, rss_bytes(self.root))
            self._stop.wait(self.period)

    def __enter__(self) -> Monitor:
        self.cpu_start = cpu_seconds(self.root)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_s = cpu_seconds(self.root) - self.cpu_start
