"""Hole 2: the allocator environment is chosen deliberately and is the same everywhere the service runs
(the soak in benchmarks/reliability_soak.py measures what it buys; docs/reliability.md)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from reliability_helpers import DEPLOYED_ALLOCATOR

REPO = Path(__file__).resolve().parents[2]
WANT = DEPLOYED_ALLOCATOR


def test_allocator_settings_are_the_same_in_every_runtime_image_and_deployment() -> None:
    docker = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    stages = re.split(r"^FROM ", docker, flags=re.M)
    runtime = {
        m.group(1): s
        for s in stages
        if (m := re.match(r"\S+ AS (\w[\w-]*)", s)) and m.group(1) in ("cpu", "gpu")
    }
    assert set(runtime) == {"cpu", "gpu"}
    for name, text in runtime.items():
        for k, v in WANT.items():
            assert re.search(rf"\b{k}={v}(\s|$)", text), f"Dockerfile stage {name}: {k}"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    servers = [n for n in compose["services"] if n.startswith("gendr-")]
    assert servers
    for n in servers:
        env = compose["services"][n]["environment"]
        assert {k: str(env.get(k)) for k in WANT} == WANT, n
    deploy = yaml.safe_load((REPO / "k8s" / "base" / "deployment.yaml").read_text())
    for c in deploy["spec"]["template"]["spec"]["containers"]:
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert {k: env.get(k) for k in WANT} == WANT, c["name"]
