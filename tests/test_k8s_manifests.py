"""What `kubectl apply -f k8s/` installs and what the controller submits, checked against the real schemas:
the training operator's PyTorchJob CRD (made strict, so unknown fields fail), its webhook's rules, and
kubernetes-validate's strict schemas of the supported Kubernetes versions. Also the Dockerfile's lint and
the in-cluster S3 server's command line, run here against a real SeaweedFS."""

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import boto3
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as k8s_schemas
import pytest
import yaml
from botocore.exceptions import BotoCoreError, ClientError
from referencing import Registry, Resource

from jobs import driver
from jobs import pipeline
from jobs.backends import PhaseJob
from jobs.backends.kubernetes import KubernetesError, render_pytorchjob
from jobs.config import load_config, preset_names
from vibechat.storage import open_store

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRD = ROOT / "tests" / "schemas" / "kubeflow.org_pytorchjobs.yaml"  # source version: tests/schemas/README.md
K8S_VERSIONS = ["1.35", "1.36", "1.37"]  # the minor versions upstream supports as of late 2026
STORE = "s3://vibechat/store"

GPU_PROGRAMS = ["base_train", "base_eval", "mid_train", "chat_sft", "chat_rl", "chat_eval"]
CPU_PROGRAMS = ["data", "tok_train", "tok_eval", "export", "report"]
RUN_ID = "run-261125-093000"  # the shape of the controller's default run ids


def preset_jobs(preset: str) -> list[PhaseJob]:
    """Every phase's job of a fresh run of the preset, made by the controller itself."""
    run = pipeline.new_run(RUN_ID, preset, load_config(preset), "kubernetes", now=0.0)
    return [driver.phase_job(run, open_store(STORE), phase, attempt=1) for phase in pipeline.PHASES]


def cases() -> list:
    """Each preset's jobs as the preset sizes them (tiny on CPU, d20 on 8 GPUs a node, ...), and each
    GPU program's job also on 2 nodes."""
    out = []
    for preset in preset_names():
        for job in preset_jobs(preset):
            out.append(pytest.param(job, id=f"{preset}-{job.phase}-1node"))
            if job.module.removeprefix("jobs.") in GPU_PROGRAMS:
                out.append(pytest.param(replace(job, nnodes=2), id=f"{preset}-{job.phase}-2nodes"))
    return out


def phase_job(program: str, nnodes: int = 1, gpus: int = 8, run_id: str = RUN_ID, **changes) -> PhaseJob:
    """A job of one program, sized like a d20 phase (8 GPUs a node) unless it is a CPU program."""
    gpus = 0 if program in CPU_PROGRAMS else gpus
    return replace(PhaseJob(
        run_id=run_id, phase=program, attempt=1, module=f"jobs.{program}", args=["--depth=20"],
        env={"VIBECHAT_STORE": STORE, "VIBECHAT_RUN": run_id}, nnodes=nnodes, nproc_per_node=max(gpus, 1), gpus_per_node=gpus,
    ), **changes)


def render(job: PhaseJob, settings: dict | None = None) -> dict:
    return render_pytorchjob(job, image="registry.example/vibechat:0.1.0", namespace="vibechat", settings=settings)


def pod_spec(job: dict, replica: str = "Master") -> dict:
    return job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]


# each new kubernetes setting, as a platform team would set it
SETTINGS = {
    "queue": {"queue": "team-a"},
    "priority_class": {"priority_class": "training-high"},
    "gang_scheduling": {"gang_scheduling": True},
    "node_selector": {"node_selector": {"cloud.google.com/gke-nodepool": "h100", "topology.kubernetes.io/zone": "a"}},
    "tolerations": {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
                                    {"key": "spot", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60}]},
    "affinity": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}]}]}}}},
    "service_account": {"service_account": "vibechat-phase"},
    "image_pull_secrets": {"image_pull_secrets": ["regcred", "mirror"]},
    "s3_secret": {"s3_secret": "team-a-bucket"},
    "env": {"env": {"NCCL_DEBUG": "WARN", "HF_HUB_OFFLINE": "1"}},
}
SETTINGS["all"] = {k: v for one in SETTINGS.values() for k, v in one.items()}
RESOURCES = {"guaranteed": {"cpu": 32, "memory": "256Gi", "ephemeral_storage": "500Gi", "guaranteed": True}}


def master_container(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]


# --- the schemas ---------------------------------------------------------------------------------------


def strict(schema: dict) -> dict:
    """The CRD's OpenAPI v3 schema as a JSON Schema that rejects every field it does not list."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "description"}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = strict(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [strict(s) for s in schema[key]]
    return out


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    schema = strict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator: jsonschema.Draft7Validator, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def webhook_errors(job: dict) -> list[str]:
    """The training operator's admission webhook rules for a PyTorchJob (pkg/webhooks/pytorch)."""
    errors = []
    name = job["metadata"]["name"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"name {name!r} is not a DNS-1035 label")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    for kind, spec in replicas.items():
        if kind not in ("Master", "Worker"):
            errors.append(f"replica type {kind} is not Master or Worker")
        containers = spec["template"]["spec"].get("containers") or []
        if not containers:
            errors.append(f"{kind} has no containers")
        if any(not c.get("image") for c in containers):
            errors.append(f"{kind} has a container without an image")
        if not any(c["name"] == "pytorch" for c in containers):
            errors.append(f"{kind} has no container named pytorch")
    if replicas.get("Master", {}).get("replicas") != 1:
        errors.append("Master replicas must be 1")
    if job["spec"].get("elasticPolicy", {}).get("nProcPerNode") is not None and "nprocPerNode" in job["spec"]:
        errors.append("elasticPolicy.nProcPerNode must not be used with nprocPerNode")
    # the operator names a pod and a Service <name>-<type>-<index>; a Service name is a DNS-1035 label too
    for kind, spec in replicas.items():
        longest = f"{name}-{kind.lower()}-{spec['replicas'] - 1}"
        if len(longest) > 63:
            errors.append(f"{longest!r} is longer than 63 characters")
    return errors


@functools.cache
def k8s_validator(version: str, kind: str, api_version: str) -> jsonschema.Draft202012Validator:
    """kubernetes-validate's strict schema of one kind, built once (its validate() reloads every schema per call)."""
    folder = f"kubernetes-json-schema/v{version}.0-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # rbac.authorization.k8s.io/v1 -> rbac-v1
    schema = k8s_schemas.schema_contents(f"{folder}/{kind.lower()}-{group_version}.json", version)
    definitions = k8s_schemas.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def k8s_errors(doc: dict, version: str) -> list[str]:
    validator = k8s_validator(version, doc["kind"], doc["apiVersion"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_cached_validator_agrees_with_kubernetes_validate():
    deployment = find("Deployment", "vibechat-controller")
    assert kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True) and k8s_errors(deployment, K8S_VERSIONS[-1]) == []
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)
    assert k8s_errors(deployment, K8S_VERSIONS[-1]) != []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def core_manifests() -> list:
    docs = []
    for path in sorted(K8S.glob("*.yaml")) + [K8S / "s3-secret.yaml.example"]:
        for doc in yaml.safe_load_all(path.read_text()):
            docs.append(pytest.param(doc, id=f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"))
    return docs


def all_core_objects() -> list[dict]:
    return [p.values[0] for p in core_manifests()]


def find(kind: str, name: str) -> dict:
    return next(d for d in all_core_objects() if d["kind"] == kind and d["metadata"]["name"] == name)


# --- rendered PyTorchJobs ------------------------------------------------------------------------------


@pytest.mark.parametrize("job", cases())
def test_rendered_job_validates_against_the_strict_crd_schema(crd_validator, job):
    assert schema_errors(crd_validator, render(job)) == []


@pytest.mark.parametrize("job", cases())
def test_rendered_job_passes_the_operator_webhook_rules(job):
    assert webhook_errors(render(job)) == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("job", cases())
def test_rendered_pod_templates_validate_against_kubernetes_strict_schemas(job, version):
    for kind, spec in render(job)["spec"]["pytorchReplicaSpecs"].items():
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": kind.lower()}, "template": spec["template"]}
        assert k8s_errors(wrapper, version) == [], kind


def test_strict_crd_schema_rejects_a_misspelled_field(crd_validator):
    job = render(phase_job("base_train"))
    master_container(job)["resource"] = {}
    assert any("resource" in e for e in schema_errors(crd_validator, job))


def test_webhook_rules_reject_two_masters():
    job = render(phase_job("base_train"))
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    assert webhook_errors(job) == ["Master replicas must be 1"]


@pytest.mark.parametrize("variant", [*SETTINGS, *RESOURCES])
def test_every_rendered_job_with_each_setting_validates_strictly(crd_validator, variant):
    for param in cases():
        job = param.values[0]
        if variant in RESOURCES:
            job = replace(job, resources=RESOURCES[variant])
        manifest = render(job, SETTINGS.get(variant))
        assert schema_errors(crd_validator, manifest) == [] and webhook_errors(manifest) == [], param.id
        for kind, spec in manifest["spec"]["pytorchReplicaSpecs"].items():
            wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": kind.lower()}, "template": spec["template"]}
            assert k8s_errors(wrapper, K8S_VERSIONS[-1]) == [], f"{param.id} {kind}"


def test_every_phase_program_runs_from_the_one_template():
    for module, _ in pipeline.PHASE_PROGRAMS.values():
        container = master_container(render(phase_job(module.removeprefix("jobs."))))
        assert container["command"][-2:] == ["-m", module]
    assert [p.name for p in (K8S / "phases").iterdir()] == ["pytorchjob.yaml"]


def test_a_queue_creates_the_job_suspended_and_labelled_for_kueue():
    job = render(phase_job("base_train"), SETTINGS["queue"])
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["runPolicy"]["suspend"] is True


def test_without_a_queue_the_job_starts_at_once():
    job = render(phase_job("base_train"))
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"] and "suspend" not in job["spec"]["runPolicy"]


def test_gang_scheduling_asks_for_all_nodes_at_once_at_the_priority_class():
    job = render(phase_job("base_train", nnodes=4), {"gang_scheduling": True, "priority_class": "training-high"})
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 4, "priorityClass": "training-high"}
    assert "schedulingPolicy" not in render(phase_job("base_train", nnodes=4))["spec"]["runPolicy"]


def test_placement_settings_reach_every_pod_of_the_job():
    job = render(phase_job("base_train", nnodes=2), SETTINGS["all"])
    for replica in ("Master", "Worker"):
        pod = pod_spec(job, replica)
        assert pod["nodeSelector"] == SETTINGS["node_selector"]["node_selector"]
        assert pod["tolerations"][:2] == SETTINGS["tolerations"]["tolerations"]
        assert pod["affinity"] == SETTINGS["affinity"]["affinity"]
        assert pod["priorityClassName"] == "training-high"
        assert pod["serviceAccountName"] == "vibechat-phase"
        assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
        container = pod["containers"][0]
        assert {"secretRef": {"name": "team-a-bucket", "optional": True}} in container["envFrom"]
        assert {"name": "NCCL_DEBUG", "value": "WARN"} in container["env"]


def test_gpu_pods_tolerate_the_gpu_taint_and_cpu_pods_do_not():
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(render(phase_job("base_train")))["tolerations"]
    assert "tolerations" not in pod_spec(render(phase_job("tok_train")))


def test_run_env_wins_over_the_extra_env():
    container = master_container(render(phase_job("base_train"), {"env": {"VIBECHAT_RUN": "other"}}))
    assert [e["value"] for e in container["env"] if e["name"] == "VIBECHAT_RUN"] == [RUN_ID]


def test_a_guaranteed_phase_limits_cpu_memory_and_scratch_to_its_requests():
    resources = master_container(render(phase_job("base_train", resources=RESOURCES["guaranteed"])))["resources"]
    assert resources["requests"] == resources["limits"] == {
        "cpu": "32", "memory": "256Gi", "ephemeral-storage": "500Gi", "nvidia.com/gpu": 8}


def test_a_burstable_phase_has_no_cpu_limit():
    resources = master_container(render(phase_job("tok_train")))["resources"]
    assert resources["requests"] == {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "20Gi"}
    assert resources["limits"] == {"memory": "8Gi", "ephemeral-storage": "20Gi"}


def test_phase_pods_write_only_to_size_limited_scratch_and_shared_memory():
    pod = pod_spec(render(phase_job("base_train", resources={"ephemeral_storage": "300Gi", "memory": "96Gi"})))
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v["emptyDir"] for v in pod["volumes"]}
    assert volumes == {"dshm": {"medium": "Memory", "sizeLimit": "96Gi"}, "scratch": {"sizeLimit": "300Gi"}}
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/dev/shm", "/tmp", "/home/vibechat"}


def test_a_template_in_the_configmap_wins_over_the_image_copy(tmp_path, monkeypatch):
    edited = (K8S / "phases" / "pytorchjob.yaml").read_text().replace("cleanPodPolicy: Running", "cleanPodPolicy: All")
    (tmp_path / "pytorchjob.yaml").write_text(edited)
    monkeypatch.setenv("VIBECHAT_PHASE_TEMPLATE", str(tmp_path / "pytorchjob.yaml"))
    assert render(phase_job("report"))["spec"]["runPolicy"]["cleanPodPolicy"] == "All"


def test_without_the_configmap_the_image_template_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("VIBECHAT_PHASE_TEMPLATE", str(tmp_path / "not-mounted.yaml"))
    assert render(phase_job("report"))["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"


def test_job_and_its_pods_carry_the_run_and_phase_labels():
    job = render(phase_job("chat_sft", nnodes=2, phase="sft"))
    expected = {"vibechat.run": RUN_ID, "vibechat.phase": "sft"}
    assert expected.items() <= job["metadata"]["labels"].items()
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        assert expected.items() <= spec["template"]["metadata"]["labels"].items()


def test_two_node_job_has_one_master_and_one_worker_of_eight_gpus_each():
    job = render(phase_job("base_train", nnodes=2))
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in replicas.items()} == {"Master": 1, "Worker": 1}
    assert job["spec"]["nprocPerNode"] == "8"
    for spec in replicas.values():
        resources = spec["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 8


def test_one_node_job_has_no_worker_replicas():
    assert list(render(phase_job("base_train", nnodes=1))["spec"]["pytorchReplicaSpecs"]) == ["Master"]


@pytest.mark.parametrize("program", CPU_PROGRAMS + ["base_train"])
def test_job_without_gpus_requests_none(program):
    resources = master_container(render(phase_job(program, gpus=0)))["resources"]
    assert "nvidia.com/gpu" not in resources["requests"] and "nvidia.com/gpu" not in resources["limits"]


def test_job_restarts_failed_containers_a_bounded_number_of_times():
    job = render(phase_job("base_train", nnodes=2))
    assert {s["restartPolicy"] for s in job["spec"]["pytorchReplicaSpecs"].values()} == {"OnFailure"}
    # the operator counts container restarts against backoffLimit only for OnFailure/Always
    assert job["spec"]["runPolicy"]["backoffLimit"] == 2
    # nothing deletes a job before the controller recorded its end (it sets the TTL then)
    assert "ttlSecondsAfterFinished" not in job["spec"]["runPolicy"]


def test_trainer_runs_under_torchrun_from_the_operator_variables():
    container = master_container(render(phase_job("mid_train")))
    assert container["command"] == [
        "torchrun", "--nnodes=$(PET_NNODES)", "--node-rank=$(PET_NODE_RANK)", "--nproc-per-node=$(PET_NPROC_PER_NODE)",
        "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)", "-m", "jobs.mid_train",
    ]
    assert container["args"] == ["--depth=20"]


def test_trainer_gets_the_store_the_run_and_the_s3_settings():
    container = master_container(render(phase_job("chat_rl")))
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["VIBECHAT_STORE"] == STORE and env["VIBECHAT_RUN"] == RUN_ID
    assert {"secretRef": {"name": "vibechat-s3", "optional": True}} in container["envFrom"]
    assert {"configMapRef": {"name": "vibechat-config", "optional": True}} in container["envFrom"]


def test_gpu_pods_get_a_memory_backed_dev_shm():
    pod = render(phase_job("base_train"))["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


def test_phase_env_overrides_the_template_env():
    job = phase_job("base_train", env={"VIBECHAT_STORE": STORE, "VIBECHAT_RUN": RUN_ID, "VIBECHAT_METRICS_PORT": "9500"})
    assert [e["value"] for e in master_container(render(job))["env"] if e["name"] == "VIBECHAT_METRICS_PORT"] == ["9500"]


# --- bad input to the renderer -------------------------------------------------------------------------


def test_too_long_run_id_is_refused_naming_the_longest_that_fits():
    with pytest.raises(KubernetesError, match=r"longer than Kubernetes' 63 characters: use a run id of at most 32 characters"):
        render(phase_job("base_train", nnodes=2, run_id="r" * 50))
    render(phase_job("base_train", nnodes=2, run_id="r" * 32))


def test_run_id_that_is_no_dns_label_is_refused():
    with pytest.raises(KubernetesError, match="not a DNS-1035 label"):
        render(phase_job("base_train", run_id="my.run"))


def test_local_store_is_refused_for_pods():
    job = phase_job("base_train", env={"VIBECHAT_STORE": "/home/me/.cache/vibechat", "VIBECHAT_RUN": RUN_ID})
    with pytest.raises(KubernetesError, match="needs an s3:// VIBECHAT_STORE"):
        render(job)


def test_a_missing_template_is_named(tmp_path):
    with pytest.raises(KubernetesError, match=r"the PyTorchJob template .*gone.yaml does not exist"):
        render_pytorchjob(phase_job("report"), "vibechat:1", "vibechat", template=tmp_path / "gone.yaml")


def test_a_queue_name_that_is_no_label_value_is_refused():
    with pytest.raises(KubernetesError, match="kubernetes.queue 'team a' cannot be a label value"):
        render(phase_job("base_train"), {"queue": "team a"})


def test_a_template_that_is_no_pytorchjob_is_named(tmp_path):
    (tmp_path / "pytorchjob.yaml").write_text("apiVersion: v1\nkind: ConfigMap\n")
    with pytest.raises(KubernetesError, match=r"pytorchjob.yaml is not a PyTorchJob with Master replicas"):
        render_pytorchjob(phase_job("report"), "vibechat:1", "vibechat", template=tmp_path / "pytorchjob.yaml")


def test_unknown_placeholder_in_a_template_is_named(tmp_path):
    text = (K8S / "phases" / "pytorchjob.yaml").read_text().replace("${IMAGE}", "${IMAGE_REF}")
    (tmp_path / "pytorchjob.yaml").write_text(text)
    with pytest.raises(KubernetesError, match=r"unknown placeholder \$\{IMAGE_REF\}"):
        render_pytorchjob(phase_job("report"), "vibechat:1", "vibechat", template=tmp_path / "pytorchjob.yaml")


# --- kubectl apply -f k8s/ -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", core_manifests())
def test_core_manifest_validates_against_kubernetes_strict_schema(doc, version):
    assert k8s_errors(doc, version) == []


def test_kubernetes_strict_schema_rejects_a_misspelled_field():
    deployment = find("Deployment", "vibechat-controller")
    deployment["spec"]["template"]["spec"]["containers"][0]["envfrom"] = []
    assert k8s_errors(deployment, K8S_VERSIONS[-1]) != []


def test_namespace_is_applied_first_and_holds_everything_else():
    files = sorted(p.name for p in K8S.glob("*.yaml"))
    assert files[0] == "00-namespace.yaml"
    namespaced = [d for d in all_core_objects() if d["kind"] != "Namespace"]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"vibechat"}


def test_controller_lease_rights_are_limited_to_its_own_lease():
    rules = find("Role", "vibechat-controller")["rules"]
    named = [r for r in rules if r.get("resourceNames")]
    assert named == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                      "resourceNames": ["vibechat-controller"], "verbs": ["get", "patch"]}]


def test_controller_serves_with_leader_election_as_the_bound_service_account():
    deployment = find("Deployment", "vibechat-controller")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == find("RoleBinding", "vibechat-controller")["subjects"][0]["name"]
    assert pod["containers"][0]["command"] == ["python", "-m", "jobs.controller", "serve", "--leader-elect", "--http-port=8080"]
    assert deployment["spec"]["replicas"] == 2
    namespace_env = next(e for e in pod["containers"][0]["env"] if e["name"] == "POD_NAMESPACE")
    assert namespace_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_run_config_in_the_cluster_is_a_valid_overlay_naming_the_deployed_image(tmp_path):
    (tmp_path / "cluster.yaml").write_text(find("ConfigMap", "vibechat-run-config")["data"]["cluster.yaml"])
    config = load_config(preset_names()[0], str(tmp_path / "cluster.yaml"))
    images = {c["image"] for name in ("vibechat-controller", "vibechat-dashboard", "vibechat-serve")
              for c in find("Deployment", name)["spec"]["template"]["spec"]["containers"]}
    assert images == {config["kubernetes"]["image"]}
    assert config["kubernetes"]["namespace"] == find("Role", "vibechat-controller")["metadata"]["namespace"]


def test_dashboard_serves_streamlit_on_8501():
    container = find("Deployment", "vibechat-dashboard")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["streamlit", "run", "dashboard/app.py"]
    assert find("Service", "vibechat-dashboard")["spec"]["ports"][0]["port"] == 8501


def test_only_the_controller_gets_an_api_token():
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in all_core_objects() if d["kind"] in ("Deployment", "StatefulSet")}
    pods["phase"] = render(phase_job("base_train"))["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert {name for name, pod in pods.items() if pod.get("automountServiceAccountToken", True)} == {"vibechat-controller"}


def test_secret_template_is_not_applied_and_holds_only_placeholders():
    # kubectl apply -f <dir> reads only .yaml, .yml and .json files
    assert not [p for p in K8S.iterdir() if "secret" in p.name and p.suffix in (".yaml", ".yml", ".json")]
    assert set(find("Secret", "vibechat-s3")["stringData"].values()) == {"REPLACE-ME"}


def test_in_cluster_store_url_and_endpoint_match_the_s3_service():
    data = find("ConfigMap", "vibechat-config")["data"]
    service = find("Service", "vibechat-s3")
    assert data["AWS_ENDPOINT_URL"] == f"http://vibechat-s3.vibechat.svc:{service['spec']['ports'][0]['port']}"
    args = find("StatefulSet", "vibechat-s3")["spec"]["template"]["spec"]["containers"][0]["args"]
    bucket = next(a for a in args if a.startswith("-bucket=")).removeprefix("-bucket=")
    assert data["VIBECHAT_STORE"].startswith(f"s3://{bucket}/")


def test_scraped_pods_expose_the_port_they_announce():
    pods = [d["spec"]["template"] for d in all_core_objects() if d["kind"] in ("Deployment", "StatefulSet")]
    pods.append(render(phase_job("base_train"))["spec"]["pytorchReplicaSpecs"]["Master"]["template"])
    scraped = [p for p in pods if p["metadata"].get("annotations", {}).get("prometheus.io/scrape") == "true"]
    assert len(scraped) == 4  # the S3 server, the controller, the chat server and the training master (global rank 0)
    for pod in scraped:
        ports = {p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) in ports


def test_in_cluster_seaweedfs_command_serves_the_bucket_only_with_the_secret_keys(tmp_path):
    """Run the StatefulSet's exact `weed` arguments here (ports moved to free ones on loopback)."""
    container = find("StatefulSet", "vibechat-s3")["spec"]["template"]["spec"]["containers"][0]
    weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    s3_port = free_port()
    local = [
        f"-dir={tmp_path}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={s3_port}", f"-metricsPort={free_port()}",
        f"-master.port={free_port()}", f"-volume.port={free_port()}", f"-filer.port={free_port()}",
    ]
    keys = {"AWS_ACCESS_KEY_ID": "in-cluster-key", "AWS_SECRET_ACCESS_KEY": "in-cluster-secret"}
    assert [e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]] == list(keys)
    # Go's flag package keeps the last value of a repeated flag, so the local ones win
    proc = subprocess.Popen(
        [weed, *container["args"], *local], env={**os.environ, **keys},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        endpoint = f"http://127.0.0.1:{s3_port}"
        good = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
        for _ in range(120):  # up to a minute for the master, volume, filer and gateway to come up
            try:
                good.put_object(Bucket="vibechat", Key="store/probe", Body=b"1")
                break
            except (BotoCoreError, ClientError):
                time.sleep(0.5)
        assert good.get_object(Bucket="vibechat", Key="store/probe")["Body"].read() == b"1"
        wrong = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                             aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key="wrong")
        with pytest.raises(ClientError):
            wrong.get_object(Bucket="vibechat", Key="store/probe")
    finally:
        proc.terminate()
        proc.wait(timeout=15)


# --- kubectl apply -k: the base and its overlays -------------------------------------------------------

OVERLAYS = sorted(p.name for p in (ROOT / "k8s-overlays").iterdir())


@functools.cache
def kustomize(path: Path) -> tuple[dict, ...]:
    """What `kubectl apply -k path` would send, built by kubectl's own kustomize."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is missing: install Debian's kubernetes-client (make test does), it ships `kubectl kustomize`")
    built = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    return tuple(yaml.safe_load_all(built.stdout))


def key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def built(path: Path, kind: str, name: str) -> dict:
    return next(d for d in kustomize(path) if key(d) == (kind, name))


def test_the_kustomize_base_installs_what_apply_f_does_plus_the_phase_template():
    applied = {key(d): d for d in all_core_objects() if d["kind"] != "Secret"}
    kustomized = {key(d): d for d in kustomize(K8S)}
    assert set(kustomized) == set(applied) | {("ConfigMap", "vibechat-phase-template")}
    assert all(kustomized[k] == applied[k] for k in applied)
    template = kustomized["ConfigMap", "vibechat-phase-template"]
    assert template["data"] == {"pytorchjob.yaml": (K8S / "phases" / "pytorchjob.yaml").read_text()}


def test_the_controller_reads_the_phase_template_from_the_configmap():
    pod = find("Deployment", "vibechat-controller")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    path = next(e["value"] for e in container["env"] if e["name"] == "VIBECHAT_PHASE_TEMPLATE")
    volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "vibechat-phase-template")
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert path == f"{mount['mountPath']}/pytorchjob.yaml" and volume["configMap"]["optional"] is True


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_kustomized_object_validates_against_kubernetes_strict_schemas(overlay):
    path = K8S if overlay == "base" else ROOT / "k8s-overlays" / overlay
    for doc in kustomize(path):
        for version in K8S_VERSIONS:
            assert k8s_errors(doc, version) == [], (key(doc), version)


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_every_kustomized_run_config_renders_jobs_that_validate_strictly(crd_validator, overlay, tmp_path):
    path = K8S if overlay == "base" else ROOT / "k8s-overlays" / overlay
    (tmp_path / "cluster.yaml").write_text(built(path, "ConfigMap", "vibechat-run-config")["data"]["cluster.yaml"])
    controller_image = built(path, "Deployment", "vibechat-controller")["spec"]["template"]["spec"]["containers"][0]["image"]
    for preset in preset_names():
        config = load_config(preset, str(tmp_path / "cluster.yaml"))
        assert config["kubernetes"]["image"] == controller_image
        run = pipeline.new_run(RUN_ID, preset, config, "kubernetes", now=0.0)
        for phase in pipeline.PHASES:
            job = driver.phase_job(run, open_store(STORE), phase, attempt=1)
            k8s = config["kubernetes"]
            manifest = render_pytorchjob(job, k8s["image"], k8s["namespace"], k8s)
            assert schema_errors(crd_validator, manifest) == [] and webhook_errors(manifest) == []
            template = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "m"}, "template": template}
            assert k8s_errors(pod_template, K8S_VERSIONS[-1]) == []


def test_the_existing_s3_overlay_drops_seaweedfs_and_points_at_the_bucket():
    docs = kustomize(ROOT / "k8s-overlays" / "existing-s3")
    assert not [key(d) for d in docs if d["metadata"]["name"] == "vibechat-s3"]
    data = built(ROOT / "k8s-overlays" / "existing-s3", "ConfigMap", "vibechat-config")["data"]
    assert "AWS_ENDPOINT_URL" not in data and data["VIBECHAT_STORE"].startswith("s3://")


def gpu_pool_settings(tmp_path: Path) -> dict:
    """The kubernetes.* settings of a d20 run started in a cluster installed from the gpu-pool overlay."""
    (tmp_path / "cluster.yaml").write_text(built(ROOT / "k8s-overlays" / "gpu-pool", "ConfigMap", "vibechat-run-config")["data"]["cluster.yaml"])
    return load_config("d20", str(tmp_path / "cluster.yaml"))["kubernetes"]


def test_the_gpu_pool_overlay_queues_and_places_the_phase_pods(tmp_path):
    k8s = gpu_pool_settings(tmp_path)
    job = render_pytorchjob(phase_job("base_train"), k8s["image"], k8s["namespace"], k8s)
    assert job["spec"]["runPolicy"]["suspend"] is True
    assert pod_spec(job)["nodeSelector"] and len(pod_spec(job)["tolerations"]) == 2


def test_the_gpu_pool_overlay_places_the_chat_server_where_the_gpu_phase_pods_go(tmp_path):
    k8s = gpu_pool_settings(tmp_path)
    phase = pod_spec(render_pytorchjob(phase_job("base_train"), k8s["image"], k8s["namespace"], k8s))
    server = built(ROOT / "k8s-overlays" / "gpu-pool", "Deployment", "vibechat-serve")["spec"]["template"]["spec"]
    assert server["nodeSelector"] == phase["nodeSelector"]
    assert {tuple(sorted(t.items())) for t in server["tolerations"]} == {tuple(sorted(t.items())) for t in phase["tolerations"]}
    assert server["containers"][0]["image"] == k8s["image"]


# --- hardening ------------------------------------------------------------------------------------------


def pod_templates() -> dict[str, dict]:
    """Every pod template this project makes: the core workloads and a phase job's master."""
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in all_core_objects() if d["kind"] in ("Deployment", "StatefulSet")}
    pods["phase"] = render(phase_job("base_train"))["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    return pods


def test_the_namespace_enforces_the_restricted_pod_security_standard():
    labels = find("Namespace", "vibechat")["metadata"]["labels"]
    assert {labels[f"pod-security.kubernetes.io/{mode}"] for mode in ("enforce", "audit", "warn")} == {"restricted"}


def test_every_container_has_a_read_only_root_and_writable_scratch_of_bounded_size():
    for name, template in pod_templates().items():
        pod = template["spec"]
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert container["resources"]["requests"]["ephemeral-storage"] == container["resources"]["limits"]["ephemeral-storage"], name
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert "/tmp" in writable, name
        assert all(v["emptyDir"].get("sizeLimit") for v in pod["volumes"] if "emptyDir" in v), name


# the volume types the restricted Pod Security Standard allows
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """What in a pod spec the restricted Pod Security Standard (the namespace enforces it) refuses."""
    out = [f"host namespace {k}" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    out += [f"volume {v['name']}" for v in pod.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    for c in pod["containers"]:
        context = {**pod.get("securityContext", {}), **c.get("securityContext", {})}  # the container's wins
        if context.get("runAsNonRoot") is not True or context.get("runAsUser") == 0:
            out.append(f"{c['name']}: may run as root")
        if context.get("allowPrivilegeEscalation") is not False or context.get("privileged"):
            out.append(f"{c['name']}: may escalate privileges")
        if context.get("capabilities", {}).get("drop") != ["ALL"] or set(context.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{c['name']}: keeps capabilities")
        if context.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            out.append(f"{c['name']}: no seccomp profile")
        out += [f"{c['name']}: host port" for p in c.get("ports", []) if p.get("hostPort")]
    return out


def test_every_pod_meets_the_restricted_pod_security_standard():
    assert {name: restricted_violations(t["spec"]) for name, t in pod_templates().items()} == {name: [] for name in pod_templates()}


def test_the_restricted_check_refuses_a_container_that_keeps_its_capabilities():
    pod = find("Deployment", "vibechat-serve")["spec"]["template"]["spec"]
    del pod["containers"][0]["securityContext"]["capabilities"]
    assert restricted_violations(pod) == ["serve: keeps capabilities"]


def test_the_controller_keeps_a_replica_through_voluntary_disruptions():
    budget = find("PodDisruptionBudget", "vibechat-controller")
    labels = find("Deployment", "vibechat-controller")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["minAvailable"] == 1 and budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In/Exists) against a pod's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        if e["operator"] == "Exists" and e["key"] not in labels:
            return False
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
    return True


def test_ingress_is_denied_unless_a_policy_opens_the_port():
    policies = [d for d in all_core_objects() if d["kind"] == "NetworkPolicy"]
    assert any(p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") for p in policies)
    for name, template in pod_templates().items():
        ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        opened = {port["port"] for p in policies if selects(p["spec"]["podSelector"], template["metadata"]["labels"])
                  for rule in p["spec"].get("ingress", []) for port in rule.get("ports", [])}
        from_peers = any(selects(p["spec"]["podSelector"], template["metadata"]["labels"]) and
                         any("ports" not in rule for rule in p["spec"].get("ingress", [])) for p in policies)
        assert ports <= opened or from_peers, name


def test_the_phase_pods_reach_each_other_on_any_port_and_only_vibechat_pods_reach_the_store():
    policy = find("NetworkPolicy", "vibechat-phases")
    phase_labels = render(phase_job("base_train"))["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    peers = [r for r in policy["spec"]["ingress"] if "ports" not in r]
    assert peers and selects(peers[0]["from"][0]["podSelector"], phase_labels)
    s3 = find("NetworkPolicy", "vibechat-s3")["spec"]["ingress"]
    assert [r["from"] for r in s3 if {"port": 8333} in r["ports"]] == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "vibechat"}}}]]


def chat_server_ingress(serve: dict) -> tuple[dict[str, int], list[dict]]:
    """The chat server's container ports by name, and the ingress rules of the policies that select its pod (not
    the default deny)."""
    ports = {p["name"]: p["containerPort"] for p in serve["spec"]["containers"][0]["ports"]}
    policies = [d for d in all_core_objects() if d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"]
                and selects(d["spec"]["podSelector"], serve["metadata"]["labels"])]
    return ports, [rule for p in policies for rule in p["spec"]["ingress"]]


def test_only_the_dashboard_reaches_the_chat_server_s_api_port():
    pods = pod_templates()
    ports, rules = chat_server_ingress(pods["vibechat-serve"])
    api = [rule for rule in rules if {"port": ports["http"]} in rule["ports"]]
    assert len(api) == 1 and api[0]["ports"] == [{"port": ports["http"]}]
    peers = [peer["podSelector"] for peer in api[0]["from"]]
    assert [name for name, t in pods.items() if any(selects(p, t["metadata"]["labels"]) for p in peers)] == ["vibechat-dashboard"]


def test_the_chat_server_s_metrics_port_alone_is_open_to_anywhere_and_is_the_one_prometheus_scrapes():
    serve = pod_templates()["vibechat-serve"]
    ports, rules = chat_server_ingress(serve)
    assert f"--metrics-port={ports['metrics']}" in serve["spec"]["containers"][0]["args"]
    assert int(serve["metadata"]["annotations"]["prometheus.io/port"]) == ports["metrics"] == 9400
    assert [rule for rule in rules if "from" not in rule] == [{"ports": [{"port": ports["metrics"]}]}]


def test_the_dashboard_chats_through_the_chat_server_service():
    env = find("Deployment", "vibechat-dashboard")["spec"]["template"]["spec"]["containers"][0]["env"]
    service = find("Service", "vibechat-serve")
    url = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{service['spec']['ports'][0]['port']}"
    assert {e["name"]: e["value"] for e in env}["VIBECHAT_SERVE_URL"] == url


# --- the image ----------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    result = subprocess.run([hadolint, "--format", "json", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert json.loads(result.stdout or "[]") == [] and result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_the_venv_git_and_caches_out_of_the_build_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "**/__pycache__"} <= set(ignored)


def test_image_dependencies_are_pinned():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.lock").read_text().splitlines()]
    pins = [line for line in lines if line]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][^\s;]*", p) for p in pins), pins


def test_chat_server_serves_the_configured_run_on_a_gpu_with_ready_and_health_probes():
    pod = find("Deployment", "vibechat-serve")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "jobs.chat_server"]
    assert {"--run=$(VIBECHAT_RUN)", "--source=$(VIBECHAT_SERVE_SOURCE)", "--host=0.0.0.0"} <= set(container["args"])
    assert set(find("ConfigMap", "vibechat-serve")["data"]) == {"VIBECHAT_RUN", "VIBECHAT_SERVE_SOURCE"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert find("Service", "vibechat-serve")["spec"]["ports"][0]["port"] == 8000
