"""Settings sources (env, config file, Kubernetes-injected variables), the CLI's arguments, CORS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.settings import CONFIG_FILE_ENV, Settings, settings_table


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("GENDR_"):
            monkeypatch.delenv(k)


def test_env_lists_accept_commas_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENDR_API_KEYS", "key-alpha-1, key-beta-2")
    monkeypatch.setenv("GENDR_MODELS", '["gendr", "esrgan"]')
    monkeypatch.setenv("GENDR_CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("GENDR_IMAGE_FORMATS", "jpeg,png,webp,avif")
    s = Settings()
    assert [k.get_secret_value() for k in s.api_keys] == ["key-alpha-1", "key-beta-2"]
    assert "key-alpha" not in repr(s)  # secrets never printed
    assert s.models == ["gendr", "esrgan"]
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.image_formats == ["JPEG", "PNG", "WEBP", "AVIF"]


def test_kubernetes_service_variables_do_not_break_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Service named `gendr` injects these into every pod of the namespace.
    monkeypatch.setenv("GENDR_PORT", "tcp://10.0.0.7:8000")
    monkeypatch.setenv("GENDR_SERVICE_HOST", "10.0.0.7")
    monkeypatch.setenv("GENDR_SERVICE_PORT", "8000")
    monkeypatch.setenv("GENDR_PORT_8000_TCP_ADDR", "10.0.0.7")
    Settings()
    assert "port" not in Settings.model_fields


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_file_and_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    values = {"max_batch": 8, "drain_timeout_s": 12.5, "api_keys": ["k"]}
    p = tmp_path / f"gendr{suffix}"
    if suffix == ".json":
        p.write_text(json.dumps(values))
    else:
        p.write_text('max_batch = 8\ndrain_timeout_s = 12.5\napi_keys = ["k"]\n')
    monkeypatch.setenv(CONFIG_FILE_ENV, str(p))
    monkeypatch.setenv("GENDR_MAX_BATCH", "16")  # env wins over the file
    s = Settings()
    assert (s.max_batch, s.drain_timeout_s, len(s.api_keys)) == (16, 12.5, 1)


def test_invalid_settings_are_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        Settings(image_formats=["NOPE"])
    with pytest.raises(ValidationError):
        Settings(default_deadline_s=700, max_deadline_s=600)
    with pytest.raises(ValidationError):
        Settings(bogus=1)  # type: ignore[call-arg]
    monkeypatch.setenv(CONFIG_FILE_ENV, str(tmp_path / "missing.toml"))
    with pytest.raises(ValueError, match="no such file"):
        Settings()


def test_settings_table_lists_every_setting() -> None:
    table = settings_table()
    for name in Settings.model_fields:
        assert f"`GENDR_{name.upper()}`" in table
    assert CONFIG_FILE_ENV in table and "GENDR_PORT`" not in table


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    e = {k: v for k, v in os.environ.items() if not k.startswith("GENDR_")}
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=60, env=e
    )


def test_cli_help_version_and_bad_settings() -> None:
    r = _cli("--help")
    assert r.returncode == 0 and "--host" in r.stdout and "--port" in r.stdout and "--log-level" in r.stdout
    assert _cli("--version").stdout.startswith("gendr-serve ")
    r = _cli(env={"GENDR_MAX_BATCH": "0"})
    assert r.returncode == 2 and "max_batch" in r.stderr


def test_cli_without_models_exits_with_a_message(tmp_path: Path) -> None:
    r = _cli("--port", "0", env={"GENDR_MODEL_REPOSITORY": str(tmp_path)})
    assert r.returncode == 1 and "no model found" in r.stderr and "Traceback" not in r.stderr


def test_cors_only_when_configured(make_client: Any) -> None:
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    c = make_client(cors_origins=["https://app.example"])
    r = c.options("/upscale", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = make_client().options("/upscale", headers=pre)
    assert "access-control-allow-origin" not in r.headers


def test_gpu_memory_gauges_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML is optional: with `pynvml` importable the gauges are filled at scrape time, else absent."""
    import types

    from service.metrics import Metrics

    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    m = Metrics()
    m.refresh_gpu_memory()
    assert m.registry.get_sample_value("gendr_gpu_memory_used_bytes", {"gpu": "0"}) is None

    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    m = Metrics()
    m.refresh_gpu_memory()
    assert m.registry.get_sample_value("gendr_gpu_memory_used_bytes", {"gpu": "1"}) == 2 * 2**30
    assert m.registry.get_sample_value("gendr_gpu_memory_total_bytes", {"gpu": "0"}) == 80 * 2**30


def test_http_layer_never_imports_torch() -> None:
    code = "import sys, service.http.app, service.cli, service.http.images; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
