"""Folder in, folder out: which files to do, where each result goes, what a resumed run skips."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gendr_client._core import INPUT_SUFFIXES, SUFFIXES, Options


@dataclass
class FolderReport:
    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # already in the output folder (resume)
    failed: dict[Path, str] = field(default_factory=dict)  # input → error

    @property
    def ok(self) -> bool:
        return not self.failed


def output_path(src_root: Path, dst_root: Path, src: Path, opts: Options) -> Path:
    """Same relative path; the suffix follows `format` when one is asked for."""
    out = dst_root / src.relative_to(src_root)
    return out.with_suffix(SUFFIXES[opts.format]) if opts.format in SUFFIXES else out


def plan_folder(
    src: Path, dst: Path, opts: Options, resume: bool
) -> tuple[list[tuple[Path, Path]], FolderReport]:
    """(input, output) pairs still to do, sorted; a resumed run skips outputs that exist and are not empty.

    Results are written atomically (`Result.save`), so an existing output is a finished one.
    """
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is not a folder")
    report = FolderReport()
    todo = []
    dst_resolved = dst.resolve()
    for p in sorted(src.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in INPUT_SUFFIXES or p.name.startswith("."):
            continue
        if dst_resolved in p.resolve().parents:
            continue  # the output folder inside the input folder
        out = output_path(src, dst, p, opts)
        if resume and out.is_file() and out.stat().st_size > 0:
            report.skipped.append(out)
        else:
            todo.append((p, out))
    return todo, report
