"""Helpers for the deployment checks (tests/k8s): find the tools, render overlays, read objects.

The tools come from `.ci/install-deploy-tools.sh` (PyPI only). Where one is missing, a test
skips with the reason on a developer machine, and fails in CI (CI=true): a linter that silently
did not run is worse than no linter.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
OVERLAYS = ("a10", "l20")
INSTALL_HINT = "run `bash .ci/install-deploy-tools.sh`"

# What each GPU pool can run (docs/export.md: fp8 needs Ada or Hopper) and how nodes are labelled.
POOLS: dict[str, dict[str, Any]] = {
    "a10": {"precisions": {"fp16", "int8"}, "gpu_product": "NVIDIA-A10", "target_gpu": "a10"},
    "l20": {"precisions": {"fp16", "int8", "fp8"}, "gpu_product": "NVIDIA-L20", "target_gpu": "l20"},
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """Skip locally, fail in CI."""
    msg = f"{what} is not installed ({INSTALL_HINT})"
    if in_ci():
        pytest.fail(msg + " - CI must run every deployment check", pytrace=False)
    pytest.skip(msg)


def tools_bin() -> Path:
    root = os.environ.get("DEPLOY_TOOLS_DIR") or str(Path.home() / ".cache" / "gendr-deploy-tools")
    return Path(root) / "bin"


def find_tool(name: str) -> str | None:
    """The pinned copy from the install script first, then PATH."""
    pinned = tools_bin() / name
    if pinned.exists() and os.access(pinned, os.X_OK):
        return str(pinned)
    return shutil.which(name)


def need_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"Python package for `import {name}`")
        raise  # unreachable: missing() skips or fails


def run(
    cmd: list[str], *, cwd: Path = REPO, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _kustomize_command() -> list[str] | None:
    """`kustomize build` or `kubectl kustomize`, whichever exists with kustomize >= v5."""
    for name, args, version_args, pattern in (
        ("kubectl", ["kustomize"], ["version", "--client"], r"Kustomize Version: v(\d+)\."),
        ("kustomize", ["build"], ["version"], r"v(\d+)\."),
    ):
        exe = find_tool(name)
        if exe is None:
            continue
        out = run([exe, *version_args], timeout=30)
        m = re.search(pattern, out.stdout)
        if out.returncode == 0 and m and int(m.group(1)) >= 5:
            return [exe, *args]
    return None


def render(kustomize: list[str], path: Path) -> str:
    out = run([*kustomize, str(path)], timeout=60)
    assert out.returncode == 0, f"kustomize failed for {path}:\n{out.stderr}"
    return out.stdout


# --- small helpers on rendered objects ------------------------------------------------------------


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_templates(objs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(owner object, pod template) for every workload."""
    out = []
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            out.append((o, o["spec"]["template"]))
        elif o["kind"] == "CronJob":
            out.append((o, o["spec"]["jobTemplate"]["spec"]["template"]))
    return out


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels + matchExpressions)."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True
