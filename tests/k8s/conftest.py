"""Fixtures for the deployment checks: the tools, and every kustomize overlay rendered once.

Helpers live in deploy_helpers.py (a unique module name: tests/ has no packages, and a second
`conftest` module would shadow the root one).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

# Importable from the test modules whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_helpers import (
    K8S,
    OVERLAYS,
    REPO,
    VARIANTS,
    _kustomize_command,
    missing,
    need_module,
    render,
    variant_dir,
)


@pytest.fixture(scope="session")
def kustomize() -> list[str]:
    cmd = _kustomize_command()
    if cmd is None:
        missing("kustomize v5 (`kustomize` or `kubectl kustomize`)")
    assert cmd is not None
    return cmd


@pytest.fixture(scope="session")
def yaml_mod() -> ModuleType:
    return need_module("yaml")


@pytest.fixture(scope="session")
def rendered_text(
    kustomize: list[str], yaml_mod: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """Rendered YAML of every overlay, of the base, and of every VARIANTS combination of an overlay
    or the base with components, keyed by name ("a10", "base", "a10+keda", ...)."""
    texts = {name: render(kustomize, K8S / "overlays" / name) for name in OVERLAYS}
    texts["base"] = render(kustomize, K8S / "base")
    k8s_copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, k8s_copy)
    for name in VARIANTS:
        texts[name] = render(kustomize, variant_dir(k8s_copy, name, yaml_mod))
    return texts


@pytest.fixture(scope="session")
def rendered(rendered_text: dict[str, str], yaml_mod: ModuleType) -> dict[str, list[dict[str, Any]]]:
    objs = {name: [d for d in yaml_mod.safe_load_all(text) if d] for name, text in rendered_text.items()}
    # The stand-alone helper pod (not in a kustomization), checked like the rest.
    objs["upload"] = [d for d in yaml_mod.safe_load_all((K8S / "upload-pod.yaml").read_text()) if d]
    return objs


@pytest.fixture(scope="session")
def compose(yaml_mod: ModuleType) -> dict[str, Any]:
    """docker-compose.yml as written (YAML merge keys resolved)."""
    return yaml_mod.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="session")
def adapter_rule(yaml_mod: ModuleType) -> dict[str, Any]:
    """The prometheus-adapter rule that publishes the HPA's metric."""
    values = yaml_mod.safe_load((REPO / "deploy" / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = [r for r in values["rules"]["custom"] if "gendr_queue_depth_tiles" in r["seriesQuery"]]
    return rule


@pytest.fixture(scope="session")
def adapter_external_rule(yaml_mod: ModuleType) -> dict[str, Any]:
    """The prometheus-adapter external rule that publishes the global job backlog (Redis mode)."""
    values = yaml_mod.safe_load((REPO / "deploy" / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = [r for r in values["rules"]["external"] if "gendr_jobs_backlog_tiles" in r["seriesQuery"]]
    return rule


@pytest.fixture(scope="session")
def adapter_refused_rule(yaml_mod: ModuleType) -> dict[str, Any]:
    """The prometheus-adapter rule that publishes the refused work (503 overloaded per second, per pod)."""
    values = yaml_mod.safe_load((REPO / "deploy" / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = [r for r in values["rules"]["custom"] if r["name"]["as"] == "gendr_refused_requests_per_second"]
    return rule
