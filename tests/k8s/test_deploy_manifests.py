"""k8s/: every overlay renders, validates against the Kubernetes schemas offline, and keeps the
invariants the deployment relies on (pod security, probes, GPU limits, drain budget, selectors)."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from deploy_helpers import (
    OVERLAYS,
    POOLS,
    SCHEMAS,
    VARIANTS,
    components_of,
    need_module,
    one,
    pod_templates,
    pool_of,
    selects,
)

# The slowest cold start (process start to /readyz 200) measured for docs/deploy.md, "Cold start": the
# default model on ONNX Runtime CPU, 2 loaded cores.
COLD_START_MEASURED_S = 379
# Oldest Kubernetes release we support, and the newest whose schemas kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", "latest")
# Everything deployed into a pool's namespace: the overlays as committed and with the optional
# components switched on.
POOL_SETS = [*OVERLAYS, *(v for v in VARIANTS if pool_of(v))]
# Custom resources validated against their vendored CRD (schemas/README.md): (apiVersion, kind) -> file.
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_triggerauthentications.yaml",
}


def _crd_schema(yaml_mod: Any, api_version: str, kind: str) -> dict[str, Any]:
    """A CRD's openAPIV3Schema for one served version (vendored, see schemas/README.md), tightened
    so an unknown field is an error rather than silently pruned."""
    crd = yaml_mod.safe_load((SCHEMAS / CRDS[(api_version, kind)]).read_text())
    assert crd["spec"]["group"] == api_version.split("/")[0] and crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == api_version.split("/")[1]]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def tighten(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                tighten(v)
        elif isinstance(node, list):
            for v in node:
                tighten(v)

    tighten(schema["properties"]["spec"])
    return schema


@pytest.mark.parametrize("overlay", [*OVERLAYS, "base", "upload", *VARIANTS])
def test_schemas(overlay: str, rendered: dict[str, list[dict[str, Any]]], yaml_mod: Any) -> None:
    kv = need_module("kubernetes_validate")
    jsonschema = need_module("jsonschema")
    errors = []
    for obj in rendered[overlay]:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            schema = _crd_schema(yaml_mod, obj["apiVersion"], obj["kind"])
            for e in jsonschema.Draft7Validator(schema).iter_errors(obj):
                errors.append(f"{where}: {'/'.join(map(str, e.absolute_path))}: {e.message}")
            continue
        for version in K8S_VERSIONS:
            v = kv.latest_version() if version == "latest" else version
            try:
                kv.validate(obj, v, strict=True)
            except kv.ValidationError as e:
                errors.append(f"{where} (k8s {v}): {'/'.join(map(str, e.path))}: {e.message}")
            except kv.SchemaNotFoundError as e:
                errors.append(f"{where} (k8s {v}): {e.message}")
    assert not errors, "\n".join(errors)


def test_every_overlay_has_the_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    want = {
        ("StatefulSet", "apps/v1"),  # Redis, the shared job store (components/redis)
        ("Namespace", "v1"),
        ("ServiceAccount", "v1"),
        ("ConfigMap", "v1"),
        ("PersistentVolumeClaim", "v1"),
        ("Deployment", "apps/v1"),
        ("Service", "v1"),
        ("PodDisruptionBudget", "policy/v1"),
        ("NetworkPolicy", "networking.k8s.io/v1"),
        ("HorizontalPodAutoscaler", "autoscaling/v2"),
        ("ServiceMonitor", "monitoring.coreos.com/v1"),
        ("Job", "batch/v1"),
    }
    for overlay in OVERLAYS:
        have = {(o["kind"], o["apiVersion"]) for o in rendered[overlay]}
        assert want <= have, f"{overlay}: missing {want - have}"
    # No Secret with data in the repository: API keys and the Redis password are only referenced.
    for name, objs in rendered.items():
        assert not [o for o in objs if o["kind"] == "Secret"], name


@pytest.mark.parametrize("overlay", POOL_SETS)
def test_namespace_and_pod_security_admission(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objs = rendered[overlay]
    ns = one(objs, "Namespace")
    assert ns["metadata"]["name"] == f"gendr-{pool_of(overlay)}"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == ns["metadata"]["name"], (
                f"{o['kind']}/{o['metadata']['name']}"
            )


def _check_restricted(where: str, spec: dict[str, Any]) -> None:
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True, where
    assert psc["runAsUser"] >= 10000 and psc.get("runAsGroup", 1) > 0, where
    assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
    assert spec["automountServiceAccountToken"] is False, where
    assert spec["enableServiceLinks"] is False, where  # no GENDR_PORT=tcp://... injected
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(host), where
    assert not [v for v in spec["volumes"] if "hostPath" in v], where
    tmp_volumes = {v["name"]: v for v in spec["volumes"] if "emptyDir" in v}
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc.get("privileged", False) is False, where
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
        assert sc.get("runAsNonRoot", True) is True, where
        # The read-only root needs a writable /tmp, bounded in size.
        (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp_volumes[tmp["name"]]["emptyDir"]["sizeLimit"], where
        image = c["image"]
        assert ":latest" not in image and re.search(r":[0-9][\w.-]*$|@sha256:", image), image


@pytest.mark.parametrize("overlay", [*POOL_SETS, "base", *(v for v in VARIANTS if not pool_of(v))])
def test_restricted_pod_security(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    templates = pod_templates(rendered[overlay])
    redis = {"StatefulSet"} if "redis" in components_of(overlay) else set()
    assert {o["kind"] for o, _ in templates} == {"Deployment", "Job"} | redis
    for owner, tpl in templates:
        _check_restricted(f"{overlay} {owner['kind']}/{owner['metadata']['name']}", tpl["spec"])


def test_upload_pod(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pod = one(rendered["upload"], "Pod")
    netpol = one(rendered["upload"], "NetworkPolicy")
    assert selects(netpol["spec"]["podSelector"], pod["metadata"]["labels"])
    assert not netpol["spec"].get("ingress") and not netpol["spec"].get("egress")
    _check_restricted("upload-pod.yaml", pod["spec"])
    for o in rendered["upload"]:
        assert "namespace" not in o["metadata"], "applied with -n into the pool's namespace"
    for overlay in OVERLAYS:
        pvc = one(rendered[overlay], "PersistentVolumeClaim")
        sa = one(rendered[overlay], "ServiceAccount")
        (claim,) = [
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert (
            claim == pvc["metadata"]["name"] and pod["spec"]["serviceAccountName"] == sa["metadata"]["name"]
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stage_labels(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    """docs/deploy.md applies the overlay in steps with `-l gendr.io/stage=...`: storage first (to
    upload the checkpoint), then the engine build, then everything."""
    objs = rendered[overlay]

    def stage(name: str) -> set[tuple[str, str]]:
        return {
            (o["kind"], o["metadata"]["name"])
            for o in objs
            if (o["metadata"].get("labels") or {}).get("gendr.io/stage") == name
        }

    assert stage("storage") == {
        ("Namespace", f"gendr-{overlay}"),
        ("ServiceAccount", "gendr"),
        ("PersistentVolumeClaim", "gendr-models"),
    }
    build = {("Job", "gendr-engine-build"), ("NetworkPolicy", "gendr-engine-build")}
    if "models-s3" in components_of(overlay):  # the Job reads where to push from this ConfigMap
        (source,) = [o for o in objs if o["metadata"]["name"].startswith("gendr-models-source")]
        build.add(("ConfigMap", source["metadata"]["name"]))
    assert stage("build") == build


@pytest.mark.parametrize("overlay", POOL_SETS)
def test_gpu_resources(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    for owner, tpl in pod_templates(rendered[overlay]):
        if owner["kind"] == "StatefulSet":
            # Redis: CPU and memory only, and it stays off the GPU nodes (no toleration of their taint).
            for c in tpl["spec"]["containers"]:
                res = c["resources"]
                assert not any("nvidia.com" in k for k in {**res["requests"], **res["limits"]})
                for k in ("cpu", "memory", "ephemeral-storage"):
                    assert k in res["requests"] and k in res["limits"], (owner["metadata"]["name"], k)
            assert not tpl["spec"].get("tolerations") and not tpl["spec"].get("nodeSelector")
            continue
        for c in tpl["spec"]["containers"]:
            res = c["resources"]
            assert int(res["limits"]["nvidia.com/gpu"]) == 1, owner["metadata"]["name"]
            # Extended resources: a request, where given, must equal the limit.
            assert int(res["requests"].get("nvidia.com/gpu", 1)) == 1
            for k in ("cpu", "memory", "ephemeral-storage"):
                assert k in res["requests"] and k in res["limits"], (owner["metadata"]["name"], k)
        tolerations = tpl["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def _container(objs: list[dict[str, Any]], kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    owner = one(objs, kind)
    (c,) = owner["spec"]["template"]["spec"]["containers"]
    return owner, c


def _config(objs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    (ref,) = [e["configMapRef"]["name"] for e in c["envFrom"]]
    return one(objs, "ConfigMap", ref)["data"]


def _seconds(probe: dict[str, Any]) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_drain_budget(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered[overlay]
    dep, c = _container(objs, "Deployment")
    args = c["args"]
    port = int(args[args.index("--port") + 1])
    assert args[args.index("--host") + 1] == "0.0.0.0"
    (http,) = [p for p in c["ports"] if p["name"] == "http"]
    assert http["containerPort"] == port

    for probe_name, path in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        probe = c[probe_name]["httpGet"]
        assert probe["path"] == path, probe_name
        assert probe["port"] in ("http", port), probe_name
    # Engine deserialisation + warm-up of several instances: at least 10 minutes of startup budget, and
    # twice the slowest cold start measured (docs/deploy.md, "Cold start"); liveness must not kill a
    # busy pod after one slow answer.
    assert _seconds(c["startupProbe"]) >= max(600, 2 * COLD_START_MEASURED_S)
    assert _seconds(c["livenessProbe"]) >= 30
    assert c["livenessProbe"]["timeoutSeconds"] >= 3

    # SIGTERM arrives after preStop; then the server drains for GENDR_DRAIN_TIMEOUT_S. Both must fit
    # in the grace period, with margin, or the kubelet SIGKILLs in-flight requests.
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep"
    pre_stop = int(cmd[1])
    assert pre_stop >= 5
    drain = float(_config(objs, c)["GENDR_DRAIN_TIMEOUT_S"])
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + drain + 10, (grace, pre_stop, drain)

    # HPA owns the replica count.
    assert "replicas" not in dep["spec"]
    # A rollout never needs a GPU beyond maxReplicas (a surge pod at maximum scale stays Pending): it
    # replaces one pod at a time (docs/deploy.md, "Rollouts").
    rolling = dep["spec"]["strategy"]["rollingUpdate"]
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (0, 1)


@pytest.mark.parametrize("overlay", POOL_SETS)
def test_labels_and_selectors(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered[overlay]
    dep = one(objs, "Deployment")
    job = one(objs, "Job")
    server_pod = dep["spec"]["template"]["metadata"]["labels"]
    build_pod = job["spec"]["template"]["metadata"]["labels"]
    assert server_pod["gendr.io/pool"] == pool_of(overlay) == build_pod["gendr.io/pool"]
    assert selects(dep["spec"]["selector"], server_pod)

    svc = one(objs, "Service", "gendr")
    assert selects({"matchLabels": svc["spec"]["selector"]}, server_pod)
    assert not selects({"matchLabels": svc["spec"]["selector"]}, build_pod), (
        "Service must not route to the build Job"
    )
    container_ports = {
        p["name"]: p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for p in svc_ports.values():
        assert p["targetPort"] in container_ports or p["targetPort"] in container_ports.values()

    pdb = one(objs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], server_pod) and not selects(pdb["spec"]["selector"], build_pod)
    assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"]

    policies = {o["metadata"]["name"]: o for o in objs if o["kind"] == "NetworkPolicy"}
    covering_server = [n for n, p in policies.items() if selects(p["spec"]["podSelector"], server_pod)]
    covering_build = [n for n, p in policies.items() if selects(p["spec"]["podSelector"], build_pod)]
    assert covering_server == ["gendr"] and covering_build == ["gendr-engine-build"]
    # Redis: its own policy only; the server's Service, PDB and policy never pick its pod.
    redis_pod = one(objs, "StatefulSet", "gendr-redis")["spec"]["template"]["metadata"]["labels"]
    assert [n for n, p in policies.items() if selects(p["spec"]["podSelector"], redis_pod)] == ["gendr-redis"]
    for selector in (svc["spec"]["selector"], pdb["spec"]["selector"].get("matchLabels", {})):
        assert not selects({"matchLabels": selector}, redis_pod)
    server_np = policies["gendr"]
    assert set(server_np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for rule in server_np["spec"]["ingress"]:
        assert [p["port"] for p in rule["ports"]] in (["http"], [container_ports["http"]])
    # The build Job never listens; it talks only to object storage (DNS + HTTPS) when it pushes there.
    build_np = policies["gendr-engine-build"]
    assert set(build_np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not build_np["spec"].get("ingress")
    if "models-s3" in components_of(overlay):
        ports = [sorted({p["port"] for p in r["ports"]}) for r in build_np["spec"]["egress"]]
        assert ports == [[53], [443]], ports
    else:
        assert not build_np["spec"].get("egress")

    sm = one(objs, "ServiceMonitor")
    scraped = [
        o["metadata"]["name"]
        for o in objs
        if o["kind"] == "Service" and selects(sm["spec"]["selector"], o["metadata"]["labels"])
    ]
    assert scraped == [svc["metadata"]["name"]], scraped
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports and ep["path"] == "/metrics"

    # Exactly one autoscaler owns the Deployment: our HPA, or KEDA's ScaledObject (which makes its own).
    scalers = [o for o in objs if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert [o["kind"] for o in scalers] == (
        ["ScaledObject"] if "keda" in components_of(overlay) else ["HorizontalPodAutoscaler"]
    )
    ref = scalers[0]["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])

    sa = one(objs, "ServiceAccount")
    for _, tpl in pod_templates(objs):
        assert tpl["spec"]["serviceAccountName"] == sa["metadata"]["name"]


@pytest.mark.parametrize("overlay", [o for o in POOL_SETS if "keda" not in components_of(o)])
def test_autoscaling(
    overlay: str,
    rendered: dict[str, list[dict[str, Any]]],
    adapter_rule: dict[str, Any],
    adapter_external_rule: dict[str, Any],
    adapter_refused_rule: dict[str, Any],
) -> None:
    hpa = one(rendered[overlay], "HorizontalPodAutoscaler")
    spec = hpa["spec"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    # With a PDB of maxUnavailable 1, two replicas keep serving through a node drain.
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]
    # Per pod: tiles admitted on it. With the shared job store also the global job backlog, in
    # tiles too, over the replica count, with the same target (jobs wait in Redis, not on a pod).
    # And per pod the work it refused (503 overloaded per second; docs/deploy.md, "What the autoscaler
    # sees"), from the adapter's rule on the request error counter.
    pods = {m["pods"]["metric"]["name"]: m for m in spec["metrics"] if m["type"] == "Pods"}
    metric = pods.pop(adapter_rule["name"]["as"])
    (refused,) = pods.values()
    assert refused["pods"]["metric"]["name"] == adapter_refused_rule["name"]["as"]
    assert refused["pods"]["target"]["type"] == "AverageValue"
    assert 0 < _quantity(refused["pods"]["target"]["averageValue"]) <= 1, "any sustained refusal scales up"
    external = [m for m in spec["metrics"] if m["type"] == "External"]
    assert len(spec["metrics"]) == 2 + len(external)
    if "redis" in components_of(overlay):
        (backlog,) = external
        assert backlog["external"]["metric"]["name"] == adapter_external_rule["name"]["as"]
        assert backlog["external"]["target"] == metric["pods"]["target"]
    else:
        assert not external, "gendr_jobs_backlog_tiles comes from Redis: no such metric without it"
    assert metric["pods"]["metric"]["name"] == adapter_rule["name"]["as"], "HPA metric must be the adapter's"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    target = float(metric["pods"]["target"]["averageValue"])
    assert target > 0
    # A pod must admit several HPA targets' worth of tiles before it answers 503, or clients see
    # errors before the autoscaler has even asked for a pod.
    _, c = _container(rendered[overlay], "Deployment")
    assert int(_config(rendered[overlay], c)["GENDR_QUEUE_CAPACITY_TILES"]) >= 4 * target
    assert spec["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pool_settings_and_engine_build(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    objs = rendered[overlay]
    pool = POOLS[overlay]
    dep, server = _container(objs, "Deployment")
    job, build = _container(objs, "Job")
    cfg = _config(objs, server)

    # The engine the Job builds is the one the server asks for, for the GPU the pods land on.
    precision = cfg["GENDR_PRECISION"]
    assert precision in pool["precisions"], f"{overlay} cannot run {precision}"
    job_env = {e["name"]: e.get("value") for e in build["env"]}
    assert job_env["PRECISION"] == precision
    assert job_env["TARGET_GPU"] == pool["target_gpu"]
    assert job_env["MODEL"] == cfg["GENDR_DEFAULT_MODEL"]
    assert cfg["GENDR_BACKEND"] == "tensorrt"
    # The same nodes (tests/k8s/test_deploy_gpu_nodes.py checks which, against real node labels).
    dep_spec, job_spec = dep["spec"]["template"]["spec"], job["spec"]["template"]["spec"]
    assert "nodeSelector" not in dep_spec and "nodeSelector" not in job_spec
    assert dep_spec["affinity"]["nodeAffinity"] == job_spec["affinity"]["nodeAffinity"]
    script = "\n".join(build["command"] + build["args"])
    assert (
        "gendr-build engine" in script
        and '--precision "$PRECISION"' in script
        and '--gpu "$TARGET_GPU"' in script
    )

    # The Job builds on the claim (its workspace) in both storage modes; the server reads the
    # repository at GENDR_MODEL_REPOSITORY, read-only: the same claim (models-pvc) or what its init
    # container pulled (models-s3, tests/k8s/test_deploy_model_storage.py).
    pvc = one(objs, "PersistentVolumeClaim")
    job_claim, job_mount = claim_mount(job, build)
    assert job_claim["claimName"] == pvc["metadata"]["name"]
    assert not job_mount.get("readOnly") and not job_claim.get("readOnly")
    (srv_mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == cfg["GENDR_MODEL_REPOSITORY"]]
    assert srv_mount["readOnly"] is True

    # API keys only by reference to a Secret.
    (keys,) = [e for e in server["env"] if e["name"] == "GENDR_API_KEYS"]
    assert "value" not in keys and keys["valueFrom"]["secretKeyRef"]["name"] == "gendr-api-keys"


def claim_mount(owner: dict[str, Any], c: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the PersistentVolumeClaim volume source, its mount) of a container."""
    vols = {
        v["name"]: v for v in owner["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v
    }
    (m,) = [m for m in c["volumeMounts"] if m["name"] in vols]
    return vols[m["name"]]["persistentVolumeClaim"], m


def _quantity(v: str | int | float) -> float:
    s = str(v)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def test_overlays_differ_where_pools_differ(rendered: dict[str, list[dict[str, Any]]]) -> None:
    cfgs = {o: _config(rendered[o], _container(rendered[o], "Deployment")[1]) for o in OVERLAYS}
    assert cfgs["a10"]["GENDR_PRECISION"] != "fp8"  # Ampere has no fp8 tensor cores
    assert int(cfgs["l20"]["GENDR_INSTANCES_PER_DEVICE"]) >= int(cfgs["a10"]["GENDR_INSTANCES_PER_DEVICE"])


def test_checkov_skips_are_justified(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in rendered:
        for o in rendered[overlay]:
            for k, v in (o["metadata"].get("annotations") or {}).items():
                if k.startswith("checkov.io/skip"):
                    check, _, reason = v.partition("=")
                    assert re.fullmatch(r"CKV2?_K8S_\d+", check), v
                    assert len(reason.split()) >= 6, f"{o['kind']}/{o['metadata']['name']}: justify {check}"
