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
#: One JSON row per finished entry, so an interrupted run resumes (`--resume`) instead of starting over.
PROGRESS = ROOT / ".cache" / "sr_zoo.progress.jsonl"
#: Run last: the biggest networks (tens of millions of parameters even when shrunk).
LAST = ("AuraSR", "GFPGAN", "RestoreFormer", "LaMa")
#: Seconds and address space one entry may take (a forked worker); rows over either fail with that
#: reason instead of stalling the matrix or waking the OOM killer on a shared machine.
ENTRY_TIMEOUT_S = 300
ENTRY_MEMORY_GB = 12


def _run_one(entry: object, work: str, precisions: tuple[str, ...]) -> dict:
    import resource

    from sr_zoo_harness import run_entry

    limit = ENTRY_MEMORY_GB << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return run_entry(entry, Path(work), precisions=precisions).as_dict()  # type: ignore[arg-type]


def run_with_timeout(entry: object, work: str, precisions: tuple[str, ...], timeout: float) -> dict:
    """One entry in a forked process, so a network too slow for this machine cannot stall the matrix."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        job = pool.apply_async(_run_one, (entry, work, precisions))
        try:
            return job.get(timeout)
        except multiprocessing.TimeoutError:
            pool.terminate()
    e = entry
    return {
        "arch": e.arch,  # type: ignore[attr-defined]
        "variant": e.variant,  # type: ignore[attr-defined]
        "family": e.family,  # type: ignore[attr-defined]
        "scale": e.scale,  # type: ignore[attr-defined]
        "status": "failed",
        "reason": f"did not finish within the harness's {timeout:.0f} s on this machine",
        "seconds": timeout,
    }


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
    p.add_argument("--resume", action="store_true", help=f"skip the entries already in {PROGRESS.name}")
    p.add_argument(
        "--merge", action="store_true", help="replace these rows in the stored results and rewrite the docs"
    )
    args = p.parse_args(argv)

    from sr_zoo_table import render_table, replace_table

    from engine_build.sr.zoo import ZOO, entries

    chosen = entries(args.only or None)
    precisions = ("fp32",) if args.no_fp16 else ("fp32", "fp16")
    chosen = [e for e in chosen if e.arch not in LAST] + [e for e in chosen if e.arch in LAST]
    done: dict[tuple[str, str], dict] = {}
    if args.resume and PROGRESS.is_file():
        for line in PROGRESS.read_text().splitlines():
            row = json.loads(line)
            done[(row["arch"], row["variant"])] = row
    elif PROGRESS.is_file():
        PROGRESS.unlink()
    PROGRESS.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sr-zoo-") as work:
        for i, e in enumerate(chosen, 1):
            if (e.arch, e.variant) in done:
                continue
            row = run_with_timeout(e, work, precisions, ENTRY_TIMEOUT_S)
            done[(e.arch, e.variant)] = row
            with PROGRESS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"[{i}/{len(chosen)}] {e.key}: {row['status']} ({row['seconds']:.0f} s) "
                f"{row['reason']}".rstrip(),
                file=sys.stderr,
                flush=True,
            )
    results = [done[(e.arch, e.variant)] for e in ZOO if (e.arch, e.variant) in done]
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
