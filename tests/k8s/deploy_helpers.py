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
COMPONENTS = K8S / "components"
# What each overlay lists in `components:` as committed: the shared job store. keda and job-egress
# are optional (commented out there); docs/deploy.md says how to switch them on.
OVERLAY_COMPONENTS = ("redis", "models-s3")
# The two model storage modes (docs/deploy.md, "Model storage"): one of them in every pool set.
STORAGE_MODES = ("models-s3", "models-pvc")
# Every combination rendered and checked besides the committed overlays: the overlays with the
# optional components switched on or the other storage mode, and the base (embedded job store) with
# each valid set (keda scales on the Redis stream, so it needs redis). Name -> (overlay or "base",
# components in order).
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{
        f"{o}+{'+'.join(extra)}": (o, ("redis", "models-s3", *extra))
        for o in OVERLAYS
        for extra in (("keda",), ("job-egress",), ("keda", "job-egress"), ("ingress-nginx",))
    },
    **{f"{o}+models-pvc": (o, ("redis", "models-pvc")) for o in OVERLAYS},
    "base+models-s3": ("base", ("models-s3",)),
    "base+models-pvc": ("base", ("models-pvc",)),
    "base+redis+models-s3": ("base", ("redis", "models-s3")),
    "base+redis+keda+models-pvc": ("base", ("redis", "keda", "models-pvc")),
    "base+job-egress+models-s3": ("base", ("job-egress", "models-s3")),
    "base+redis+keda+job-egress+models-s3+ingress-nginx": (
        "base",
        ("redis", "keda", "job-egress", "models-s3", "ingress-nginx"),
    ),
}
INSTALL_HINT = "run `bash .ci/install-deploy-tools.sh`"

# What each GPU pool can run (docs/export.md: fp8 needs Ada or Hopper); its nodes: test_deploy_gpu_nodes.py.
POOLS: dict[str, dict[str, Any]] = {
    "a10": {"precisions": {"fp16", "int8"}, "target_gpu": "a10"},
    "l20": {"precisions": {"fp16", "int8", "fp8"}, "target_gpu": "l20"},
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


def variant_dir(k8s_copy: Path, name: str, yaml_mod: ModuleType) -> Path:
    """A kustomization for VARIANTS[name] inside a copy of k8s/ (the repository stays untouched): an
    overlay's copy with its `components:` replaced, as a user would uncomment them, or a
    kustomization over the base."""
    target, components = VARIANTS[name]
    if target == "base":
        folder = k8s_copy / "variants" / name
        folder.mkdir(parents=True)
        kust: dict[str, Any] = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            # As every kustomization over the base must (the base's own only covers its objects).
            "namespace": "gendr",
            "resources": ["../../base"],
        }
    else:
        folder = k8s_copy / "overlays" / name
        shutil.copytree(k8s_copy / "overlays" / target, folder)
        kust = yaml_mod.safe_load((folder / "kustomization.yaml").read_text())
    kust["components"] = [f"../../components/{c}" for c in components]
    (folder / "kustomization.yaml").write_text(yaml_mod.safe_dump(kust, sort_keys=False))
    return folder


def pool_of(name: str) -> str | None:
    """The GPU pool a rendered set belongs to: "a10" for "a10" and "a10+keda"; None for the base."""
    first = name.split("+")[0]
    return first if first in OVERLAYS else None


def components_of(name: str) -> tuple[str, ...]:
    if name in VARIANTS:
        return VARIANTS[name][1]
    return OVERLAY_COMPONENTS if name in OVERLAYS else ()


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
