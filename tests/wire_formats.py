"""Reading what the server writes in tests: Prometheus text and Server-Sent Events (shared helpers)."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples (name as exposed, e.g. `..._total`) whose labels match."""
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def parse_sse(text: str) -> list[tuple[str, Any]]:
    """(event, data) per event; comments as ("comment", text); the `retry:` line as ("retry", ms)."""
    out: list[tuple[str, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        if block.startswith(":"):
            out.append(("comment", block[1:].strip()))
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "retry" in fields and "event" not in fields:
            out.append(("retry", int(fields["retry"])))
        elif "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out
