"""infra/kuberay, base and every overlay as rendered: strict schemas, cluster shape, RayJob lifecycle,
credentials, versions, and what each overlay must change (image, bucket)."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
import yaml
from infra_kustomize import load_documents
from infra_manifests import (
    GPU,
    KUBERAY,
    REPO,
    cluster_specs,
    dockerfile_last,
    groups,
    of_kind,
    pod_templates,
    ray_container,
    ray_pin,
    rendered,
    s3_buckets,
    the_cluster,
    variants,
)

VARIANTS = list(variants())
OVERLAYS = [name for name in VARIANTS if name != "base"]
# Oldest Kubernetes minor the manifests must be valid for (kubernetes-validate ships schemas per minor).
KUBERNETES_VERSION = "1.30"
SECRET = "imp-platform-s3"
RAY_UID = 1000  # the base image's `ray` user


def _errors(validator, obj) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_ray_resources_validate_against_strict_crd_schemas(variant, kuberay_validators):
    objects = rendered(variant)
    assert {obj["kind"] for obj in objects} >= {"RayCluster", "RayJob"}
    for obj in objects:
        if obj["apiVersion"].startswith("ray.io/"):
            assert _errors(kuberay_validators[obj["kind"]], obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"


def test_every_manifest_file_as_written_validates(kuberay_validators):
    """The files themselves too (``kubectl apply -f`` of one file must not be rejected)."""
    files = sorted(KUBERAY.rglob("*.yaml"))
    checked = 0
    for path in files:
        for doc in load_documents(path):
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("ray.io/"):
                assert _errors(kuberay_validators[doc["kind"]], doc) == [], path
                checked += 1
    assert checked >= 5


@pytest.mark.parametrize("variant", VARIANTS)
def test_core_objects_and_pod_templates_validate_against_kubernetes(variant):
    objects = rendered(variant)
    core = [obj for obj in objects if not obj["apiVersion"].startswith("ray.io/")]
    assert {obj["kind"] for obj in core} >= {"ServiceAccount", "ConfigMap"}
    # Every pod template (Ray groups, RayJob submitters), wrapped as a core PodTemplate, goes through the
    # strict core schema too.
    for label, template in pod_templates(objects):
        core.append({"apiVersion": "v1", "kind": "PodTemplate",
                     "metadata": {"name": "-".join(label.split("/")[1:])}, "template": template})
    for obj in core:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_belongs_to_one_apply_stage(variant):
    """README applies stage by stage with `-l app.kubernetes.io/component=...`."""
    for obj in rendered(variant):
        stage = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        expected = obj["metadata"]["name"].removeprefix("imp-").split("-")[0] if obj["kind"] == "RayJob" else "cluster"
        assert stage == expected, f"{obj['kind']}/{obj['metadata']['name']}: component {stage!r}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_names_fit_kuberay_limits(variant):
    for obj in rendered(variant):
        name = obj["metadata"]["name"]
        # KubeRay requires DNS-1035 labels and derives longer names (services, clusters) from these.
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_cluster_shape(variant):
    """Head does no work; a cpu group for decoding and a gpu group that can scale from zero."""
    for label, spec in cluster_specs(rendered(variant)):
        assert spec["enableInTreeAutoscaling"] is True, label
        assert spec["authOptions"]["mode"] == "token", f"{label}: anyone reaching the dashboard could run code"
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", f"{label}: the head must not take tasks"
        assert head.get("serviceType") == "ClusterIP" and not head.get("enableIngress"), f"{label}: dashboard stays internal"
        by_name = groups(spec)
        assert set(by_name) == {"head", "cpu", "gpu"}, label
        for name in ("cpu", "gpu"):
            group = by_name[name]
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], f"{label}/{name}"
            assert group["maxReplicas"] >= 1, f"{label}/{name} can never start a pod"
        gpu, cpu = by_name["gpu"], by_name["cpu"]
        resources = ray_container(gpu)["resources"]
        declared = int(gpu["rayStartParams"]["num-gpus"])
        assert declared >= 1 and int(resources["limits"][GPU]) == declared, \
            f"{label}: rayStartParams num-gpus must equal the {GPU} limit (scale from zero, kuberay #321)"
        assert int(resources["requests"].get(GPU, declared)) == declared
        assert any(t.get("key") == GPU for t in gpu["template"]["spec"].get("tolerations", [])), f"{label}: GPU taint"
        assert GPU not in ray_container(cpu)["resources"]["limits"], f"{label}: decode nodes hold no GPUs"
        assert cpu["labels"] != gpu["labels"], f"{label}: decode and train nodes need distinct Ray labels"


@pytest.mark.parametrize("variant", VARIANTS)
def test_requests_limits_and_non_root_everywhere(variant):
    for label, spec in cluster_specs(rendered(variant)):
        autoscaler = spec["autoscalerOptions"]["resources"]
        assert {"cpu", "memory"} <= set(autoscaler["requests"]) and {"cpu", "memory"} <= set(autoscaler["limits"])
    for label, template in pod_templates(rendered(variant)):
        pod = template["spec"]
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{label}/{container['name']}"
            assert {"cpu", "memory"} <= set(container["resources"].get("requests", {})), where
            assert {"cpu", "memory"} <= set(container["resources"].get("limits", {})), where
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == RAY_UID, label


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rayjob_runs_on_the_rayclusters_spec(variant):
    """One cluster definition: overlays must repeat the replacement after patching the RayCluster."""
    objects = rendered(variant)
    cluster = the_cluster(objects)["spec"]
    jobs = of_kind(objects, "RayJob")
    assert {job["metadata"]["name"] for job in jobs} >= {"imp-preprocess-train", "imp-preprocess-test",
                                                         "imp-pretrain", "imp-tune"}
    for job in jobs:
        assert job["spec"].get("rayClusterSpec") == cluster, f"RayJob/{job['metadata']['name']} drifted"


@pytest.mark.parametrize("variant", VARIANTS)
def test_rayjob_lifecycle_is_deliberate(variant):
    workdir = dockerfile_last("WORKDIR")
    for job in of_kind(rendered(variant), "RayJob"):
        spec, name = job["spec"], job["metadata"]["name"]
        assert "clusterSelector" not in spec, name
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, name
        # Each retry creates a whole new cluster (kuberay #2192): set explicitly, and small.
        assert "backoffLimit" in spec and 0 <= spec["backoffLimit"] <= 1, name
        assert spec["activeDeadlineSeconds"] > 0, name
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", name
        # The head has num-cpus 0: a driver reserving CPUs would never be scheduled there.
        assert not spec.get("entrypointNumCpus") and not spec.get("entrypointNumGpus"), name
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env == {"working_dir": workdir}, f"{name}: entrypoints run from the image's {workdir}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_s3_credentials_only_by_reference(variant):
    """Keys never in the repository and never in an environment variable (inherited by every process,
    shown by `kubectl describe`): the optional Secret is mounted as a file where Ray runs, or IRSA."""
    objects = rendered(variant)
    assert of_kind(objects, "Secret") == [], "credentials never live in the repository"
    (configmap,) = of_kind(objects, "ConfigMap")
    credentials_file = configmap["data"]["AWS_SHARED_CREDENTIALS_FILE"]
    for label, template in pod_templates(objects):
        pod = template["spec"]
        for container in pod["containers"]:
            names = {item["name"] for item in container.get("env", [])}
            assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}, label
        secrets = [v for v in pod.get("volumes", []) if "secret" in v]
        if label.endswith("/submitter"):
            assert secrets == [], f"{label}: the submitter only talks to the dashboard"
            continue
        (volume,) = secrets
        assert volume["secret"]["secretName"] == SECRET and volume["secret"]["optional"] is True, label
        (mount,) = [m for m in ray_container({"template": template})["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["readOnly"] is True and credentials_file == f"{mount['mountPath']}/credentials", label
    for _, spec in cluster_specs(objects):
        autoscaler_mounts = {m["name"] for m in spec["autoscalerOptions"].get("volumeMounts", [])}
        assert "s3-credentials" not in autoscaler_mounts, "the autoscaler needs no S3 access"
    readme = (REPO / "infra" / "README.md").read_text()
    assert SECRET in readme and "--from-file=credentials=" in readme, "README must say how to create the Secret"


def test_no_credentials_in_infra_files():
    for path in (REPO / "infra").rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path}: looks like an AWS access key"
            assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}", text), path


@pytest.mark.parametrize("variant", VARIANTS)
def test_ray_version_matches_pyproject(variant):
    for label, spec in cluster_specs(rendered(variant)):
        assert spec["rayVersion"] == ray_pin(), label


def _images(objects) -> set[str]:
    return {c["image"] for _, template in pod_templates(objects) for c in template["spec"]["containers"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_sets_image_bucket_and_namespace(overlay):
    base, objects = rendered("base"), rendered(overlay)
    (image,) = _images(objects)  # one image for head, workers, autoscaler and submitter
    assert image not in _images(base) and "/" in image.split(":")[0], f"{overlay}: push to a registry: {image}"
    base_buckets = s3_buckets(" ".join(j["spec"]["entrypoint"] for j in of_kind(base, "RayJob")))
    buckets = s3_buckets(" ".join(j["spec"]["entrypoint"] for j in of_kind(objects, "RayJob")))
    assert len(buckets) == 1 and not buckets & base_buckets, f"{overlay}: every job on the overlay's one bucket"
    namespaces = {obj["metadata"].get("namespace") for obj in objects}
    assert len(namespaces) == 1 and None not in namespaces, f"{overlay}: one namespace per environment"
