"""Phases as Kubeflow PyTorchJobs: render k8s/phases/pytorchjob.yaml for a PhaseJob, create it, follow its
conditions and pods, read its logs, delete it. Also the Lease-based leader election that lets two
controller replicas run while only one acts (hold_leadership).

This is the only module that imports the `kubernetes` client.
"""

import copy
import datetime
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import urllib3
import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from jobs.backends import JobStatus, PhaseJob
from jobs.config import CPU_RESOURCES, GPU_RESOURCES, KUBERNETES_DEFAULTS
from vibechat.common import VibechatError

TEMPLATE = Path(__file__).resolve().parents[2] / "k8s" / "phases" / "pytorchjob.yaml"
# where the controller Deployment mounts the ConfigMap vibechat-phase-template; optional, so absent after
# `kubectl apply -f k8s/`, and then the image's copy is used
TEMPLATE_ENV = "VIBECHAT_PHASE_TEMPLATE"
GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
CONTAINER = "pytorch"  # the operator only treats the container of this name as the trainer
GPU = "nvidia.com/gpu"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # Kueue admits a suspended job of a queue by unsuspending it
JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # set by the operator on every pod of a job
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
RESYNC_SECONDS = 30  # a driver checks its job at least this often; a watch event wakes it sooner
KEEP_FINISHED_SECONDS = 86400  # a finished job, its pods and logs stay this long after its end was recorded
MAX_NAME = 63  # the operator names a Service after each pod: a DNS-1035 label

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")  # ${NAME}; the kubelet's own $(VAR) is left alone


class KubernetesError(VibechatError):
    """The cluster refused or could not do something; the message says what to fix."""


# ---------------------------------------------------------------------------------------------------
# Rendering


def template_path() -> Path:
    """The phase template: the ConfigMap's copy where the controller has it mounted, else the image's."""
    mounted = os.environ.get(TEMPLATE_ENV)
    return Path(mounted) if mounted and Path(mounted).is_file() else TEMPLATE


def render_pytorchjob(
    job: PhaseJob, image: str, namespace: str, settings: dict | None = None, template: Path | None = None
) -> dict:
    """The PyTorchJob manifest for one attempt of one phase: the template filled in for its program, sized
    by job.resources and placed by `settings` (the config's kubernetes section; defaults for what it lacks)."""
    path = Path(template or template_path())
    if not path.is_file():
        raise KubernetesError(f"the PyTorchJob template {path} does not exist: restore k8s/phases/pytorchjob.yaml "
                              f"or point ${TEMPLATE_ENV} at a copy")
    settings = {**KUBERNETES_DEFAULTS, **(settings or {})}
    _check_names(job)
    store = job.env.get("VIBECHAT_STORE", "")
    if not store.startswith("s3://"):
        raise KubernetesError(
            f"phase pods cannot reach the store {store!r}: the kubernetes backend needs an s3:// VIBECHAT_STORE"
        )
    if not image or any(c.isspace() for c in image):
        raise KubernetesError(f"image {image!r} is not an image reference: set kubernetes.image in the run's config, "
                              "e.g. registry.example/vibechat:0.1.0")
    queue = settings["queue"]
    if queue is not None and (len(queue) > MAX_NAME or not _LABEL_VALUE.fullmatch(queue)):
        raise KubernetesError(f"kubernetes.queue {queue!r} cannot be a label value: name a Kueue LocalQueue "
                              "(at most 63 letters, digits, '-', '_' or '.')")
    values = {
        "NAME": job.name, "NAMESPACE": namespace, "RUN_ID": job.run_id, "PHASE": job.phase,
        "ATTEMPT": str(job.attempt), "IMAGE": image, "S3_SECRET": settings["s3_secret"], "MODULE": job.module,
        "NPROC_PER_NODE": str(job.nproc_per_node), "WORKERS": str(job.nnodes - 1),
    }

    def fill(match: re.Match) -> str:
        if match.group(1) not in values:
            raise KubernetesError(f"{path}: unknown placeholder {match.group(0)}; known: {', '.join(values)}")
        return values[match.group(1)]

    try:
        manifest = yaml.safe_load(_PLACEHOLDER.sub(fill, path.read_text()))
        replicas = manifest["spec"]["pytorchReplicaSpecs"]
        replicas["Master"]["template"]["spec"]["containers"]
    except (yaml.YAMLError, TypeError, KeyError) as e:
        raise KubernetesError(f"{path} is not a PyTorchJob with Master replicas ({type(e).__name__}: {e}): "
                              "restore it from k8s/phases/pytorchjob.yaml") from None
    if job.nnodes == 1:
        replicas.pop("Worker", None)
    elif "Worker" not in replicas:
        raise KubernetesError(f"{path} has no Worker replicas, so it runs on one node, but {job.name} asks for {job.nnodes}")
    run_policy = manifest["spec"].setdefault("runPolicy", {})
    if queue is not None:
        manifest["metadata"]["labels"][QUEUE_LABEL] = queue
        run_policy["suspend"] = True  # Kueue starts it when the queue has room
    if settings["gang_scheduling"]:
        run_policy["schedulingPolicy"] = {"minAvailable": job.nnodes}
        if settings["priority_class"]:
            run_policy["schedulingPolicy"]["priorityClass"] = settings["priority_class"]
    resources = pod_resources(job.resources, job.gpus_per_node)
    extra_env = {**settings["env"], **job.env}
    for spec in replicas.values():
        # Master and Worker share one pod spec through a YAML anchor: give each its own copy
        pod = spec["template"]["spec"] = copy.deepcopy(spec["template"]["spec"])
        container = next((c for c in pod["containers"] if c["name"] == CONTAINER), None)
        if container is None:
            raise KubernetesError(f"{path} has no container named {CONTAINER!r}: the operator runs only that one")
        container["args"] = list(job.args)
        container["env"] = [e for e in container.get("env", []) if e["name"] not in extra_env]
        container["env"] += [{"name": k, "value": str(v)} for k, v in sorted(extra_env.items())]
        container["resources"] = resources
        _place(pod, settings, job.gpus_per_node)
        for volume in pod.get("volumes", []):
            # the scratch volume is what ephemeral_storage pays for; /dev/shm counts against the memory
            if volume["name"] == "scratch":
                volume["emptyDir"]["sizeLimit"] = resources["limits"]["ephemeral-storage"]
            elif volume["name"] == "dshm":
                volume["emptyDir"]["sizeLimit"] = resources["limits"]["memory"]
    return manifest


def pod_resources(resources: dict, gpus: int) -> dict:
    """A trainer container's requests and limits. Memory and scratch space are limited to what is requested
    (a pod never grows into a neighbour's); CPU too where the phase asks for Guaranteed QoS, which the
    kubelet's static CPU manager needs to pin whole cores (NUMA-aligned with the GPUs by its topology manager)."""
    r = {**(GPU_RESOURCES if gpus else CPU_RESOURCES), **resources}
    requests = {"cpu": str(r["cpu"]), "memory": str(r["memory"]), "ephemeral-storage": str(r["ephemeral_storage"])}
    limits = {k: v for k, v in requests.items() if k != "cpu" or r["guaranteed"]}
    if gpus:
        requests[GPU] = limits[GPU] = gpus
    return {"requests": requests, "limits": limits}


def _place(pod: dict, settings: dict, gpus: int) -> None:
    """Where the pod may run and what it runs as, from the config's kubernetes section."""
    tolerations = list(settings["tolerations"])
    if gpus:  # GPU nodes are commonly tainted so that only pods asking for GPUs land there
        tolerations.append({"key": GPU, "operator": "Exists", "effect": "NoSchedule"})
    optional = {
        "nodeSelector": dict(settings["node_selector"]), "tolerations": tolerations, "affinity": settings["affinity"],
        "priorityClassName": settings["priority_class"], "serviceAccountName": settings["service_account"],
        "imagePullSecrets": [{"name": name} for name in settings["image_pull_secrets"]],
    }
    pod.update({key: value for key, value in optional.items() if value})


def _check_names(job: PhaseJob) -> None:
    """The names the operator derives from the job must be valid, or the cluster refuses the job."""
    for label, value in (("run id", job.run_id), ("phase", job.phase)):
        if len(value) > MAX_NAME or not _LABEL_VALUE.fullmatch(value):
            raise KubernetesError(
                f"{label} {value!r} cannot be a Kubernetes label value: use at most 63 letters, digits, '-', '_' or '.'"
            )
    if not _DNS1035.fullmatch(job.name):
        raise KubernetesError(
            f"job name {job.name!r} is not a DNS-1035 label: use a run id of lowercase letters, digits and '-'"
        )
    longest = f"{job.name}-worker-{job.nnodes - 2}" if job.nnodes > 1 else f"{job.name}-master-0"
    if len(longest) > MAX_NAME:
        limit = len(job.run_id) - (len(longest) - MAX_NAME)
        raise KubernetesError(
            f"job name {job.name!r} makes pod names like {longest!r}, longer than Kubernetes' {MAX_NAME} characters: "
            f"use a run id of at most {max(limit, 1)} characters"
        )


# ---------------------------------------------------------------------------------------------------
# Reading a job's state


def job_status(obj: dict) -> JobStatus:
    """Map a PyTorchJob's conditions to a JobStatus (without the pods' details)."""
    conditions = {c["type"]: c for c in obj.get("status", {}).get("conditions") or [] if c.get("status") == "True"}

    def message(kind: str) -> str:
        return conditions[kind].get("message") or conditions[kind].get("reason") or kind

    if "Failed" in conditions:
        return JobStatus("failed", message("Failed"))
    if "Succeeded" in conditions:
        return JobStatus("succeeded", message("Succeeded"))
    if "Suspended" in conditions:
        return JobStatus("pending", f"suspended: {message('Suspended')}")
    if "Restarting" in conditions:
        return JobStatus("running", f"restarting: {message('Restarting')}")
    if "Running" in conditions:
        return JobStatus("running")
    if "Created" in conditions:
        return JobStatus("pending", "waiting for its pods to start")
    return JobStatus("pending", "waiting for the training operator")


def error_exits(pods: list[dict]) -> list[tuple[str, int, dict, bool]]:
    """The trainer containers' latest exits with an error, master pod first: (pod name, its restart count,
    the `terminated` state, whether it is the previous container's)."""
    exits = []
    master_first = sorted(pods, key=lambda p: p["metadata"].get("labels", {}).get(REPLICA_TYPE_LABEL) != "master")
    for pod in master_first:
        for status in pod.get("status", {}).get("containerStatuses") or []:
            if status.get("name") != CONTAINER:
                continue
            for state, previous in ((status.get("state"), False), (status.get("lastState"), True)):
                ended = (state or {}).get("terminated")
                if ended and ended.get("exitCode"):
                    exits.append((pod["metadata"]["name"], status.get("restartCount", 0), ended, previous))
                    break
    return exits


def describe_exit(ended: dict, log: str) -> str:
    """'exit 2: error: ...': the exit code, a reason other than plain Error (OOMKilled), and the program's
    own last `error:` line from what it printed (else the last line printed)."""
    words = [f"exit {ended['exitCode']}"]
    if ended.get("reason") not in (None, "Error"):
        words.append(ended["reason"])
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    line = _error_line(log) or (lines[-1] if lines else "")
    return f"{' '.join(words)}: {line}" if line else " ".join(words)


def _error_line(text: str) -> str:
    """The last line that run_main printed for a VibechatError, or ''."""
    return next((line.strip() for line in reversed(text.splitlines()) if line.startswith("error: ")), "")


def pod_problem(pods: list[dict]) -> str:
    """Why a job's pods are not running yet, if Kubernetes says (unschedulable, image pull, missing config)."""
    for pod in pods:
        status = pod.get("status", {})
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                return f"pod {pod['metadata']['name']} cannot be scheduled: {condition.get('message', '')}".rstrip(": ")
        for container in status.get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing", "CrashLoopBackOff"):
                return f"pod {pod['metadata']['name']}: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    return ""


# ---------------------------------------------------------------------------------------------------
# The backend


def load_api_client() -> client.ApiClient:
    """In a pod, its ServiceAccount; elsewhere the current kubectl context ($KUBECONFIG or ~/.kube/config)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except ConfigException:
        try:
            # $KUBECONFIG as it is now: the client's own default was read when it was imported
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
        except (ConfigException, OSError) as e:
            raise KubernetesError(
                f"no Kubernetes configuration: not inside a pod, and no usable kubeconfig ({e}); "
                "set KUBECONFIG or `kubectl config use-context` to your cluster"
            ) from None
    return client.ApiClient(configuration)


def kubernetes_available(api_client: client.ApiClient | None = None) -> tuple[bool, str]:
    """Whether a Kubernetes API answers and serves PyTorchJobs (the training operator's CRD), and why not."""
    try:
        api_client = api_client or load_api_client()
    except KubernetesError as e:
        return False, str(e)
    host = api_client.configuration.host
    try:
        resources = client.CustomObjectsApi(api_client).get_api_resources(GROUP, VERSION, _request_timeout=(3, 10))
    except ApiException as e:
        if e.status == 404:
            return False, f"the Kubernetes API at {host} has no {GROUP}/{VERSION}: install the Kubeflow training operator"
        return False, f"the Kubernetes API at {host} refused API discovery: {e.status} {e.reason}"
    except urllib3.exceptions.HTTPError as e:
        return False, f"the Kubernetes API at {host} did not answer: {e}"
    if PLURAL not in {r.name for r in resources.resources}:
        return False, f"the Kubernetes API at {host} serves {GROUP}/{VERSION} without {PLURAL}: install the Kubeflow training operator"
    return True, f"the Kubernetes API at {host} serves PyTorchJobs"


class KubernetesBackend:
    """Runs each phase as a PyTorchJob in one namespace; the job name is the PhaseJob's deterministic name."""

    def __init__(
        self,
        namespace: str,
        image: str,
        api_client: client.ApiClient | None = None,
        settings: dict | None = None,
    ):
        self.namespace = namespace
        self.image = image
        self.settings = settings  # the config's kubernetes section: placement, S3 secret, extra env
        self.api_client = api_client or load_api_client()
        self.jobs = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        # job name -> (((pod, restart count), ...), description) of its last crash, kept because the operator
        # deletes a failed job's pods, and with them the error
        self._crashes: dict[str, tuple[tuple, str]] = {}

    def render(self, job: PhaseJob) -> dict:
        return render_pytorchjob(job, self.image, self.namespace, self.settings)

    def submit(self, job: PhaseJob) -> None:
        manifest = self.render(job)
        try:
            self.jobs.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, manifest)
        except ApiException as e:
            if e.status != 409:  # 409: it exists already (a restarted controller): adopt it
                raise self._error(e, f"create PyTorchJob {job.name}") from None

    def status(self, job: PhaseJob) -> JobStatus:
        try:
            obj = self.jobs.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, job.name)
        except ApiException as e:
            if e.status == 404:
                return JobStatus("missing")
            raise self._error(e, f"read PyTorchJob {job.name}") from None
        status = job_status(obj)
        pods = self._pods(job)
        status.restarts = sum(c.get("restartCount", 0) for p in pods for c in p.get("status", {}).get("containerStatuses") or [])
        crash = self._crash(job, pods)
        if status.state == "failed" and crash:
            status.message = f"{crash} ({status.message})"
        elif status.state == "running" and crash:
            status.message = f"restarted {status.restarts}x, last time after {crash}"
        elif status.state == "pending":
            status.message = pod_problem(pods) or status.message
        return status

    def _crash(self, job: PhaseJob, pods: list[dict]) -> str:
        """The job's last crash, described once per container restart and kept. When one pod fails the
        others fail too, as their peers vanish: describe the pod whose program said why (an `error:`
        line), else the master."""
        exits = error_exits(pods)
        seen = tuple((pod, restarts) for pod, restarts, _, _ in exits)
        if exits and self._crashes.get(job.name, ((), ""))[0] != seen:
            logs = [self._exit_log(pod, ended, previous) for pod, _, ended, previous in exits]
            said = next((i for i, log in enumerate(logs) if _error_line(log)), 0)
            self._crashes[job.name] = (seen, describe_exit(exits[said][2], logs[said]))
        return self._crashes.get(job.name, ((), ""))[1]

    def _exit_log(self, pod: str, ended: dict, previous: bool) -> str:
        """What a container printed before it exited: its termination message if that holds the error line,
        else its log (the message is only the log's last 2 KiB, and torchrun's failure report fills it)."""
        message = ended.get("message") or ""
        return message if _error_line(message) else self._log(pod, previous=previous) or message

    def _pods(self, job: PhaseJob) -> list[dict]:
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOB_NAME_LABEL}={job.name}").items
        except ApiException as e:
            raise self._error(e, f"list the pods of {job.name}") from None
        return self.api_client.sanitize_for_serialization(pods)

    def idle(self) -> None:
        """Wait until a PyTorchJob of the namespace changes, or RESYNC_SECONDS (pod-level news, such as a
        crash being restarted, changes no job condition)."""
        changed = job_changes(self.namespace, self.api_client)
        changed.wait(RESYNC_SECONDS)
        changed.clear()

    def recorded(self, job: PhaseJob) -> None:
        """The job's end is in run.json: let the operator delete the job KEEP_FINISHED_SECONDS after it finished.
        (The template sets no TTL, so no job vanishes before a controller saw how it ended.)"""
        patch = {"spec": {"runPolicy": {"ttlSecondsAfterFinished": KEEP_FINISHED_SECONDS}}}
        try:
            self.jobs.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, job.name, patch,
                                                     _content_type="application/merge-patch+json")
        except ApiException as e:
            if e.status != 404:
                raise self._error(e, f"set the TTL of PyTorchJob {job.name}") from None

    def stop(self, job: PhaseJob) -> None:
        """Delete the job; Kubernetes then deletes its pods. Stopping a missing job is not an error."""
        try:
            self.jobs.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, job.name)
        except ApiException as e:
            if e.status != 404:
                raise self._error(e, f"delete PyTorchJob {job.name}") from None
        self._crashes.pop(job.name, None)

    def logs(self, job: PhaseJob, tail_lines: int = 200) -> str:
        """The last lines of the master pod's trainer container; '' while there is no such pod or it has not started."""
        return self._log(f"{job.name}-master-0", tail_lines=tail_lines)

    def _log(self, pod: str, previous: bool = False, tail_lines: int = 200) -> str:
        try:
            return self.core.read_namespaced_pod_log(pod, self.namespace, container=CONTAINER, previous=previous, tail_lines=tail_lines)
        except ApiException as e:
            if e.status in (400, 404):
                return ""
            raise self._error(e, f"read the logs of pod {pod}") from None

    def watch_jobs(self, run_id: str | None = None, timeout_seconds: int = 300) -> Iterator[tuple[str, JobStatus]]:
        """(job name, status) of a run's PyTorchJobs (of every run without run_id): first each job's current
        state, then every change, without end. A deleted job reports 'missing'. When the API says our
        resourceVersion is too old (410 Gone) it lists again, so no change is lost."""
        selector = f"vibechat.run={run_id}" if run_id else "vibechat.run"
        resource_version = None
        while True:
            if resource_version is None:
                try:
                    listing = self.jobs.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, label_selector=selector)
                except ApiException as e:
                    raise self._error(e, "list PyTorchJobs") from None
                for obj in listing["items"]:
                    yield obj["metadata"]["name"], job_status(obj)
                resource_version = listing["metadata"]["resourceVersion"]
            try:
                # the server ends each watch after timeout_seconds; the next one starts where it ended
                for event in watch.Watch().stream(
                    self.jobs.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
                    label_selector=selector, resource_version=resource_version,
                    timeout_seconds=timeout_seconds, allow_watch_bookmarks=True,
                ):
                    obj = event["object"]
                    resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] == "BOOKMARK":
                        continue
                    state = JobStatus("missing") if event["type"] == "DELETED" else job_status(obj)
                    yield obj["metadata"]["name"], state
            except ApiException as e:
                if e.status != 410:
                    raise self._error(e, "watch PyTorchJobs") from None
                resource_version = None

    def _error(self, e: ApiException, doing: str) -> KubernetesError:
        return api_error(e, doing, self.namespace)


_job_changes: dict[str, threading.Event] = {}  # "<API server>/<namespace>" -> its Event
_job_changes_lock = threading.Lock()


def job_changes(namespace: str, api_client: client.ApiClient | None = None) -> threading.Event:
    """An Event set on every change to a vibechat PyTorchJob in the namespace, by one watching thread per
    namespace (started on the first call): the controller waits on it instead of polling."""
    backend = KubernetesBackend(namespace, image="", api_client=api_client)  # only its watch is used
    where = f"{backend.api_client.configuration.host}/{namespace}"
    with _job_changes_lock:
        if where not in _job_changes:
            _job_changes[where] = threading.Event()
            threading.Thread(target=_set_on_changes, args=(backend, _job_changes[where]), name=f"watch {where}",
                             daemon=True).start()
        return _job_changes[where]


def _set_on_changes(backend: "KubernetesBackend", changed: threading.Event) -> None:
    while True:
        try:
            for _ in backend.watch_jobs():
                changed.set()
        except Exception as e:  # whatever it was, this thread must live on: without it drivers wait a whole resync
            print(f"watching PyTorchJobs in {backend.namespace} failed ({str(e).splitlines()[0]}); "
                  f"checking every {RESYNC_SECONDS}s until it works again", file=sys.stderr, flush=True)
            changed.set()
            time.sleep(RESYNC_SECONDS)


def api_error(e: ApiException, doing: str, namespace: str) -> KubernetesError:
    """One line that says what failed, what the API said, and what usually fixes it."""
    try:
        detail = json.loads(e.body)["message"]
    except (TypeError, ValueError, KeyError):  # not every error body is a Status object
        detail = e.reason
    hint = {
        403: "; the controller's ServiceAccount may not do this: apply k8s/10-rbac.yaml and run as vibechat-controller",
        404: f"; is the Kubeflow training operator installed, and does namespace {namespace!r} exist?",
        400: "; the cluster rejected the manifest: fix the run's kubernetes settings or k8s/phases/pytorchjob.yaml",
        422: "; the cluster rejected the manifest: fix the run's kubernetes settings or k8s/phases/pytorchjob.yaml",
    }.get(e.status, "")
    return KubernetesError(f"could not {doing} in namespace {namespace}: {e.status} {detail}{hint}")


# ---------------------------------------------------------------------------------------------------
# Leader election


class LeaseLock:
    """Leadership through a coordination.k8s.io/v1 Lease. The holder renews it; a candidate takes it only
    after watching it go unrenewed for its whole duration by its own clock (so clock skew between nodes
    does not matter), and every write carries the resourceVersion it read, so the API server refuses it
    (409) if another candidate wrote in between: two candidates never both win."""

    def __init__(self, name: str, namespace: str, identity: str, lease_seconds: int = 15, api_client: client.ApiClient | None = None):
        self.name, self.namespace, self.identity = name, namespace, identity
        self.lease_seconds = lease_seconds
        self.api = client.CoordinationV1Api(api_client or load_api_client())
        self._seen = None  # (holder, renewTime) when last read
        self._seen_since = 0.0  # time.monotonic() when that record first appeared

    def try_acquire(self) -> bool:
        """Take the lease if it is free or expired, renew it if ours; True if this identity holds it now."""
        now = _micro_time()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            body = {
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                         "acquireTime": now, "renewTime": now, "leaseTransitions": 0},
            }
            return self._write(lambda: self.api.create_namespaced_lease(self.namespace, body))
        spec = lease.spec
        record = (spec.holder_identity, spec.renew_time)
        if record != self._seen:
            self._seen, self._seen_since = record, time.monotonic()
        change = {"holderIdentity": self.identity, "renewTime": now, "leaseDurationSeconds": self.lease_seconds}
        if spec.holder_identity != self.identity:
            duration = spec.lease_duration_seconds or self.lease_seconds
            if spec.holder_identity and time.monotonic() < self._seen_since + duration:
                return False
            change.update(acquireTime=now, leaseTransitions=(spec.lease_transitions or 0) + 1)
        return self._patch(lease.metadata.resource_version, change)

    def release(self) -> bool:
        """Give the lease up if this identity holds it, so another candidate takes it at its next try instead
        of waiting out the duration; True if it was ours and is free now."""
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        if lease.spec.holder_identity != self.identity:
            return False
        return self._patch(lease.metadata.resource_version, {"holderIdentity": None, "renewTime": _micro_time()})

    def _patch(self, resource_version: str | None, spec: dict) -> bool:
        # a merge patch that names a resourceVersion is a compare-and-swap: the API server answers 409
        # if the Lease changed since that version
        body = {"metadata": {"resourceVersion": resource_version}, "spec": spec}
        return self._write(lambda: self.api.patch_namespaced_lease(
            self.name, self.namespace, body, _content_type="application/merge-patch+json"))

    @staticmethod
    def _write(write: Callable[[], object]) -> bool:
        try:
            write()
        except ApiException as e:
            if e.status == 409:  # another candidate wrote first
                return False
            raise
        return True


def _micro_time() -> str:
    """Now as a Kubernetes MicroTime: RFC 3339 with exactly six fractional digits."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def hold_leadership(
    identity: str,
    namespace: str,
    name: str = "vibechat-controller",
    lease_seconds: int = 15,
    renew_deadline: float = 10,
    retry_seconds: float = 2,
    api_client: client.ApiClient | None = None,
    on_lost: Callable[[str], None] | None = None,
) -> LeaseLock:
    """Block until `identity` holds the Lease `namespace/name`, then keep renewing it every retry_seconds
    from a background thread. When another replica holds it, or no renewal succeeded for renew_deadline
    seconds (less than lease_seconds, so this replica stops before another may start), call on_lost
    with the reason; by default that ends the process at once, so it stops acting and its pod restarts
    as a fresh candidate. Returns the lock, to release() on shutdown."""
    lock = LeaseLock(name, namespace, identity, lease_seconds, api_client)
    while not _try(lock, namespace):
        time.sleep(retry_seconds)
    renewing = threading.Thread(
        target=_keep_renewing, args=(lock, renew_deadline, retry_seconds, on_lost or _exit), name="leader-lease", daemon=True,
    )
    renewing.start()
    return lock


def _try(lock: LeaseLock, namespace: str) -> bool:
    """One attempt to lead: a refusal (RBAC, no namespace) is an error; a busy or unreachable API is a retry."""
    try:
        return lock.try_acquire()
    except ApiException as e:
        if 400 <= (e.status or 0) < 500:
            raise api_error(e, f"hold the leader Lease {lock.name}", namespace) from None
        return False
    except urllib3.exceptions.HTTPError:
        return False


def _keep_renewing(lock: LeaseLock, renew_deadline: float, retry_seconds: float, on_lost: Callable[[str], None]) -> None:
    renewed_at = time.monotonic()
    while True:
        time.sleep(retry_seconds)
        try:
            if lock.try_acquire():
                renewed_at = time.monotonic()
                continue
            reason = "another replica holds it"
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            if time.monotonic() - renewed_at < renew_deadline:
                continue  # still ours for a while: try again
            reason = f"no renewal for {renew_deadline:g}s ({str(e).splitlines()[0]})"
        on_lost(f"{lock.identity} lost the leader lease {lock.namespace}/{lock.name}: {reason}")
        return


def _exit(message: str) -> None:
    print(f"{message}; exiting so that a fresh start competes again", file=sys.stderr, flush=True)
    os._exit(1)  # at once: no cleanup code may act as leader any more
