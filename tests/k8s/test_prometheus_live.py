"""The dashboard and the HPA signal against a real Prometheus (Debian's `prometheus`, `promtool`).

A real gendr-serve (fake backend) is scraped every second by a Prometheus on 127.0.0.1 whose target
carries the `namespace` and `pod` labels the Prometheus Operator adds on Kubernetes. After traffic,
every query of deploy/grafana/dashboards/gendr.json and the prometheus-adapter rule are evaluated
through Prometheus's HTTP API; each must return series with the labels its legend (or rule) uses.
Skipped without Prometheus (fails under CI=true: .ci/install-system-packages.sh installs it).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from deploy_helpers import REPO, missing, need_module
from live_server import LiveServer, free_port, live_server
from live_server import photo_png as png

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "gendr.json"
ADAPTER = REPO / "deploy" / "prometheus-adapter" / "values.yaml"
POD, NAMESPACE = "gendr-test-0", "gendr"
RATE_INTERVAL = "1m"
GPU_ONLY = ("gendr_gpu_memory_used_bytes", "gendr_gpu_memory_total_bytes")  # NVML: absent on a CPU
QUEUED_TILES = 9  # a 120×120 job at ×1 with the 64-px tiles of live_server's fake model


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} (apt-get install prometheus)")
    assert path is not None
    return path


def test_promtool_accepts_the_compose_config() -> None:
    r = subprocess.run(
        [_tool("promtool"), "check", "config", str(REPO / "deploy" / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


class Prom:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def series(self, match: str) -> list[dict[str, str]]:
        r = httpx.get(f"{self.url}/api/v1/series", params={"match[]": match}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def label_values(self, label: str, match: str) -> list[str]:
        r = httpx.get(f"{self.url}/api/v1/label/{label}/values", params={"match[]": match}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def scrapes(self) -> int:
        got = self.query('count_over_time(up{job="gendr"}[10m])')
        return int(float(got[0]["value"][1])) if got else 0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Prom]]:
    prometheus = _tool("prometheus")
    work = tmp_path_factory.mktemp("prom")
    with live_server(work / "gendr", GENDR_MAX_BATCH="2", GENDR_QUEUE_CAPACITY_TILES="64") as srv:
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "gendr",
                    "scrape_timeout": "900ms",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{srv.port}"], "labels": {"namespace": NAMESPACE, "pod": POD}}
                    ],
                }
            ],
        }
        cfg = work / "prometheus.yml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        log = work / "prometheus.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={cfg}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        prom = Prom(f"http://127.0.0.1:{port}")
        try:

            def ready() -> bool:
                assert proc.poll() is None, log.read_text()
                try:
                    return httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False

            srv.wait_for(ready, f"prometheus never became ready: {log.read_text()[-2000:]}", timeout=60)
            _traffic(srv, prom)
            yield srv, prom
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _traffic(srv: LiveServer, prom: Prom) -> None:
    """Requests (200s and a 400) spread over several scrapes, so every rate() has two samples to use."""
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            while not stop.is_set():
                assert c.post("/upscale?scale=2", content=png(48)).status_code == 200
                assert c.post("/upscale?scale=1&format=jpeg", content=png(100)).status_code == 200
                assert c.post("/upscale?scale=99", content=png(8)).status_code == 400
                time.sleep(0.1)

    t = threading.Thread(target=send)
    t.start()
    try:
        first = prom.scrapes()
        srv.wait_for(lambda: prom.scrapes() >= first + 5, "prometheus did not scrape during the traffic")
    finally:
        stop.set()
        t.join(30)


def _dashboard_queries() -> list[tuple[str, str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            if t.get("expr"):
                out.append((panel["title"], t["expr"], t.get("legendFormat") or ""))
    return out


def _instantiate(expr: str) -> str:
    """Grafana's variables as the dashboard's defaults resolve them: every model, a fixed rate window."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$model", ".*")


QUERIES = _dashboard_queries()


def test_the_dashboard_has_queries() -> None:
    assert len(QUERIES) >= 15


@pytest.mark.parametrize(
    ("title", "expr", "legend"), QUERIES, ids=[f"{q[0]}:{q[2] or i}" for i, q in enumerate(QUERIES)]
)
def test_every_dashboard_query_returns_labelled_series(
    stack: tuple[LiveServer, Prom], title: str, expr: str, legend: str
) -> None:
    _srv, prom = stack
    result = prom.query(_instantiate(expr))
    if any(m in expr for m in GPU_ONLY):
        assert result == [], "GPU memory series on a CPU-only server"
        return
    assert result, f"{title}: {expr} returned nothing"
    wanted = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    for s in result:
        labels, value = s["metric"], float(s["value"][1])
        assert math.isfinite(value), f"{title}: {expr} = {value} for {labels}"
        for name in wanted:
            assert labels.get(name), f"{title}: legend uses {{{{{name}}}}} but {labels} lacks it"
        if "model" in wanted:
            assert labels["model"] == "fake"
        if "pod" in wanted:
            assert labels["pod"] == POD


def test_the_model_variable_lists_the_served_model(stack: tuple[LiveServer, Prom]) -> None:
    dash = json.loads(DASHBOARD.read_text())
    (var,) = [v for v in dash["templating"]["list"] if v["name"] == "model"]
    m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
    assert m, var["definition"]
    assert stack[1].label_values(m.group(2), m.group(1)) == ["fake"]


def test_the_adapter_rule_gives_the_hpa_its_per_pod_queue_depth(stack: tuple[LiveServer, Prom]) -> None:
    """seriesQuery finds the series by namespace and pod; metricsQuery, as the adapter renders it for the
    HPA (group by pod), returns the admitted tiles of that pod."""
    srv, prom = stack
    yaml = need_module("yaml")
    (rule,) = [
        r
        for r in yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
        if _named(r, "gendr_queue_depth_tiles")
    ]
    found = prom.series(rule["seriesQuery"])
    assert found and all(s["namespace"] == NAMESPACE and s["pod"] == POD for s in found)
    srv.hold()
    try:
        r = httpx.post(f"{srv.url}/v1/jobs?scale=1", content=png(120), timeout=30)
        assert r.status_code == 202 and r.json()["tiles"]["total"] == QUEUED_TILES
        query = _rendered(rule)

        def queued() -> bool:
            got = prom.query(query)
            return bool(got) and float(got[0]["value"][1]) == QUEUED_TILES

        srv.wait_for(queued, f"{query} never showed the queued tiles")
        (only,) = prom.query(query)
        assert only["metric"] == {"pod": POD}
    finally:
        srv.release()


def _named(rule: dict[str, Any], name: str) -> bool:
    return rule["name"]["as"] == name


def _rendered(rule: dict[str, Any]) -> str:
    """The rule's metricsQuery as the adapter renders it for the HPA (grouped by pod, this pod)."""
    series = re.match(r"\^?(\w+)\$?", rule["name"]["matches"]).group(1)  # type: ignore[union-attr]
    return (
        rule["metricsQuery"]
        .replace("<<.GroupBy>>", "pod")
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{POD}"')
    )


def test_the_adapter_rule_gives_the_hpa_the_work_a_pod_refuses(stack: tuple[LiveServer, Prom]) -> None:
    """Requests refused 503 `overloaded` (queue full) show as a per-pod rate the HPA scales on."""
    srv, prom = stack
    yaml = need_module("yaml")
    rules = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    (rule,) = [r for r in rules if _named(r, "gendr_refused_requests_per_second")]
    query = _rendered(rule)
    srv.hold()
    try:
        queued = []
        while len(queued) * QUEUED_TILES <= 64:  # fill GENDR_QUEUE_CAPACITY_TILES with held jobs
            r = httpx.post(f"{srv.url}/v1/jobs?scale=1", content=png(120), timeout=30)
            if r.status_code != 202:
                break
            queued.append(r.json()["id"])
        first = prom.scrapes()
        refused = 0
        while prom.scrapes() < first + 4:  # refusals spread over several scrapes: rate() sees them
            r = httpx.post(f"{srv.url}/upscale?scale=1", content=png(120), timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
            refused += 1
            time.sleep(0.2)

        def seen() -> bool:
            got = prom.query(query)
            return bool(got) and float(got[0]["value"][1]) > 0

        srv.wait_for(seen, f"{query} never showed the refusals")
        (only,) = prom.query(query)
        assert only["metric"] == {"pod": POD} and refused >= 4
    finally:
        srv.release()
