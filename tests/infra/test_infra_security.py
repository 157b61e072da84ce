"""KubeRay hardening, base and every overlay as rendered: container securityContext with writable
emptyDirs where Ray writes, NetworkPolicies that cover exactly the pinned Ray ports, separate
ServiceAccounts (only the head can reach the API server), and a digest-pinned image in prod."""

from __future__ import annotations

import re
from typing import Any

import pytest
from infra_manifests import cluster_specs, groups, of_kind, pod_templates, rendered, variants

VARIANTS = list(variants())
HARDENED = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
# Where Ray and its libraries write in a running pod (sessions, logs, spilled objects and unpacked
# runtime envs under /tmp; kernel caches under ~/.cache). The image's user is `ray`, HOME /home/ray.
WRITABLE = {"/tmp", "/home/ray/.cache"}
HEAD_ONLY_PORTS = {"port": 6379, "dashboard-port": 8265, "ray-client-server-port": 10001}
DASHBOARD = 8265


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    pod = template["spec"]
    return pod["containers"] + pod.get("initContainers", [])


def _emptydir_mounts(template: dict[str, Any], container: dict[str, Any]) -> set[str]:
    empty = {v["name"] for v in template["spec"].get("volumes", []) if "emptyDir" in v}
    return {m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in empty}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_is_hardened_and_writes_only_to_emptydirs(variant):
    objects = rendered(variant)
    for label, template in pod_templates(objects):
        assert template["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, label
        for container in _containers(template):
            where = f"{label}/{container['name']}"
            assert container.get("securityContext", {}) | HARDENED == container.get("securityContext"), where
            expected = {"/tmp"} if label.endswith("/submitter") else WRITABLE
            assert expected <= _emptydir_mounts(template, container), f"{where}: read-only root needs {expected}"
    for label, spec in cluster_specs(objects):
        autoscaler = spec["autoscalerOptions"]
        assert autoscaler["securityContext"] == HARDENED, f"{label}: autoscaler sidecar"
        head_volumes = {v["name"]: v for v in groups(spec)["head"]["template"]["spec"]["volumes"]}
        for mount in autoscaler["volumeMounts"]:  # the sidecar lives in the head pod: it mounts its volumes
            assert "emptyDir" in head_volumes[mount["name"]], f"{label}: autoscaler mount {mount}"
        assert "/tmp" in {m["mountPath"] for m in autoscaler["volumeMounts"]}, label


def _policy(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (policy,) = [p for p in of_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == name]
    assert policy["spec"]["policyTypes"] == ["Ingress"], name
    return policy["spec"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics for matchLabels and In/NotIn/Exists expressions."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        ok = {"In": present and labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": present, "DoesNotExist": not present}[operator]
        if not ok:
            return False
    return True


def _allowed(ports: list[dict[str, Any]], port: int) -> bool:
    return any(p["protocol"] == "TCP" and p["port"] <= port <= p.get("endPort", p["port"]) for p in ports)


def _ray_ports(spec: dict[str, Any]) -> dict[str, set[int]]:
    """Group name -> every TCP port its Ray processes listen on, as pinned in rayStartParams."""
    ports = {}
    for name, group in groups(spec).items():
        params = group["rayStartParams"]
        pinned = {int(v) for k, v in params.items() if k.endswith("-port") and "worker-port" not in k}
        ports[name] = pinned | {int(params["min-worker-port"]), int(params["max-worker-port"])}
    return ports


@pytest.mark.parametrize("variant", VARIANTS)
def test_ray_ports_are_pinned_and_open_only_between_the_clusters_pods(variant):
    objects = rendered(variant)
    internal = _policy(objects, "imp-platform-ray")
    (rule,) = internal["ingress"]
    for label, spec in cluster_specs(objects):
        ports = _ray_ports(spec)
        head_params = groups(spec)["head"]["rayStartParams"]
        assert {k: int(head_params[k]) for k in HEAD_ONLY_PORTS} == HEAD_ONLY_PORTS, label
        for name, group in groups(spec).items():
            pod_labels = group["template"]["metadata"]["labels"]
            assert _selects(internal["podSelector"], pod_labels), f"{label}/{name}: not covered by the policy"
            assert any(_selects(peer["podSelector"], pod_labels) for peer in rule["from"]), f"{label}/{name}"
            assert set(group["rayStartParams"]) >= {"node-manager-port", "object-manager-port",
                                                    "runtime-env-agent-port", "dashboard-agent-grpc-port",
                                                    "dashboard-agent-listen-port", "metrics-export-port",
                                                    "min-worker-port", "max-worker-port"}, f"{label}/{name}: a random port"
            missing = {p for p in ports[name] - {DASHBOARD} if not _allowed(rule["ports"], p)}
            assert not missing, f"{label}/{name}: ports {missing} blocked between Ray pods"
    assert not _allowed(rule["ports"], DASHBOARD), "the dashboard is for clients, not a Ray-internal port"
    assert all("namespaceSelector" not in peer and "ipBlock" not in peer for peer in rule["from"]), \
        "Ray's internal ports are for this namespace's Ray pods only"
    for submitter_label, template in pod_templates(objects):
        if submitter_label.endswith("/submitter"):
            assert not any(_selects(p["podSelector"], template["metadata"]["labels"]) for p in rule["from"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_dashboard_only_from_the_client_namespace_operator_and_submitters(variant):
    objects = rendered(variant)
    dashboard = _policy(objects, "imp-platform-dashboard")
    (rule,) = dashboard["ingress"]
    assert [p["port"] for p in rule["ports"]] == [DASHBOARD] and "endPort" not in rule["ports"][0]
    namespaces = {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                  for peer in rule["from"] if "namespaceSelector" in peer}
    assert namespaces == {"imp-clients", "kuberay-system"}, namespaces
    assert all(set(peer) == {"namespaceSelector"} or set(peer) == {"podSelector"} for peer in rule["from"])
    for label, spec in cluster_specs(objects):
        for name, group in groups(spec).items():
            is_head = _selects(dashboard["podSelector"], group["template"]["metadata"]["labels"])
            assert is_head == (name == "head"), f"{label}/{name}"
    submitters = [t for label, t in pod_templates(objects) if label.endswith("/submitter")]
    assert submitters and all(any(_selects(peer.get("podSelector", {"matchLabels": {"-": "-"}}),
                                           t["metadata"]["labels"]) for peer in rule["from"]) for t in submitters)


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_head_has_an_api_token(variant):
    objects = rendered(variant)
    accounts = {sa["metadata"]["name"]: sa for sa in of_kind(objects, "ServiceAccount")}
    assert set(accounts) == {"imp-platform-head", "imp-platform-worker"}
    assert accounts["imp-platform-worker"]["automountServiceAccountToken"] is False
    assert of_kind(objects, "Role") == of_kind(objects, "RoleBinding") == [], "KubeRay binds the autoscaler Role"
    for label, template in pod_templates(objects):
        pod = template["spec"]
        if label.endswith("/head"):
            assert pod["serviceAccountName"] == "imp-platform-head", label
        else:
            assert pod["serviceAccountName"] == "imp-platform-worker", label
            assert pod["automountServiceAccountToken"] is False, label


def test_prod_pins_the_image_by_digest_and_uses_irsa_for_both_accounts():
    objects = rendered("prod")
    images = {c["image"] for _, t in pod_templates(objects) for c in _containers(t)}
    assert len(images) == 1 and re.fullmatch(r"[^@:]+/[^@:]+@sha256:[0-9a-f]{64}", images.pop()), images
    for account in of_kind(objects, "ServiceAccount"):
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
