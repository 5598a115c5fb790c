"""The shared job store on Kubernetes and in compose (issue 23): the Redis component, its wiring into
the server, KEDA as the alternative autoscaler, the jobs' egress, and the pod temp folder sized to
what the embedded job store may keep there. Every rendered combination (deploy_helpers.VARIANTS)
is checked; the Redis configuration and start script also run against a real `redis-server`."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from deploy_helpers import (
    OVERLAY_COMPONENTS,
    OVERLAYS,
    REPO,
    VARIANTS,
    components_of,
    find_tool,
    missing,
    one,
    pool_of,
    selects,
)

from service.settings import Settings

ALL_SETS = [*OVERLAYS, "base", *VARIANTS]
REDIS_SETS = [n for n in ALL_SETS if "redis" in components_of(n)]
KEDA_SETS = [n for n in ALL_SETS if "keda" in components_of(n)]
POOL_SETS = [n for n in ALL_SETS if pool_of(n)]
SECRET, SECRET_KEY = "gendr-redis", "password"
STREAM_GROUP = "gendr-workers"  # the consumer group the job layer reads with (docs/deploy.md)
MiB, GiB = 1024**2, 1024**3
# Room the temp folder keeps beyond the stored results: a result written before older ones expire,
# the records, caches under HOME=/tmp. A 16 MP output as 8-bit RGBA is 64 MiB; keep 8 of those.
TMP_HEADROOM = 512 * MiB
# Redis memory beyond the job bytes budget: streams, records, idempotency keys, client buffers.
REDIS_HEADROOM = 512 * MiB


# --- small parsers ---------------------------------------------------------------------------------


def quantity(q: str | int) -> float:
    """A Kubernetes resource quantity ("3Gi", "500m", "64Mi", "2") as a number."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    assert m, q
    units = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    units |= {"Ki": 1024, "Mi": MiB, "Gi": GiB, "Ti": 1024**4}
    return float(m.group(1)) * units[m.group(2)]


def redis_bytes(v: str) -> int:
    """redis.conf memory units: 1k = 1000, 1kb = 1024, ... (redis.conf's own header)."""
    m = re.fullmatch(r"(\d+)(k|kb|m|mb|g|gb)?", v.lower())
    assert m, v
    units = {None: 1, "k": 1000, "kb": 1024, "m": 10**6, "mb": MiB, "g": 10**9, "gb": GiB}
    return int(m.group(1)) * units[m.group(2)]


def parse_redis_conf(text: str) -> dict[str, list[str]]:
    """Directive -> arguments (the last one wins, as in Redis), quotes removed."""
    conf: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, *args = shlex.split(line)
            conf[name.lower()] = args
    return conf


def config(objs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env |= one(objs, "ConfigMap", src["configMapRef"]["name"])["data"]
    env |= {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return env


def server(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    dep = one(objs, "Deployment", "gendr")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, c


def redis(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    sts = one(objs, "StatefulSet", "gendr-redis")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    return sts, c


def redis_conf(objs: list[dict[str, Any]]) -> dict[str, list[str]]:
    sts, _ = redis(objs)
    (vol,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    return parse_redis_conf(one(objs, "ConfigMap", vol["configMap"]["name"])["data"]["redis.conf"])


def secret_file(pod_spec: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) that the file at `path` in the container comes from."""
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    for m in container["volumeMounts"]:
        prefix = m["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and "secret" in volumes[m["name"]]:
            assert m.get("readOnly") is True, m
            secret = volumes[m["name"]]["secret"]
            (item,) = [i for i in secret["items"] if i["path"] == path[len(prefix) :]]
            # Readable by the pod's group only (fsGroup), never by others.
            assert secret.get("defaultMode", 0o644) & 0o007 == 0, secret
            return secret["secretName"], item["key"]
    raise AssertionError(f"{path} is not in a mounted Secret")


# --- the overlays as committed ---------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_use_the_shared_store(overlay: str, yaml_mod: Any) -> None:
    """Both overlays list the redis component; keda and job-egress are there to uncomment (the
    steps docs/deploy.md gives), and their pool numbers apply only where their objects exist."""
    path = REPO / "k8s" / "overlays" / overlay / "kustomization.yaml"
    kust = yaml_mod.safe_load(path.read_text())
    assert tuple(c.rsplit("/", 1)[1] for c in kust["components"]) == OVERLAY_COMPONENTS
    text = path.read_text()
    for optional in ("keda", "job-egress", "ingress-nginx"):
        assert f"# - ../../components/{optional}\n" in text
    assert "# - ../../components/models-pvc" in text  # the other storage mode
    targeted = {p["path"]: p.get("target") for p in kust["patches"] if "path" in p}
    assert targeted["hpa-patch.yaml"] == {"kind": "HorizontalPodAutoscaler", "name": "gendr"}
    assert targeted["keda-patch.yaml"] == {"kind": "ScaledObject", "name": "gendr"}


@pytest.mark.parametrize("name", POOL_SETS)
def test_several_replicas_need_the_shared_store(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The bug of issue 23: more than one replica on the embedded store loses jobs."""
    objs = rendered[name]
    scalers = [o for o in objs if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    most = max(o["spec"].get("maxReplicas", o["spec"].get("maxReplicaCount", 1)) for o in scalers)
    if most > 1:
        assert config(objs, server(objs)[1]).get("GENDR_REDIS_URL"), f"{name}: {most} replicas, no Redis"


# --- Redis -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REDIS_SETS)
def test_redis_durable_and_never_evicting(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered[name]
    sts, c = redis(objs)
    conf = redis_conf(objs)
    assert conf["appendonly"] == ["yes"] and conf["appendfsync"] == ["everysec"]
    # An evicted stream entry is a lost job.
    assert conf["maxmemory-policy"] == ["noeviction"]
    maxmemory = redis_bytes(conf["maxmemory"][0])
    assert maxmemory > 0
    # An AOF rewrite forks: copy-on-write needs room beside maxmemory within the memory limit.
    limit = quantity(c["resources"]["limits"]["memory"])
    assert maxmemory <= 0.6 * limit, (maxmemory, limit)
    assert quantity(c["resources"]["requests"]["memory"]) == limit
    assert conf["dir"] == ["/data"] and conf.get("save") == [""]

    # One primary, its data on its own claim mounted at `dir`.
    assert sts["spec"]["replicas"] == 1
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # The AOF holds up to ~2x the dataset before a rewrite, and a new base during one.
    assert quantity(claim["spec"]["resources"]["requests"]["storage"]) >= 4 * maxmemory
    (data,) = [m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert data["mountPath"] == "/data" and not data.get("readOnly")
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }

    image = c["image"]
    assert re.fullmatch(
        r"(docker\.io/)?(library/)?(redis|valkey/valkey):\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image
    ), image
    for probe in ("readinessProbe", "livenessProbe"):
        cmd = " ".join(c[probe]["exec"]["command"])
        assert "redis-cli" in cmd and "ping" in cmd and "REDISCLI_AUTH" in cmd, probe


@pytest.mark.parametrize("name", REDIS_SETS)
def test_redis_password_only_from_the_secret(
    name: str, rendered: dict[str, list[dict[str, Any]]], rendered_text: dict[str, str]
) -> None:
    objs = rendered[name]
    sts, c = redis(objs)
    spec = sts["spec"]["template"]["spec"]
    script = "\n".join(c["command"] + c["args"])
    # The script reads the file and writes `requirepass` into a config file, never an argument.
    (path,) = set(re.findall(r"cat (/\S+)\)", script))
    assert secret_file(spec, c, path) == (SECRET, SECRET_KEY)
    assert re.search(r"requirepass %s\\n' \"\$pw\" > /tmp/", script)
    assert re.search(r"exec redis-server /tmp/\S+\.conf\s*$", script)
    assert "--requirepass" not in script and "masterauth" not in script
    for probe in ("readinessProbe", "livenessProbe"):
        assert f"$(cat {path})" in " ".join(c[probe]["exec"]["command"])
    assert "requirepass" not in redis_conf(objs) and not c.get("env") and not c.get("envFrom")
    # No password anywhere in the rendered text: every `requirepass` is the script's placeholder.
    assert re.findall(r"requirepass\s+(\S+)", rendered_text[name]) == ["%s\\n'"]


@pytest.mark.parametrize("name", REDIS_SETS)
def test_redis_reachable_only_by_the_servers(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered[name]
    sts, c = redis(objs)
    redis_pod = sts["spec"]["template"]["metadata"]["labels"]
    server_pod = server(objs)[0]["spec"]["template"]["metadata"]["labels"]
    build_pod = one(objs, "Job")["spec"]["template"]["metadata"]["labels"]
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == "redis"]
    assert port == 6379

    (policy,) = [
        o for o in objs if o["kind"] == "NetworkPolicy" and selects(o["spec"]["podSelector"], redis_pod)
    ]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"} and not policy["spec"].get("egress")
    keda_peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "keda-operator"}},
    }
    peers = []
    for rule in policy["spec"]["ingress"]:
        assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
        peers += rule["from"]
    servers = [p for p in peers if "namespaceSelector" not in p]
    assert servers and all(selects(p["podSelector"], server_pod) for p in servers)
    assert not any(selects(p["podSelector"], build_pod) for p in servers)
    others = [p for p in peers if "namespaceSelector" in p]
    assert others == ([keda_peer] if "keda" in components_of(name) else [])

    # The server may reach it: an egress rule to exactly the Redis pods (this namespace) on its port.
    server_policy = one(objs, "NetworkPolicy", "gendr")
    to_redis = [r for r in server_policy["spec"]["egress"] if {p["port"] for p in r["ports"]} == {port}]
    (rule,) = to_redis
    assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
    assert rule["to"] and all(
        set(p) == {"podSelector"} and selects(p["podSelector"], redis_pod) for p in rule["to"]
    )
    assert not any(selects(p["podSelector"], server_pod) for p in rule["to"])


@pytest.mark.parametrize("name", REDIS_SETS)
def test_server_wired_to_redis(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered[name]
    dep, c = server(objs)
    cfg = config(objs, c)
    url = urlsplit(cfg["GENDR_REDIS_URL"])
    svc = one(objs, "Service", url.hostname)
    sts, _ = redis(objs)
    assert url.scheme == "redis" and not url.password, "the password comes from the file, not the URL"
    assert selects({"matchLabels": svc["spec"]["selector"]}, sts["spec"]["template"]["metadata"]["labels"])
    assert svc["spec"].get("clusterIP") != "None", "a stable virtual IP for the clients"
    assert url.port in [p["port"] for p in svc["spec"]["ports"]]
    assert url.path in ("", "/0")
    assert secret_file(dep["spec"]["template"]["spec"], c, cfg["GENDR_REDIS_PASSWORD_FILE"]) == (
        SECRET,
        SECRET_KEY,
    )
    assert sts["spec"]["serviceName"] in [o["metadata"]["name"] for o in objs if o["kind"] == "Service"]


# --- KEDA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", KEDA_SETS)
def test_keda_scales_on_the_job_stream(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered[name]
    so = one(objs, "ScaledObject", "gendr")
    dep, c = server(objs)
    cfg = config(objs, c)
    spec = so["spec"]
    ref = spec["scaleTargetRef"]
    assert (ref.get("apiVersion"), ref.get("kind"), ref["name"]) == (
        "apps/v1",
        "Deployment",
        dep["metadata"]["name"],
    )
    assert not [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"], "KEDA makes its own HPA"

    # One stream per model, `<prefix>:jobs:<model>`, read by the group gendr-workers: a lag trigger
    # (jobs no replica has taken) and a pending trigger (jobs running) for each.
    prefix = cfg.get("GENDR_REDIS_PREFIX", Settings.model_fields["redis_prefix"].default)
    models = json.loads(cfg["GENDR_MODELS"])
    ns = dep["metadata"]["namespace"]
    assert one(objs, "StatefulSet", "gendr-redis")["metadata"]["namespace"] == ns
    url = urlsplit(cfg["GENDR_REDIS_URL"])
    auth = one(objs, "TriggerAuthentication", so["spec"]["triggers"][0]["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": SECRET, "key": SECRET_KEY}]
    kinds: dict[str, set[str]] = {}
    for t in spec["triggers"]:
        md = t["metadata"]
        assert t["type"] == "redis-streams" and md["consumerGroup"] == STREAM_GROUP
        assert t["authenticationRef"]["name"] == auth["metadata"]["name"]
        # KEDA's operator connects from its own namespace: the Service's full name, the URL's port.
        assert md["address"] == f"{url.hostname}.{ns}.svc:{url.port}"
        assert "enableTLS" not in md and url.scheme == "redis"
        (kind,) = {"lagCount", "pendingEntriesCount"} & set(md)
        assert int(md[kind]) >= 1
        kinds.setdefault(md["stream"], set()).add(kind)
    assert kinds == {f"{prefix}:jobs:{m}": {"lagCount", "pendingEntriesCount"} for m in models}

    # The HPA's floor, ceiling and pace, so switching autoscalers changes the signal only.
    assert spec["minReplicaCount"] >= 2 and spec["fallback"]["replicas"] >= spec["minReplicaCount"]
    base_hpa = one(rendered["base"], "HorizontalPodAutoscaler")
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == base_hpa["spec"]["behavior"]
    pool = pool_of(name)
    if pool:
        hpa = one(rendered[pool], "HorizontalPodAutoscaler")
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (
            hpa["spec"]["minReplicas"],
            hpa["spec"]["maxReplicas"],
        )


# --- jobs' egress ----------------------------------------------------------------------------------

INTERNAL = ["10.1.2.3", "172.16.0.1", "192.168.1.1", "127.0.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0"]
INTERNAL += ["::1", "fe80::1", "fd00:ec2::254", "::ffff:10.0.0.1", "::ffff:169.254.169.254"]
PUBLIC = ["8.8.8.8", "52.216.0.1", "2606:4700::1111"]


def _ip_allowed(rule: dict[str, Any], ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    for peer in rule["to"]:
        block = peer["ipBlock"]
        net = ipaddress.ip_network(block["cidr"])
        if addr.version == net.version and addr in net:
            if not any(addr in ipaddress.ip_network(e) for e in block.get("except", [])):
                return True
    return False


@pytest.mark.parametrize("name", ALL_SETS)
def test_server_egress_is_a_setting(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """DNS always, Redis with the store, HTTPS to public addresses only with job-egress or models-s3
    (object storage; one rule each, the same addresses)."""
    policy = one(rendered[name], "NetworkPolicy", "gendr")
    rules = policy["spec"]["egress"]
    dns = [r for r in rules if {p["port"] for p in r["ports"]} == {53}]
    https = [r for r in rules if any("ipBlock" in p for p in r["to"])]
    to_redis = [r for r in rules if [p["port"] for p in r["ports"]] == [6379]]
    assert len(dns) == 1 and len(to_redis) == ("redis" in components_of(name))
    assert len(rules) == len(dns) + len(https) + len(to_redis)
    opened_by = [c for c in ("job-egress", "models-s3") if c in components_of(name)]
    assert len(https) == len(opened_by), (name, https)
    for rule in https:
        assert rule["ports"] == [{"port": 443, "protocol": "TCP"}]
        for ip in INTERNAL:
            assert not _ip_allowed(rule, ip), f"egress to {ip} (private, loopback, link-local or metadata)"
        for ip in PUBLIC:
            assert _ip_allowed(rule, ip), ip


# --- the pod temp folder holds what the embedded job store keeps ----------------------------------


def _jobs_max_bytes(cfg: dict[str, str]) -> int:
    return int(cfg.get("GENDR_JOBS_MAX_BYTES", Settings.model_fields["jobs_max_bytes"].default))


@pytest.mark.parametrize("name", ALL_SETS)
def test_tmp_fits_the_job_results(name: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered[name]
    dep, c = server(objs)
    cfg = config(objs, c)
    assert "GENDR_JOBS_DIR" not in cfg, "results on /tmp: this check sizes that volume"
    cap = _jobs_max_bytes(cfg)
    (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
    (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == tmp["name"]]
    size = quantity(vol["emptyDir"]["sizeLimit"])
    # Beyond the sizeLimit the kubelet evicts the pod, and all its work with it.
    assert cap + TMP_HEADROOM <= size, (cap, size)
    # The emptyDir counts against the pod's ephemeral storage: within the limit, and requested.
    res = c["resources"]
    assert (
        size <= quantity(res["requests"]["ephemeral-storage"]) <= quantity(res["limits"]["ephemeral-storage"])
    )
    assert size + 256 * MiB <= quantity(res["limits"]["ephemeral-storage"]), "room for logs"
    if "redis" in components_of(name):
        # Inputs and results in Redis are bounded by the same budget: it fits under maxmemory.
        assert cap + REDIS_HEADROOM <= redis_bytes(redis_conf(objs)["maxmemory"][0])


# --- compose ---------------------------------------------------------------------------------------


def test_compose_redis(compose: dict[str, Any], rendered: dict[str, list[dict[str, Any]]]) -> None:
    services = compose["services"]
    r = services["redis"]
    assert "profiles" not in r, "starts with either server profile"
    assert "ports" not in r, "reachable on the compose network only"
    assert r["image"] == redis(rendered[OVERLAYS[0]])[1]["image"], "the same Redis as on Kubernetes"
    (conf,) = [v for v in r["volumes"] if isinstance(v, str) and v.endswith(":/etc/redis/redis.conf:ro")]
    assert conf.split(":")[0] == "./k8s/components/redis/redis.conf", "one redis.conf for both"
    assert (
        r["read_only"] is True and r["cap_drop"] == ["ALL"] and "no-new-privileges:true" in r["security_opt"]
    )
    script = "\n".join(r["command"])
    assert "requirepass %s" in script and "$$(cat /run/gendr-redis/password)" in script
    assert "exec redis-server /tmp/redis.conf" in script and "--requirepass" not in script
    assert "redis-data:/data" in r["volumes"] and "redis-secret:/run/gendr-redis:ro" in r["volumes"]
    assert "PONG" in " ".join(r["healthcheck"]["test"])
    secret = services["redis-secret"]
    assert (
        secret["network_mode"] == "none"
        and r["depends_on"]["redis-secret"]["condition"] == "service_completed_successfully"
    )
    assert "/dev/urandom" in "\n".join(secret["command"])

    redis_conf_text = (REPO / "k8s" / "components" / "redis" / "redis.conf").read_text()
    maxmemory = redis_bytes(parse_redis_conf(redis_conf_text)["maxmemory"][0])
    for name in ("gendr-gpu", "gendr-cpu"):
        svc = services[name]
        env = svc["environment"]
        url = urlsplit(env["GENDR_REDIS_URL"])
        assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
        (pw,) = [v for v in svc["volumes"] if isinstance(v, dict) and v.get("source") == "redis-secret"]
        assert pw["read_only"] is True and env["GENDR_REDIS_PASSWORD_FILE"].startswith(pw["target"] + "/")
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        # /tmp holds the embedded store's results should GENDR_REDIS_URL be unset; the same budget
        # fits in Redis.
        cap = int(env["GENDR_JOBS_MAX_BYTES"])
        (tmpfs,) = [t for t in svc["tmpfs"] if t.startswith("/tmp:")]
        size = re.search(r"size=(\d+)([kmg])", tmpfs)
        assert size, tmpfs
        tmp_bytes = int(size.group(1)) * {"k": 1024, "m": MiB, "g": GiB}[size.group(2)]
        assert cap + TMP_HEADROOM <= tmp_bytes and cap + REDIS_HEADROOM <= maxmemory


# --- the configuration and start script against a real redis-server -------------------------------


def _redis_cli(port: int, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    if password is not None:
        env["REDISCLI_AUTH"] = password
    return subprocess.run(
        ["redis-cli", "--no-auth-warning", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=10,
        env=env,
    )


def test_redis_start_script_and_probes_with_a_real_server(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The component's start script, redis.conf and probes, run as written (paths moved into a
    temp folder, another port) against Debian's redis-server."""
    exe, cli = find_tool("redis-server"), find_tool("redis-cli")
    if exe is None or cli is None:
        missing("redis-server and redis-cli (apt-get install redis-server)")
    from live_server import free_port

    objs = rendered[OVERLAYS[0]]
    sts, c = redis(objs)
    (vol,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    conf_text = one(objs, "ConfigMap", vol["configMap"]["name"])["data"]["redis.conf"]
    port = free_port()
    dirs = {name: tmp_path / name for name in ("secret", "etc", "tmp", "data")}
    for d in dirs.values():
        d.mkdir()
    moves = {
        "/var/run/secrets/gendr-redis": str(dirs["secret"]),
        "/etc/redis/": f"{dirs['etc']}/",
        "/tmp/": f"{dirs['tmp']}/",
        "-p 6379": f"-p {port}",
    }

    def move(text: str) -> str:  # one pass: the temp folder itself is under /tmp
        return re.sub("|".join(map(re.escape, moves)), lambda m: moves[m.group(0)], text)

    (dirs["etc"] / "redis.conf").write_text(
        conf_text.replace("port 6379", f"port {port}")
        .replace("dir /data", f"dir {dirs['data']}")
        .replace("bind * -::*", "bind 127.0.0.1")
    )
    script = move("\n".join(c["args"]))
    password = "0123456789abcdef0123456789abcdef"

    # A password outside the safe alphabet is refused before Redis starts.
    (dirs["secret"] / "password").write_text("bad pass\n")
    bad = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=10)
    assert bad.returncode != 0 and "openssl rand -hex 32" in bad.stderr

    (dirs["secret"] / "password").write_text(password + "\n")  # kubectl --from-file keeps a newline
    log = tmp_path / "redis.log"

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["/bin/sh", "-c", script], stdout=log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while _redis_cli(port, "ping", password=password).stdout.strip() != "PONG":
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        return proc

    proc = start()
    try:
        no_auth = _redis_cli(port, "ping")
        assert "NOAUTH" in no_auth.stdout + no_auth.stderr
        got = {}
        for key in (
            "appendonly",
            "appendfsync",
            "maxmemory-policy",
            "maxmemory",
            "save",
            "dir",
            "requirepass",
        ):
            out = _redis_cli(port, "config", "get", key, password=password).stdout.splitlines()
            got[key] = out[1] if len(out) > 1 else ""
        assert got["appendonly"] == "yes" and got["appendfsync"] == "everysec"
        assert got["maxmemory-policy"] == "noeviction" and got["save"] == ""
        assert int(got["maxmemory"]) == redis_bytes(parse_redis_conf(conf_text)["maxmemory"][0])
        assert got["requirepass"] == password and got["dir"] == str(dirs["data"])
        # The password is in a mode-600 file on the pod's /tmp and in no process argument.
        assert (dirs["tmp"] / "redis.conf").stat().st_mode & 0o077 == 0
        assert password not in Path(f"/proc/{proc.pid}/cmdline").read_text()
        # The probes pass as written, and fail with a wrong password.
        for probe in ("readinessProbe", "livenessProbe"):
            cmd = [move(x) for x in c[probe]["exec"]["command"]]
            assert subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0, probe
        (dirs["secret"] / "password").write_text("wrong")
        for probe in ("readinessProbe", "livenessProbe"):
            cmd = [move(x) for x in c[probe]["exec"]["command"]]
            assert subprocess.run(cmd, capture_output=True, timeout=10).returncode != 0, probe
        (dirs["secret"] / "password").write_text(password)

        # A queued job survives a restart of Redis: the AOF on the data volume brings it back.
        assert (
            _redis_cli(port, "xadd", "gendr:jobs:gendr", "*", "job", "j1", password=password).returncode == 0
        )
        proc.terminate()  # SIGTERM, as the kubelet sends
        assert proc.wait(timeout=15) == 0, log.read_text()
        proc = start()
        assert _redis_cli(port, "xlen", "gendr:jobs:gendr", password=password).stdout.strip() == "1"
    finally:
        proc.terminate()
        proc.wait(timeout=15)
