"""Every `gendr-build` call in the engine-build Job parses with the real CLI, so a renamed flag or
choice breaks this test instead of the Job on a GPU node."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "k8s" / "base" / "engine-build-job.yaml"]
# Values the Job's shell variables take in the overlays (their ConfigMaps set PRECISION / TARGET_GPU).
SHELL_VALUES = {"PRECISION": "int8", "TARGET_GPU": "a10"}


def _calls() -> list[tuple[str, str]]:
    out = []
    for path in SOURCES:
        for m in re.finditer(
            r"gendr-build ((?:make-tiny|upscale|export|verify|quantize|engine|default|import-sr)"
            r"\b[^`\n;|]*)",
            path.read_text(),
        ):
            out.append((path.name, m.group(1)))
    return out


def _argv(call: str) -> list[str]:
    call = re.sub(r"\$\{?(\w+)\}?", lambda m: SHELL_VALUES.get(m.group(1), "x"), call)
    return shlex.split(call)


@pytest.mark.parametrize(("where", "call"), _calls())
def test_gendr_build_call_parses(where: str, call: str) -> None:
    from engine_build.cli import build_parser  # parses without torch (commands import it lazily)

    argv = _argv(call)
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on an unknown flag or a bad choice
        pytest.fail(f"{where}: `gendr-build {call}` does not parse ({argv}): exit {e.code}")


def test_job_calls_are_found() -> None:
    assert sum(1 for w, _ in _calls() if w == "engine-build-job.yaml") >= 3
