"""The parity report of `gendr-build verify`: rows, worst figures per variant, table, JSON, thresholds."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    precision: str
    level: str  # "tile" or "image"
    name: str
    shape: str
    max_abs_err: int
    mean_abs_err: float
    psnr_db: float
    seconds: float = 0.0


@dataclass
class VerifyReport:
    model: str
    reference: str
    rows: list[Row] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def worst(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for r in self.rows:
            w = out.setdefault(
                r.precision,
                {
                    "min_psnr_db": math.inf,
                    "max_abs_err": 0,
                    "min_tile_psnr_db": math.inf,
                    "min_image_psnr_db": math.inf,
                },
            )
            w["min_psnr_db"] = min(w["min_psnr_db"], r.psnr_db)
            w["max_abs_err"] = max(w["max_abs_err"], r.max_abs_err)
            k = f"min_{r.level}_psnr_db"
            w[k] = min(w[k], r.psnr_db)
        return out

    def table(self) -> str:
        head = (
            f"{'precision':<9} {'level':<5} {'input':<22} {'shape':<14} {'max|err|':>8} {'mean|err|':>9} "
            f"{'PSNR dB':>8} {'s':>6}"
        )
        lines = [f"{self.model}: ONNX Runtime CPU vs {self.reference}", head, "-" * len(head)]
        for r in self.rows:
            psnr = "inf" if math.isinf(r.psnr_db) else f"{r.psnr_db:.2f}"
            lines.append(
                f"{r.precision:<9} {r.level:<5} {r.name[:22]:<22} {r.shape:<14} {r.max_abs_err:>8d} "
                f"{r.mean_abs_err:>9.4f} {psnr:>8} {r.seconds:>6.2f}"
            )
        lines.append("-" * len(head))
        for p, w in self.worst().items():
            ps = "inf" if math.isinf(w["min_psnr_db"]) else f"{w['min_psnr_db']:.2f}"
            lines.append(f"{p:<9} worst: PSNR {ps} dB, max |err| {w['max_abs_err']}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and math.isinf(v):
                return None  # identical outputs; JSON has no infinity
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean(
            {
                "model": self.model,
                "reference": self.reference,
                "info": self.info,
                "worst": self.worst(),
                "rows": [asdict(r) for r in self.rows],
                "note": "psnr_db null = identical outputs",
            }
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path


def parse_thresholds(items: Sequence[str]) -> dict[str, float]:
    """["fp32=50", "int8=20"] → {"fp32": 50.0, "int8": 20.0}."""
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise ValueError(f"expected PRECISION=DB, got {it!r}")
        out[k.strip()] = float(v)
    return out


def failures(report: VerifyReport, min_psnr: dict[str, float]) -> list[str]:
    """Every bound missed — and every bound nothing was measured for: a threshold asked for a precision
    that has no rows (no such graph, or --tiles 0 --whole 0) must not pass by having nothing to fail."""
    worst = report.worst()
    bad = [
        f"{p}: not verified (no rows; asked --min-psnr {p}={v})"
        for p, v in min_psnr.items()
        if p not in worst
    ]
    for p, w in worst.items():
        base = p.split("@")[0]  # a shape graph (fp32@t32, fp32@dynamic) is held to its precision's bound
        if base in min_psnr and w["min_psnr_db"] < min_psnr[base]:
            bad.append(f"{p}: worst PSNR {w['min_psnr_db']:.2f} dB < {min_psnr[base]} dB")
    return bad
