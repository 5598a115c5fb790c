"""Markdown table and p95-vs-throughput plot of a peers run (from its JSON)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from traffic import CLASS_NAMES

ENGINE_TITLES = {
    "cost": "cost model of one GPU (a + b·n/128², serialised)",
    "onnx": "ONNX Runtime CPU, compact ×4 CNN",
}


def _ms(v: object) -> str:
    return "–" if not isinstance(v, int | float) or math.isnan(v) else f"{v * 1000:.0f}"


def _pct(v: object) -> str:
    return "–" if not isinstance(v, int | float) else f"{v * 100:.0f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    cfg = result["config"]
    lines = [
        "# gendr-serve vs. peers",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; client on the same machine. Command: `{cfg['command']}`.",
        f"Cells of {', '.join(f'{k} {v:g}' for k, v in cfg['cell_s'].items())} s of open-loop Poisson "
        f"traffic (seed {cfg['seed']}), request timeout "
        f"{cfg['timeout_s']} s; loads are fractions of gendr-serve's measured capacity on each engine.",
        "Latencies are of successful requests, in ms; shed = 503, t/o = timeouts, err = anything else "
        "(% of sent). CPU = server process tree CPU seconds per output MP. load = 1-min load average "
        "before the cell.",
        "",
    ]
    for eng, cap in result["capacity"].items():
        lines += [
            f"## {ENGINE_TITLES.get(eng, eng)}",
            "",
            f"gendr-serve capacity (closed loop): {cap['output_mp_s']:.3f} output MP/s = "
            f"{cap['req_s']:.2f} req/s.",
            "",
            "| system | load | req/s | MP/s | p50 | p95 | p99 | "
            + " | ".join(f"p95 {c}" for c in CLASS_NAMES)
            + " | shed % | t/o % | err % | "
            + " | ".join(f"fail % {c}" for c in CLASS_NAMES)
            + " | CPU s/MP | RSS MB | load |",
            "| --- " * (13 + 2 * len(CLASS_NAMES)) + "|",
        ]
        for c in (c for c in result["cells"] if c["engine"] == eng):
            if "error" in c:
                lines.append(f"| {c['system']} | {c['load']:.0%} | failed: {c['error'][:80]} |")
                continue
            by = c["by_class"]
            fails = [
                _pct(by[k]["shed_rate"] + by[k]["timeout_rate"] + by[k]["error_rate"]) for k in CLASS_NAMES
            ]
            lines.append(
                f"| {c['system']} | {c['load']:.0%} | {c['offered_req_s']:.2f} | {c['output_mp_s']:.3f} | "
                f"{_ms(c['p50_s'])} | {_ms(c['p95_s'])} | {_ms(c['p99_s'])} | "
                + " | ".join(_ms(by[k]["p95_s"]) for k in CLASS_NAMES)
                + f" | {_pct(c['shed_rate'])} | {_pct(c['timeout_rate'])} | {_pct(c['error_rate'])} | "
                + " | ".join(fails)
                + f" | {c['cpu_s_per_mp']:.2f} | {c['peak_rss_mb']:.0f} | {c['load_avg_before']:.2f} |"
            )
        lines.append("")
    lines += ["## Systems", "", "| system | workers | batching | startup s |", "| --- | --- | --- | --- |"]
    for name, s in result["systems"].items():
        lines.append(f"| {name} | {s['workers_note']} | {s['batching']} | {s.get('startup_s', '–')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(result["capacity"])
    fig, axes = plt.subplots(1, len(engines), figsize=(6.5 * len(engines), 4.8), squeeze=False)
    for ax, eng in zip(axes[0], engines, strict=True):
        cells = [c for c in result["cells"] if c["engine"] == eng and "error" not in c]
        for name in dict.fromkeys(c["system"] for c in cells):
            pts = sorted((c["load"], c["output_mp_s"], c["p95_s"]) for c in cells if c["system"] == name)
            pts = [p for p in pts if not math.isnan(p[2])]
            if not pts:
                continue
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=name)
            for load, x, y in pts:
                ax.annotate(f"{load:.0%}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(ENGINE_TITLES.get(eng, eng), fontsize=10)
        ax.set_xlabel("output MP/s (successful responses)")
        ax.set_ylabel("p95 latency, s (successful)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = result["machine"]
    loads = "/".join(f"{x * 100:g}" for x in result["config"].get("loads", []))
    fig.suptitle(f"p95 vs throughput at {loads} % of gendr-serve's capacity — {m['cpu']}, {m['cores']} cores")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
