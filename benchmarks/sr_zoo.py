"""The SR model zoo matrix: every spandrel architecture through import-sr → ONNX → parity → served.

    python benchmarks/sr_zoo.py                 # the full matrix (about 20 min on 2 cores)
    python benchmarks/sr_zoo.py SwinIR DnCNN    # some architectures (not written to the docs)
    python benchmarks/sr_zoo.py --merge SwinIR  # re-run some rows of the stored results, rewrite docs

Prints the markdown coverage table; a full run also writes benchmarks/results/sr_zoo.json and
replaces the table in docs/models.md (tests/engine_build/test_sr_zoo.py checks that the two agree).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine

RESULTS = ROOT / "benchmarks" / "results" / "sr_zoo.json"
DOC = ROOT / "docs" / "models.md"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("spandrel", "torch", "onnx", "onnxruntime"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("only", nargs="*", help="architecture ids or entry keys (default: every entry)")
    p.add_argument("--no-fp16", action="store_true", help="export fp32 only")
    p.add_argument("--no-write", action="store_true", help="print the table, write nothing")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--merge", action="store_true", help="replace these rows in the stored results and rewrite the docs"
    )
    args = p.parse_args(argv)

    from engine_build.sr_zoo import ZOO, entries
    from engine_build.sr_zoo_run import run_entry
    from engine_build.sr_zoo_table import render_table, replace_table

    chosen = entries(args.only or None)
    precisions = ("fp32",) if args.no_fp16 else ("fp32", "fp16")
    results = []
    with tempfile.TemporaryDirectory(prefix="sr-zoo-") as work:
        for i, e in enumerate(chosen, 1):
            r = run_entry(e, Path(work), precisions=precisions)
            results.append(r.as_dict())
            print(
                f"[{i}/{len(chosen)}] {e.key}: {r.status} ({r.seconds:.0f} s) {r.reason}".rstrip(),
                file=sys.stderr,
                flush=True,
            )
    if args.merge:
        if not args.only:
            p.error("--merge needs the entries to re-run")
        fresh = {(r["arch"], r["variant"]): r for r in results}
        stored = {(r["arch"], r["variant"]): r for r in json.loads(RESULTS.read_text())["results"]}
        stored.update(fresh)
        results = [stored[(e.arch, e.variant)] for e in ZOO if (e.arch, e.variant) in stored]
    data = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": machine(),
        "versions": _versions(),
        "precisions": list(precisions),
        "seconds": round(sum(r["seconds"] for r in results), 1),
        "results": results,
    }
    table = render_table(data)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    if (args.merge or not args.only) and not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        DOC.write_text(replace_table(DOC.read_text(), table))
        print(f"wrote {RESULTS.relative_to(ROOT)} and the table in {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
