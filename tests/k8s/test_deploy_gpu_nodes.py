"""Where the pods land: every overlay's node affinity against the labels real GPU nodes carry (a node of
its pool is selected whatever labelled it; no other GPU is), and the rest of the scheduling the issue
asked to decide: tolerations of a dead node, spread over nodes, a rollout that needs no spare GPU."""

from __future__ import annotations

from typing import Any

import pytest
from deploy_helpers import OVERLAYS, VARIANTS, one, pool_of

POOL_SETS = [*OVERLAYS, *(v for v in VARIANTS if pool_of(v))]

# Node labels as providers and NVIDIA's GPU feature discovery (GFD) write them: (what, labels, pool).
# GFD: nvidia.com/gpu.product is NVML's device name with spaces as dashes, "-SHARED" appended under
# time-slicing, the MIG profile appended under MIG "single" strategy. EKS: node.kubernetes.io/instance-type
# always; Karpenter and EKS Auto Mode add instance-gpu-name (lower case). GKE: cloud.google.com/gke-
# accelerator (no A10 or L20 exists there). Alibaba ACK: aliyun.accelerator/nvidia_name.
EKS_G5 = {"node.kubernetes.io/instance-type": "g5.2xlarge", "eks.amazonaws.com/nodegroup": "gpu-a10g"}
NODES: list[tuple[str, dict[str, str], str | None]] = [
    ("EKS g5, GPU Operator (GFD)", {**EKS_G5, "nvidia.com/gpu.product": "NVIDIA-A10G"}, "a10"),
    ("EKS g5, device plugin only", EKS_G5, "a10"),
    ("EKS g5.12xlarge, 4 GPUs", {"node.kubernetes.io/instance-type": "g5.12xlarge"}, "a10"),
    (
        "EKS g5 from Karpenter",
        {
            "node.kubernetes.io/instance-type": "g5.xlarge",
            "karpenter.k8s.aws/instance-gpu-name": "a10g",
            "karpenter.k8s.aws/instance-gpu-manufacturer": "nvidia",
            "karpenter.k8s.aws/instance-gpu-memory": "24576",
        },
        "a10",
    ),
    (
        "EKS Auto Mode g5",
        {"node.kubernetes.io/instance-type": "g5.4xlarge", "eks.amazonaws.com/instance-gpu-name": "a10g"},
        "a10",
    ),
    (
        "on premises A10, GPU Operator",
        {
            "nvidia.com/gpu.product": "NVIDIA-A10",
            "nvidia.com/gpu.memory": "23028",
            "nvidia.com/gpu.count": "2",
        },
        "a10",
    ),
    ("Alibaba ACK gn7i (A10)", {"aliyun.accelerator/nvidia_name": "NVIDIA-A10"}, "a10"),
    ("on premises L20, GPU Operator", {"nvidia.com/gpu.product": "NVIDIA-L20"}, "l20"),
    ("Alibaba ACK L20", {"aliyun.accelerator/nvidia_name": "NVIDIA-L20"}, "l20"),
    # Not ours: other GPUs, among them the same architecture with other memory and speed.
    ("A10G time-sliced (shared with other pods)", {"nvidia.com/gpu.product": "NVIDIA-A10G-SHARED"}, None),
    ("EKS g6 (L4, sm_89 like the L20)", {"node.kubernetes.io/instance-type": "g6.xlarge"}, None),
    ("L4, GFD", {"nvidia.com/gpu.product": "NVIDIA-L4"}, None),
    ("L40S, GFD", {"nvidia.com/gpu.product": "NVIDIA-L40S"}, None),
    ("EKS g6e (L40S) from Karpenter", {"karpenter.k8s.aws/instance-gpu-name": "l40s"}, None),
    ("GKE g2 (L4)", {"cloud.google.com/gke-accelerator": "nvidia-l4"}, None),
    ("GKE a2 (A100 40 GB)", {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}, None),
    ("A100 MIG 1g.5gb", {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"}, None),
    ("EKS g4dn (T4)", {"node.kubernetes.io/instance-type": "g4dn.xlarge"}, None),
    ("H100 SXM, GFD", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, None),
    ("a CPU node", {"node.kubernetes.io/instance-type": "m6i.2xlarge", "kubernetes.io/os": "linux"}, None),
]


def _expr_matches(expr: dict[str, Any], labels: dict[str, str]) -> bool:
    key, op, values = expr["key"], expr["operator"], expr.get("values") or []
    have = labels.get(key)
    if op == "In":
        return have in values
    if op == "NotIn":
        return have not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt"):
        if have is None or not have.isdigit():
            return False
        return int(have) > int(values[0]) if op == "Gt" else int(have) < int(values[0])
    raise AssertionError(f"unknown operator {op}")


def schedulable_on(pod_spec: dict[str, Any], labels: dict[str, str]) -> bool:
    """The scheduler's node selection: nodeSelector AND (any nodeSelectorTerm: all its expressions)."""
    if any(labels.get(k) != v for k, v in (pod_spec.get("nodeSelector") or {}).items()):
        return False
    required = (
        pod_spec.get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution")
    )
    if not required:
        return True
    return any(
        all(_expr_matches(e, labels) for e in term.get("matchExpressions", []))
        and not term.get("matchFields")
        for term in required["nodeSelectorTerms"]
    )


def test_the_matcher_follows_the_scheduler() -> None:
    spec = {
        "nodeSelector": {"a": "1"},
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "b", "operator": "In", "values": ["x"]}]},
                        {"matchExpressions": [{"key": "c", "operator": "Gt", "values": ["10"]}]},
                    ]
                }
            }
        },
    }
    assert schedulable_on(spec, {"a": "1", "b": "x"}) and schedulable_on(spec, {"a": "1", "c": "11"})
    assert not schedulable_on(spec, {"a": "1", "c": "10"}) and not schedulable_on(spec, {"b": "x"})


@pytest.mark.parametrize("overlay", OVERLAYS)  # components leave the affinity alone (checked below)
@pytest.mark.parametrize(("what", "labels", "pool"), NODES, ids=[n[0] for n in NODES])
def test_pods_land_on_their_pool_only(
    overlay: str,
    what: str,
    labels: dict[str, str],
    pool: str | None,
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objs = rendered[overlay]
    for kind, name in (("Deployment", "gendr"), ("Job", "gendr-engine-build")):
        spec = one(objs, kind, name)["spec"]["template"]["spec"]
        want = pool == pool_of(overlay)
        assert schedulable_on(spec, labels) == want, f"{kind} of {overlay} on {what}: expected {want}"


def test_every_label_key_in_the_affinities_is_in_the_table(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A term whose key no real node in the table carries would go untested; every pool set of a pool
    selects the same nodes."""
    for name in POOL_SETS:
        for kind in ("Deployment", "Job"):
            affinity = one(rendered[name], kind)["spec"]["template"]["spec"]["affinity"]
            assert (
                affinity == one(rendered[pool_of(name)], "Deployment")["spec"]["template"]["spec"]["affinity"]
            )
    known = {k for _, labels, _ in NODES for k in labels}
    for overlay in OVERLAYS:
        spec = one(rendered[overlay], "Deployment", "gendr")["spec"]["template"]["spec"]
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        for term in terms:
            for e in term["matchExpressions"]:
                assert e["key"] in known, (overlay, e["key"])
        # and each term selects at least one node of the pool in the table on its own
        for term in terms:
            alone = {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
                    }
                }
            }
            assert any(schedulable_on(alone, labels) for _, labels, pool in NODES if pool == overlay), term


@pytest.mark.parametrize("overlay", POOL_SETS)
def test_a_dead_node_gives_its_pods_back_quickly(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    spec = one(rendered[overlay], "Deployment", "gendr")["spec"]["template"]["spec"]
    by_key = {t["key"]: t for t in spec["tolerations"]}
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        t = by_key[key]
        assert t["effect"] == "NoExecute" and t["operator"] == "Exists"
        # Not the default 300 s; not so short that a kubelet hiccup costs an engine reload.
        assert 30 <= t["tolerationSeconds"] <= 60, t


@pytest.mark.parametrize("overlay", POOL_SETS)
def test_replicas_spread_over_nodes(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    dep = one(rendered[overlay], "Deployment", "gendr")
    spec = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    by_key = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
    host = by_key["kubernetes.io/hostname"]
    # Hard, so the two minimum replicas never share a node; two domains at least, so a one-node pool
    # makes the second pod wait for a node (the cluster autoscaler) instead of doubling up.
    assert host["whenUnsatisfiable"] == "DoNotSchedule" and host["maxSkew"] == 1
    assert host["minDomains"] == 2 and host.get("nodeTaintsPolicy") == "Honor"
    assert all(pod_labels.get(k) == v for k, v in host["labelSelector"]["matchLabels"].items())
    zone = by_key["topology.kubernetes.io/zone"]
    assert zone["whenUnsatisfiable"] == "ScheduleAnyway"  # GPU capacity per zone is uneven


@pytest.mark.parametrize("overlay", POOL_SETS)
def test_a_rollout_at_maximum_scale_needs_no_spare_gpu(
    overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objs = rendered[overlay]
    dep = one(objs, "Deployment", "gendr")
    rolling = dep["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxSurge"] == 0, "a surge pod at maxReplicas waits for a GPU nobody has"
    assert rolling["maxUnavailable"] == 1
    scaler = next(o for o in objs if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject"))
    least = scaler["spec"].get("minReplicas", scaler["spec"].get("minReplicaCount"))
    assert least - rolling["maxUnavailable"] >= 1, "a rollout at the minimum keeps one pod serving"
