"""deploy/: the Grafana dashboard, the Prometheus scrape config and the prometheus-adapter rule use
metric names the service really exports (service/metrics.py), and point at each other correctly."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from deploy_helpers import REPO

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gendr.json"


@pytest.fixture(scope="module")
def exported_series() -> dict[str, set[str]]:
    """Sample name -> label names, for every metric the service registers."""
    from prometheus_client.metrics import MetricWrapperBase

    from service.metrics import Metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
    }
    series: dict[str, set[str]] = {}
    metrics = [v for v in vars(Metrics()).values() if isinstance(v, MetricWrapperBase)]
    assert len(metrics) >= 10
    for metric in metrics:
        labels = set(metric._labelnames)
        for suffix in suffixes[metric._type]:
            series[metric._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            exprs.append(t["expr"])
    return exprs


# Labels Prometheus adds on scrape; the metric's own `instance` label arrives as `exported_instance`.
TARGET_LABELS = {
    "job",
    "instance",
    "exported_instance",
    "pod",
    "namespace",
    "service",
    "endpoint",
    "container",
}


def test_dashboard_uses_real_metrics(exported_series: dict[str, set[str]], yaml_mod: Any) -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = _exprs(dash)
    assert exprs
    used = set()
    for e in exprs:
        for name in re.findall(r"\bgendr_[a-z0-9_]+", e):
            assert name in exported_series, f"dashboard uses {name}, which service/metrics.py does not export"
            used.add(name)
        for group in re.findall(r"\bby \(([^)]*)\)", e):
            for label in (x.strip() for x in group.split(",")):
                known = set().union(*(exported_series[n] for n in re.findall(r"\bgendr_[a-z0-9_]+", e)))
                assert label in known | TARGET_LABELS, f"`by ({label})` in {e}"
    # Everything the issue asks the dashboard to show.
    for needed in (
        "gendr_output_megapixels_total",  # output MP/s
        "gendr_requests_total",  # request rate by status
        "gendr_request_duration_seconds_bucket",  # p50/p95/p99
        "gendr_queue_depth_tiles",
        "gendr_batch_size_bucket",
        "gendr_instance_busy_ratio",
        "gendr_gpu_memory_used_bytes",
    ):
        assert needed in used, needed
    joined = "\n".join(exprs)
    assert "sum by (status)" in joined
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(gendr_request_duration_seconds_bucket" in joined

    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] and all("gridPos" in p for p in dash["panels"])

    # The dashboard's data source variable defaults to the provisioned data source.
    ds = yaml_mod.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ][0]
    (var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert var["current"]["value"] == ds["uid"]
    assert ds["url"] == "http://prometheus:9090"


def test_dashboard_provisioning_path(yaml_mod: Any, compose: dict[str, Any]) -> None:
    prov = yaml_mod.safe_load((DEPLOY / "grafana/provisioning/dashboards/gendr.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_prometheus_scrapes_the_service(yaml_mod: Any, compose: dict[str, Any]) -> None:
    prom = yaml_mod.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "gendr"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    for name in ("gendr-gpu", "gendr-cpu"):
        svc = compose["services"][name]
        assert host in svc["networks"]["default"]["aliases"]
        assert any(p.endswith(f":{port}") for p in svc["ports"])
    assert (
        "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        in compose["services"]["prometheus"]["volumes"]
    )


def test_adapter_rule(adapter_rule: dict[str, Any], exported_series: dict[str, set[str]]) -> None:
    series = re.match(r"([a-z_:][a-z0-9_:]*)\{", adapter_rule["seriesQuery"])
    assert series, adapter_rule["seriesQuery"]
    name = series.group(1)
    assert name == "gendr_queue_depth_tiles" and name in exported_series
    assert 'pod!=""' in adapter_rule["seriesQuery"] and 'namespace!=""' in adapter_rule["seriesQuery"]
    overrides = adapter_rule["resources"]["overrides"]
    assert overrides["namespace"]["resource"] == "namespace" and overrides["pod"]["resource"] == "pod"
    assert re.fullmatch(adapter_rule["name"]["matches"], name)
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in adapter_rule["metricsQuery"]


def test_adapter_external_rule(
    adapter_external_rule: dict[str, Any], exported_series: dict[str, set[str]]
) -> None:
    """The global job backlog (Redis mode) as an external metric per namespace: every replica reports
    the same number read from Redis, so the rule takes the max over pods, then sums the models."""
    rule = adapter_external_rule
    series = re.match(r"([a-z_:][a-z0-9_:]*)\{", rule["seriesQuery"])
    assert series, rule["seriesQuery"]
    name = series.group(1)
    assert name == "gendr_jobs_backlog_tiles" and re.fullmatch(rule["name"]["matches"], name)
    assert rule["name"]["as"] == name
    assert 'namespace!=""' in rule["seriesQuery"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}}
    assert "max by (namespace, model) (<<.Series>>{<<.LabelMatchers>>})" in rule["metricsQuery"]
    assert rule["metricsQuery"].startswith("sum by (namespace) (")
    assert name in exported_series, f"service/metrics.py does not export {name}"
    assert "model" in exported_series[name]
