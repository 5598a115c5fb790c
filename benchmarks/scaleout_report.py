"""The report of benchmarks/scaleout.py: the markdown table and the goals of issue 23."""

from __future__ import annotations

from typing import Any

from scaleout_fleet import KILL_LOAD, percentile

HEADER = (
    "| mode | load | offered | draw | SIGKILL | jobs | ok | failed | lost | p50 s | p95 s | p95 ≤3 tiles "
    "| p95 ≥9 tiles | busy share r0 / r1 / r2 | spread | 503s |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def row(c: dict[str, Any]) -> str:
    shares = " / ".join(f"{100 * s:.1f} %" for s in c["busy_share"])
    spread = "–" if c["busy_share_spread"] is None else f"{100 * c['busy_share_spread']:.0f} %"
    kills = f"{len(c['kills'])}×" if c["kill"] else "–"
    return (
        f"| {c['mode']} | {round(100 * c['load'])} % | {round(100 * c['offered_load'])} % | {c['seed']} "
        f"| {kills} | {c['submitted']} | {c['succeeded']} "
        f"| {c['failed']} | {c['lost']} | {_f(c['p50_s'])} | {_f(c['p95_s'])} | {_f(c['p95_small_s'])} "
        f"| {_f(c['p95_large_s'])} | {shares} | {spread} | {c['retries_503']} |"
    )


def goals(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Pull p95 / push p95 per traffic draw at 90 % (same arrivals in both modes) and pooled over draws."""
    at90 = [c for c in cells if c["load"] == KILL_LOAD and not c["kill"]]
    ratios, pooled = {}, {}
    for c in at90:
        twin = next((d for d in at90 if d["mode"] == "push" and d["seed"] == c["seed"]), None)
        if c["mode"] == "pull" and twin is not None and twin["p95_s"] and c["p95_s"] is not None:
            ratios[f"seed {c['seed']}"] = round(c["p95_s"] / twin["p95_s"], 3)
    for mode in ("push", "pull"):
        pooled[mode] = percentile([x for c in at90 if c["mode"] == mode for x in c["latencies_s"]], 95)
    ratio = round(pooled["pull"] / pooled["push"], 3) if pooled["push"] and pooled["pull"] else None
    pull_cells = [c for c in cells if c["mode"] == "pull"]
    spreads = {c["cell"]: c["busy_share_spread"] for c in cells}
    return {
        "pull_p95_over_push_p95_at_90_by_draw": ratios,
        "pooled_p95_at_90_s": pooled,
        "pull_p95_over_push_p95_at_90": ratio,
        "p95_goal_met": ratio is not None and ratio <= 0.7,
        "busy_share_spread": spreads,
        "pull_busy_shares_within_10pct": all(
            c["busy_share_spread"] is not None and c["busy_share_spread"] <= 0.10 for c in pull_cells
        ),
        "pull_lost": sum(c["lost"] for c in pull_cells),
        "push_lost": sum(c["lost"] for c in cells if c["mode"] == "push"),
    }


def report(data: dict[str, Any]) -> str:
    g = data["goals"]
    lines = [HEADER, *(row(c) for c in data["cells"]), ""]
    lines.append(
        f"pull p95 / push p95 at 90 %: {g['pull_p95_over_push_p95_at_90']} pooled over draws, "
        f"{g['pull_p95_over_push_p95_at_90_by_draw']} by draw (goal ≤ 0.7); "
        f"pull busy shares within 10 %: {g['pull_busy_shares_within_10pct']}; "
        f"lost: pull {g['pull_lost']}, push {g['push_lost']}"
    )
    return "\n".join(lines)
