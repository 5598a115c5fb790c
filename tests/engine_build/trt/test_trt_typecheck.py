"""The TensorRT-facing code type-checks against the real TensorRT API (tensorrt-stubs + mypy) and names
only CUDA runtime functions that exist (scripts/typecheck_trt.sh, in its own venv)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "typecheck_trt.sh"
NO_VENV = 3  # the script's exit status when its venv cannot be made (no package index)


def _run(*files: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["bash", str(SCRIPT), *files], cwd=ROOT, capture_output=True, text=True, timeout=900)
    if res.returncode == NO_VENV:
        pytest.skip(f"typecheck venv could not be made (no network?): {res.stderr.strip()[-300:]}")
    return res


def test_trt_build_and_backend_are_clean_against_tensorrt_stubs() -> None:
    res = _run()
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_check_catches_wrong_tensorrt_and_cudart_calls(tmp_path: Path) -> None:
    """Not vacuous: the stubs are really read (a misspelt method and a wrong argument are errors), and a
    CUDA runtime function that does not exist is reported."""
    bad = tmp_path / "bad_trt.py"
    bad.write_text(
        "from typing import Any\n"
        "import tensorrt as trt\n\n\n"
        "def load(plan: bytes, cuda: Any) -> None:\n"
        "    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))\n"
        "    engine = runtime.deserialize_cuda_engin(plan)\n"
        "    ctx = runtime.deserialize_cuda_engine(plan).create_execution_context()\n"
        "    ctx.set_optimization_profile_async('0', 0)\n"
        "    cuda('cudaMallocManagedd', 16)\n"
        "    cuda('cudaMemcpyAsync', 0, 0, 16)\n",
        encoding="utf-8",
    )
    res = _run(str(bad))
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert 'has no attribute "deserialize_cuda_engin"' in out
    assert 'Argument 1 to "set_optimization_profile_async"' in out
    assert "has no attribute 'cudaMallocManagedd'" in out
    assert "cudaMemcpyAsync(dst, src, count, kind: 'cudaMemcpyKind', stream) called with 3" in out


def test_second_run_reuses_the_venv() -> None:
    _run()  # makes the venv if needed
    res = _run()
    assert "making .venv-trt-stubs" not in res.stderr
