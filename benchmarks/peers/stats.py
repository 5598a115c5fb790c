"""Per-cell figures from per-request records: throughput, latency percentiles, failure rates by size class."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: Outcome of one request: ok (200 with a PNG of the right size), shed (503), timeout, error (anything else).
OUTCOMES = ("ok", "shed", "timeout", "error")


@dataclass(frozen=True)
class Record:
    size_class: str
    outcome: str
    latency_s: float  # completion − scheduled send time (includes any lateness of the client)
    output_pixels: int  # of a successful response, else 0
    status: int = 0  # HTTP status, 0 when none arrived


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _latencies(records: Sequence[Record]) -> dict[str, float]:
    ok = [r.latency_s for r in records if r.outcome == "ok"]
    return {f"p{q}_s": round(percentile(ok, q), 4) for q in (50, 95, 99)}


def summarise(records: Sequence[Record], wall_s: float, classes: Sequence[str]) -> dict[str, object]:
    """Cell figures. Latency percentiles are of successful requests; rates are of all sent requests.

    `wall_s`: from the first scheduled send to the last completion; output MP/s = successful output
    megapixels / wall_s.
    """
    n = len(records)
    out: dict[str, object] = {
        "sent": n,
        "ok": sum(r.outcome == "ok" for r in records),
        "output_mp": round(sum(r.output_pixels for r in records) / 1e6, 3),
        "output_mp_s": round(sum(r.output_pixels for r in records) / 1e6 / wall_s, 4) if wall_s > 0 else 0.0,
        "wall_s": round(wall_s, 2),
        **_latencies(records),
    }
    for o in OUTCOMES[1:]:
        out[f"{o}_rate"] = round(sum(r.outcome == o for r in records) / n, 4) if n else 0.0
    per: dict[str, dict[str, object]] = {}
    for c in classes:
        rs = [r for r in records if r.size_class == c]
        row: dict[str, object] = {"sent": len(rs), **_latencies(rs)}
        for o in OUTCOMES[1:]:
            row[f"{o}_rate"] = round(sum(r.outcome == o for r in rs) / len(rs), 4) if rs else 0.0
        per[c] = row
    out["by_class"] = per
    return out
