"""Every GENDR_* variable the deployment files set is a real setting with a valid value: renaming a
field in service/settings.py breaks this test, not a rollout."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from deploy_helpers import OVERLAYS, REPO, VARIANTS, pod_templates

from service.settings import Settings

PREFIX = "GENDR_"
FIELDS = {PREFIX + name.upper() for name in Settings.model_fields}
# Stands in for values that come from Secrets (never in the repository).
SECRET_PLACEHOLDER = "placeholder-key-1,placeholder-key-2"


def _k8s_envs(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, str]]]:
    """(where, env) for every container: ConfigMaps it loads with envFrom, then its own env."""
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    for owner, tpl in pod_templates(objs):
        for c in tpl["spec"].get("initContainers", []) + tpl["spec"]["containers"]:
            env: dict[str, str] = {}
            for src in c.get("envFrom", []):
                ref = src["configMapRef"]["name"]
                assert ref in config_maps, (
                    f"{owner['metadata']['name']}: envFrom names missing ConfigMap {ref}"
                )
                env.update({src.get("prefix", "") + k: v for k, v in config_maps[ref].items()})
            for e in c.get("env", []):
                env[e["name"]] = e["value"] if "value" in e else SECRET_PLACEHOLDER
            yield f"{owner['kind']}/{owner['metadata']['name']}/{c['name']}", env


def _dockerfile_envs() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def _all_gendr_names(rendered: dict[str, list[dict[str, Any]]], compose: dict[str, Any]) -> dict[str, str]:
    names: dict[str, str] = {}
    for overlay, objs in rendered.items():
        for o in objs:
            if o["kind"] == "ConfigMap":
                names.update({k: f"k8s {overlay} ConfigMap" for k in o.get("data", {})})
        for where, env in _k8s_envs(objs):
            names.update({k: f"k8s {overlay} {where}" for k in env})
    for svc_name, svc in compose["services"].items():
        names.update({k: f"docker-compose {svc_name}" for k in svc.get("environment", {})})
    names.update({k: "Dockerfile ENV" for k in _dockerfile_envs()})
    return {k: v for k, v in names.items() if k.startswith(PREFIX)}


def test_no_port_setting() -> None:
    # Kubernetes injects GENDR_PORT=tcp://... for a Service named `gendr`: it must mean nothing to us.
    assert "GENDR_PORT" not in FIELDS and "port" not in Settings.model_fields


def test_every_gendr_variable_is_a_setting(
    rendered: dict[str, list[dict[str, Any]]], compose: dict[str, Any]
) -> None:
    names = _all_gendr_names(rendered, compose)
    assert len(names) >= 10, names  # the scan itself works
    unknown = {k: v for k, v in names.items() if k not in FIELDS}
    assert not unknown, f"not fields of service.settings.Settings: {unknown}"
    assert "GENDR_PORT" not in names


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for k in list(os.environ):
        if k.startswith(PREFIX):
            monkeypatch.delenv(k)
    return monkeypatch


def _load(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    with monkeypatch.context() as m:
        for k, v in env.items():
            m.setenv(k, v)
        return Settings()


@pytest.mark.parametrize("overlay", [*OVERLAYS, "base", *VARIANTS])
def test_k8s_values_validate(
    overlay: str, rendered: dict[str, list[dict[str, Any]]], clean_env: pytest.MonkeyPatch
) -> None:
    checked = 0
    for where, env in _k8s_envs(rendered[overlay]):
        gendr = {k: v for k, v in env.items() if k.startswith(PREFIX)}
        if not gendr:
            continue
        s = _load(clean_env, gendr)
        assert str(s.model_repository) == gendr["GENDR_MODEL_REPOSITORY"], where
        assert [k.get_secret_value() for k in s.api_keys] == SECRET_PLACEHOLDER.split(","), where
        checked += 1
    assert checked == 1, "exactly the server container reads GENDR_ settings"


def test_compose_values_validate(compose: dict[str, Any], clean_env: pytest.MonkeyPatch) -> None:
    defaults = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")
    for name in ("gendr-gpu", "gendr-cpu"):
        env = {k: defaults.sub(r"\1", str(v)) for k, v in compose["services"][name]["environment"].items()}
        s = _load(clean_env, env)
        assert str(s.model_repository) == "/models"
        assert s.api_keys == []  # open by default on a developer machine
    s = _load(clean_env, {k: v for k, v in _dockerfile_envs().items() if k.startswith(PREFIX)})
    assert str(s.model_repository) == "/models"
