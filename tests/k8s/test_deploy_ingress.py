"""The ingress-nginx example (component ingress-nginx) against the service's own limits: nginx must not
refuse a body the service accepts, give up on a request before its deadline, or reuse a connection the
service is closing; and the prefix it strips is the root path the service puts back into its URLs."""

from __future__ import annotations

import re
from typing import Any

import pytest
from deploy_helpers import VARIANTS, components_of, one

from service.settings import Settings

SETS = [v for v in VARIANTS if "ingress-nginx" in components_of(v)]
NGINX = "nginx.ingress.kubernetes.io/"
# ingress-nginx's controller default `upstream-keepalive-timeout` (and AWS ALB's idle timeout): 60 s.
PROXY_IDLE_S = 60


def _setting(cfg: dict[str, str], name: str) -> Any:
    """A setting as the server will read it: the ConfigMap's value, else the default."""
    env = f"GENDR_{name.upper()}"
    field = Settings.model_fields[name]
    return type(field.default)(cfg[env]) if env in cfg else field.default


def _nginx_size(v: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", v)
    assert m, v
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def _rewrite(path_regex: str, target: str, path: str) -> str | None:
    """nginx's `rewrite` as ingress-nginx writes it for use-regex: the location regex, $n groups."""
    m = re.match(path_regex, path)
    if not m:
        return None
    return re.sub(r"\$(\d)", lambda g: m.group(int(g.group(1))) or "", target)


@pytest.mark.parametrize("name", SETS)
def test_the_ingress_fits_the_service(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered[name]
    ing = one(objs, "Ingress", "gendr")
    dep = one(objs, "Deployment", "gendr")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    (ref,) = [e["configMapRef"]["name"] for e in c["envFrom"]]
    cfg = one(objs, "ConfigMap", ref)["data"]
    notes = ing["metadata"]["annotations"]
    assert ing["spec"]["ingressClassName"] == "nginx"

    # Bodies: nginx's limit above ours, so the client gets our JSON 413, not nginx's HTML one.
    assert _nginx_size(notes[NGINX + "proxy-body-size"]) > _setting(cfg, "max_body_bytes")
    # Time: nginx waits longer than the longest deadline a client may ask for (the service answers 504).
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[NGINX + key]) > _setting(cfg, "max_deadline_s"), key
    # Idle pooled connections: nginx closes them before we do.
    assert _setting(cfg, "keep_alive_timeout_s") > PROXY_IDLE_S

    # The prefix nginx strips is the root path the server writes into Location, result_url, the page.
    root = _setting(cfg, "root_path")
    assert root == "/gendr"
    assert notes[NGINX + "use-regex"] == "true"
    (rule,) = ing["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["pathType"] == "ImplementationSpecific"
    target = notes[NGINX + "rewrite-target"]
    for public, upstream in (
        (root, "/"),
        (root + "/", "/"),
        (root + "/v1/jobs/abc", "/v1/jobs/abc"),
        (root + "/static/app.js", "/static/app.js"),
        (root + "x/v1/models", None),
        ("/v1/models", None),
    ):
        got = _rewrite(path["path"] + "$", target, public)
        assert (None if got is None else "/" + got.lstrip("/")) == upstream, public
    svc = one(objs, "Service", path["backend"]["service"]["name"])
    assert path["backend"]["service"]["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    assert rule["host"] in ing["spec"]["tls"][0]["hosts"]


def test_the_keep_alive_default_outlasts_proxies() -> None:
    assert Settings.model_fields["keep_alive_timeout_s"].default > PROXY_IDLE_S
