"""The model repository as the export stage writes it: one step primitive, and the folder helpers.

Every export step (checkpoint copy, ONNX fp32/fp16, quantized graphs, TensorRT engines) is the same
sequence, written once here as `run_step`:

    key (a hash of every input) → verify-or-skip (same key recorded and its files match their sha256)
    → produce into a temporary folder inside the repository → install (move into place atomically and
    record the result in the manifest) → StepResult

so a step is redone exactly when an input changed or a file was damaged, a crash never leaves a half
written artifact behind a valid manifest entry, and the skip check needs no torch (hashes only).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from service.manifest import (
    MANIFEST_FILE,
    Artifact,
    Manifest,
    ManifestError,
    OnnxVariant,
    read_manifest,
    verify_artifact,
)

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
CHECKPOINT_DIR = "checkpoint"

R = TypeVar("R")


@dataclass
class StepResult:
    step: str
    skipped: bool
    seconds: float
    detail: str = ""


def tmp_dir(parent: Path, tag: str) -> Path:
    """A fresh temporary folder beside the final one (same file system: the install is a rename)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=f".tmp-{tag.replace(' ', '-')}-"))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; the old one is removed only after the new one is there."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def artifacts_ok(model_dir: Path, artifacts: Iterable[Artifact | None]) -> bool:
    """Every artifact is present and matches its recorded sha256 (a mismatch is logged)."""
    try:
        for a in artifacts:
            if a is not None:
                verify_artifact(model_dir, a)
    except ManifestError as e:
        log.warning("%s", e)
        return False
    return True


def run_step(
    model_dir: Path,
    step: str,
    key: str,
    recorded: tuple[str, Sequence[Artifact | None]] | None,
    produce: Callable[[Path], R],
    install: Callable[[Path, R], str],
    *,
    force: bool = False,
    steps: list[StepResult] | None = None,
    parent: Path | None = None,
) -> tuple[bool, R | None]:
    """Run one idempotent step; returns (skipped, what `produce` returned).

    `recorded` is (key, artifacts) of what the manifest holds for this step now; `produce(tmp)` writes
    into a temporary folder under `parent` (default: the repository); `install(tmp, result)` moves it
    into place, records it in the manifest and returns a one-line detail. The temporary folder is
    removed whatever happens.
    """
    t0 = time.perf_counter()
    if not force and recorded is not None and recorded[0] == key and artifacts_ok(model_dir, recorded[1]):
        log.info("%s: up to date (key %s…), skipped", step, key[:12])
        if steps is not None:
            steps.append(StepResult(step, True, time.perf_counter() - t0, "same key, files match"))
        return True, None
    tmp = tmp_dir(parent or model_dir, step)
    try:
        result = produce(tmp)
        detail = install(tmp, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if steps is not None:
        steps.append(StepResult(step, False, time.perf_counter() - t0, detail))
    return False, result


def existing_manifest(model_dir: Path) -> Manifest | None:
    if not (model_dir / MANIFEST_FILE).is_file():
        return None
    try:
        return read_manifest(model_dir, verify=False)
    except ManifestError as e:
        log.warning("ignoring unreadable manifest: %s", e)
        return None


def drop_stale(
    manifest: Manifest, model_dir: Path, precisions: Sequence[str], reason: str, keep_self: bool = False
) -> Manifest:
    """Remove variants (unless keep_self), the quantized graphs derived from them and every engine built
    from any of those, files included. Returns the new manifest (not written)."""
    gone = set(precisions)
    for q, v in manifest.onnx.items():
        if v.quantization and v.quantization.get("base") in gone:
            gone.add(q)
    onnx_map = {q: v for q, v in manifest.onnx.items() if q not in gone or (keep_self and q in precisions)}
    engines = [e for e in manifest.engines if e.precision not in gone]
    for q in gone - (set(precisions) if keep_self else set()):
        if q in manifest.onnx:
            log.warning("onnx %s removed: %s; re-run the step that makes it", q, reason)
            shutil.rmtree(model_dir / ONNX_DIR / q, ignore_errors=True)
    for e in manifest.engines:
        if e not in engines:
            log.warning("TensorRT %s engine for sm_%s removed: %s", e.precision, e.compute_capability, reason)
            (model_dir / e.plan.path).unlink(missing_ok=True)
    return manifest.model_copy(update={"onnx": onnx_map, "engines": engines})


def variant_ok(model_dir: Path, v: OnnxVariant | None, key: str) -> bool:
    """The manifest holds this ONNX variant with this key, and its files match."""
    return v is not None and v.key == key and artifacts_ok(model_dir, [v.graph, v.external_data])
