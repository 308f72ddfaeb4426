"""KubernetesBackend and the leader Lease through the real `kubernetes` client, against kmock's Kubernetes
API emulator on loopback. The emulator keeps objects and serves list/watch/create/update/delete; the
training operator's part (conditions, pods) is played by the tests, which write what the operator would.
The client is synchronous, so it runs in a worker thread while the emulator serves on the event loop."""

import asyncio

import kmock
import pytest
from kubernetes import client

from jobs.backends import JobStatus, PhaseJob
from jobs.backends.kubernetes import (
    KubernetesBackend, KubernetesError, LeaseLock, hold_leadership, kubernetes_available,
)
from tests.kmock_fixtures import api_client, call, cluster  # noqa: F401 (cluster is a fixture)

pytestmark = pytest.mark.asyncio

NS = "vibechat"
JOBS = kmock.resource("kubeflow.org", "v1", "pytorchjobs")
PODS = kmock.resource("", "v1", "pods")
LEASES = kmock.resource("coordination.k8s.io", "v1", "leases")
JOB = PhaseJob(
    run_id="r1", phase="base", attempt=1, module="jobs.base_train", args=["--depth=20"],
    env={"VIBECHAT_STORE": "s3://vibechat/store", "VIBECHAT_RUN": "r1"}, nnodes=2, nproc_per_node=8, gpus_per_node=8,
)
CRASH_LOG = (
    "step 00012/00100 | loss 4.1234\n"
    "error: S3 refused access to s3://vibechat/store/runs/r1 (SignatureDoesNotMatch): "
    "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY\n"
    "[2026-11-25 09:00:00] torch.distributed.elastic.multiprocessing.api: failed (exitcode: 2)\n"
)






@pytest.fixture
def backend(cluster):
    return KubernetesBackend(NS, "registry.example/vibechat:0.1.0", api_client=api_client(cluster))




def set_conditions(cluster, *conditions: tuple[str, str]) -> None:
    """What the operator writes: (type, message) conditions, all True."""
    entries = [{"type": t, "status": "True", "reason": f"PyTorchJob{t}", "message": m} for t, m in conditions]
    cluster.objects[JOBS, NS, JOB.name].patch({"status": {"conditions": entries}})


def add_pod(cluster, name: str, replica: str, status: dict) -> None:
    labels = {"training.kubeflow.org/job-name": JOB.name, "training.kubeflow.org/replica-type": replica}
    cluster.objects[PODS, NS, name] = {"metadata": {"name": name, "namespace": NS, "labels": labels}, "status": status}


def crashed_trainer(restarts: int, log: str) -> dict:
    terminated = {"exitCode": 1, "reason": "Error", "message": log}
    return {"phase": "Running", "containerStatuses": [{
        "name": "pytorch", "restartCount": restarts, "ready": False, "image": "vibechat", "imageID": "",
        "state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": {"terminated": terminated},
    }]}


# --- submit, status, stop, logs ------------------------------------------------------------------------


async def test_submit_creates_the_rendered_job_with_the_run_labels(backend, cluster):
    await call(backend.submit, JOB)
    created = cluster.objects[JOBS, NS, JOB.name]
    assert created["metadata"]["labels"]["vibechat.run"] == "r1"
    assert created["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1


async def test_submitting_an_existing_job_adopts_it(backend, cluster):
    await call(backend.submit, JOB)
    set_conditions(cluster, ("Running", "running"))
    await call(backend.submit, JOB)  # a restarted controller: 409 from the API, not a second job
    assert len(cluster[kmock.action.CREATE]) == 2
    assert (await call(backend.status, JOB)).state == "running"


async def test_status_of_a_job_never_submitted_is_missing(backend):
    assert (await call(backend.status, JOB)).state == "missing"


async def test_status_follows_the_operator_conditions_to_success(backend, cluster):
    await call(backend.submit, JOB)
    assert (await call(backend.status, JOB)).state == "pending"
    set_conditions(cluster, ("Created", "created"))
    assert (await call(backend.status, JOB)).state == "pending"
    set_conditions(cluster, ("Created", "created"), ("Running", "running"))
    assert (await call(backend.status, JOB)).state == "running"
    set_conditions(cluster, ("Created", "created"), ("Succeeded", "PyTorchJob vibechat/x successfully completed."))
    assert (await call(backend.status, JOB)).state == "succeeded"


async def test_suspended_job_is_pending(backend, cluster):
    await call(backend.submit, JOB)
    set_conditions(cluster, ("Created", "created"), ("Suspended", "PyTorchJob x is suspended."))
    assert await call(backend.status, JOB) == JobStatus("pending", "suspended: PyTorchJob x is suspended.")


async def test_failed_condition_message_becomes_the_status_message(backend, cluster):
    await call(backend.submit, JOB)
    set_conditions(cluster, ("Created", "created"), ("Failed", "PyTorchJob vibechat/x is failed because 1 Master replica(s) failed."))
    status = await call(backend.status, JOB)
    assert (status.state, status.message) == ("failed", "PyTorchJob vibechat/x is failed because 1 Master replica(s) failed.")


async def test_restarting_job_is_running_and_names_its_last_crash(backend, cluster):
    await call(backend.submit, JOB)
    set_conditions(cluster, ("Restarting", "PyTorchJob x is restarting because 1 Master replica(s) failed."))
    add_pod(cluster, f"{JOB.name}-master-0", "master", crashed_trainer(1, CRASH_LOG))
    status = await call(backend.status, JOB)
    assert status.state == "running" and status.restarts == 1
    assert "exit 1: error: S3 refused access" in status.message and "AWS_SECRET_ACCESS_KEY" in status.message


async def test_crash_cut_from_the_termination_message_is_read_from_the_crashed_containers_log(backend, cluster):
    torchrun_report = "ChildFailedError:\n  exitcode  : 2 (pid: 42)\n  traceback : To enable traceback see: https://pytorch.org"
    await call(backend.submit, JOB)
    set_conditions(cluster, ("Running", "running"))
    add_pod(cluster, f"{JOB.name}-master-0", "master", crashed_trainer(1, torchrun_report))
    log_path = f"/api/v1/namespaces/{NS}/pods/{JOB.name}-master-0/log"
    cluster["get", log_path] << kmock.headers({"Content-Type": "text/plain"}) << CRASH_LOG.encode()
    for _ in range(2):
        status = await call(backend.status, JOB)
        assert "exit 1: error: S3 refused access" in status.message
    log_reads = cluster["get", log_path]
    assert len(log_reads) == 1 and log_reads[0].params["previous"] == "true"  # once per crash


async def test_crash_is_described_from_the_pod_whose_program_said_why(backend, cluster):
    peer_gone = "RuntimeError: Connection closed by peer [127.0.0.1]:35206. This is typically caused by a remote worker crashing."
    await call(backend.submit, JOB)
    set_conditions(cluster, ("Running", "running"))
    add_pod(cluster, f"{JOB.name}-master-0", "master", crashed_trainer(1, peer_gone))
    add_pod(cluster, f"{JOB.name}-worker-0", "worker", crashed_trainer(1, CRASH_LOG))
    cluster["get", f"/api/v1/namespaces/{NS}/pods/{JOB.name}-master-0/log"] << kmock.headers({"Content-Type": "text/plain"}) << peer_gone.encode()
    assert "exit 1: error: S3 refused access" in (await call(backend.status, JOB)).message


async def test_failed_job_keeps_the_crash_seen_before_the_operator_deleted_its_pods(backend, cluster):
    await call(backend.submit, JOB)
    set_conditions(cluster, ("Running", "running"))
    add_pod(cluster, f"{JOB.name}-master-0", "master", crashed_trainer(2, CRASH_LOG))
    await call(backend.status, JOB)
    cluster.objects[PODS, NS, f"{JOB.name}-master-0"].delete()  # cleanPodPolicy: Running
    set_conditions(cluster, ("Failed", "PyTorchJob vibechat/x has failed because it has reached the specified backoff limit"))
    status = await call(backend.status, JOB)
    assert status.state == "failed"
    assert status.message.startswith("exit 1: error: S3 refused access")
    assert status.message.endswith("(PyTorchJob vibechat/x has failed because it has reached the specified backoff limit)")


async def test_pending_job_says_why_its_pod_cannot_start(backend, cluster):
    await call(backend.submit, JOB)
    set_conditions(cluster, ("Created", "created"))
    unschedulable = {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    }]}
    add_pod(cluster, f"{JOB.name}-master-0", "master", unschedulable)
    status = await call(backend.status, JOB)
    assert status.state == "pending"
    assert status.message.endswith("cannot be scheduled: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")


async def test_status_reads_only_the_pods_of_its_job(backend, cluster):
    await call(backend.submit, JOB)
    await call(backend.status, JOB)
    pod_lists = cluster[kmock.action.LIST, PODS]
    assert pod_lists[-1].params["labelSelector"] == f"training.kubeflow.org/job-name={JOB.name}"


async def test_stop_deletes_the_job_and_stopping_again_is_harmless(backend, cluster):
    await call(backend.submit, JOB)
    await call(backend.stop, JOB)
    assert (await call(backend.status, JOB)).state == "missing"
    await call(backend.stop, JOB)


async def test_logs_are_the_master_pods_trainer_output(backend, cluster):
    path = f"/api/v1/namespaces/{NS}/pods/{JOB.name}-master-0/log"
    cluster["get", path] << kmock.headers({"Content-Type": "text/plain"}) << b"step 1/10 | loss 9.0000\n"
    assert await call(backend.logs, JOB) == "step 1/10 | loss 9.0000\n"
    assert cluster["get", path][0].params["container"] == "pytorch"


async def test_logs_of_a_job_without_pods_are_empty(backend):
    assert await call(backend.logs, JOB) == ""


async def test_forbidden_create_names_the_rbac_manifest(backend, cluster):
    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403, "reason": "Forbidden",
              "message": 'pytorchjobs.kubeflow.org is forbidden: User "system:serviceaccount:vibechat:default" cannot create'}
    cluster[kmock.action.CREATE, JOBS] << 403 << status
    with pytest.raises(KubernetesError, match=r"could not create PyTorchJob .*: 403 pytorchjobs.kubeflow.org is forbidden.*k8s/10-rbac.yaml"):
        await call(backend.submit, JOB)


# --- watch ---------------------------------------------------------------------------------------------


def job_object(name: str, version: str, condition: str) -> dict:
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": NS, "resourceVersion": version, "labels": {"vibechat.run": "r1"}},
            "status": {"conditions": [{"type": condition, "status": "True", "message": condition.lower()}]}}


async def test_watch_lists_again_after_410_gone_and_misses_no_change(backend, cluster):
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version: 5 (7)"}}
    lists = iter([
        {"metadata": {"resourceVersion": "5"}, "items": [job_object("j1", "5", "Created")]},
        {"metadata": {"resourceVersion": "9"}, "items": [job_object("j1", "9", "Succeeded")]},
    ])
    watches = iter([
        ({"type": "MODIFIED", "object": job_object("j1", "6", "Running")}, gone),
        ({"type": "DELETED", "object": job_object("j1", "10", "Succeeded")},),
    ])
    cluster[kmock.action.LIST, JOBS] << (lambda: next(lists))
    cluster[kmock.action.WATCH, JOBS] << (lambda: next(watches))

    events = backend.watch_jobs("r1", timeout_seconds=5)
    seen = [await call(next, events) for _ in range(4)]
    assert [(name, s.state) for name, s in seen] == [
        ("j1", "pending"), ("j1", "running"), ("j1", "succeeded"), ("j1", "missing"),
    ]
    watch_requests = cluster[kmock.action.WATCH, JOBS]
    assert [r.params["resourceVersion"] for r in watch_requests[:2]] == ["5", "9"]
    assert {r.params["labelSelector"] for r in cluster[kmock.action.LIST, JOBS]} == {"vibechat.run=r1"}


# --- is there a cluster? -------------------------------------------------------------------------------


async def test_kubernetes_is_available_where_the_pytorchjob_crd_is_served(cluster):
    available, reason = await call(kubernetes_available, api_client(cluster))
    assert available, reason


async def test_kubernetes_without_the_training_operator_is_not_available(kmock):
    available, reason = await call(kubernetes_available, api_client(kmock))
    assert not available and "install the Kubeflow training operator" in reason


async def test_kubernetes_that_does_not_answer_is_not_available(unused_tcp_port):
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{unused_tcp_port}"
    configuration.retries = 0
    available, reason = await call(kubernetes_available, client.ApiClient(configuration))
    assert not available and "did not answer" in reason


async def test_no_kubeconfig_and_no_pod_is_not_available(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    available, reason = await call(kubernetes_available)
    assert not available and "no Kubernetes configuration" in reason


# --- leader election -----------------------------------------------------------------------------------


def lease(holder: str, duration: int) -> dict:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "vibechat-controller", "namespace": NS, "resourceVersion": "1"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration,
                     "renewTime": "2026-11-25T09:00:00.000000Z", "leaseTransitions": 0}}


def candidate(kmock, identity: str) -> LeaseLock:
    return LeaseLock("vibechat-controller", NS, identity, lease_seconds=15, api_client=api_client(kmock))


async def test_first_candidate_creates_the_lease_and_leads(kmock):
    assert await call(candidate(kmock, "pod-a").try_acquire)
    assert kmock.objects[LEASES, NS, "vibechat-controller"]["spec"]["holderIdentity"] == "pod-a"


async def test_candidate_does_not_lead_while_the_holder_renews(kmock):
    assert await call(candidate(kmock, "pod-a").try_acquire)
    assert not await call(candidate(kmock, "pod-b").try_acquire)


async def test_candidate_takes_over_a_lease_left_unrenewed_for_its_duration(kmock):
    kmock.objects[LEASES, NS, "vibechat-controller"] = lease("pod-a", duration=1)
    b = candidate(kmock, "pod-b")
    assert not await call(b.try_acquire)  # b's own clock starts when it first sees this record
    await asyncio.sleep(1.2)
    assert await call(b.try_acquire)
    spec = kmock.objects[LEASES, NS, "vibechat-controller"]["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("pod-b", 1)


async def test_candidate_that_loses_the_compare_and_swap_does_not_lead(kmock):
    kmock.objects[LEASES, NS, "vibechat-controller"] = lease("", duration=15)
    conflict = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 409, "reason": "Conflict",
                "message": "Operation cannot be fulfilled on leases.coordination.k8s.io: the object has been modified"}
    kmock[kmock.action.UPDATE, LEASES] << 409 << conflict
    assert not await call(candidate(kmock, "pod-b").try_acquire)
    assert kmock[kmock.action.UPDATE, LEASES][0].data["metadata"]["resourceVersion"] == "1"


async def elect(kmock, identity: str, lost: list) -> None:
    await call(hold_leadership, identity, NS, lease_seconds=15, renew_deadline=0.5, retry_seconds=0.05,
               api_client=api_client(kmock), on_lost=lost.append)


async def test_leader_keeps_renewing_its_lease(kmock):
    lost = []
    await elect(kmock, "pod-a", lost)
    first = kmock.objects[LEASES, NS, "vibechat-controller"]["spec"]["renewTime"]
    for _ in range(100):
        await asyncio.sleep(0.05)
        if kmock.objects[LEASES, NS, "vibechat-controller"]["spec"]["renewTime"] != first:
            break
    assert kmock.objects[LEASES, NS, "vibechat-controller"]["spec"]["renewTime"] != first
    assert lost == []


async def test_leader_gives_up_when_another_replica_holds_the_lease(kmock):
    lost = []
    await elect(kmock, "pod-a", lost)
    kmock.objects[LEASES, NS, "vibechat-controller"].patch(lease("pod-b", duration=15))  # pod-b took it over
    for _ in range(100):
        if lost:
            break
        await asyncio.sleep(0.05)
    assert lost == ["pod-a lost the leader lease vibechat/vibechat-controller: another replica holds it"]


async def test_leader_gives_up_when_it_cannot_renew_before_the_deadline(kmock):
    lost = []
    await elect(kmock, "pod-a", lost)
    kmock[kmock.action.FETCH, LEASES] << 503 << {"kind": "Status", "code": 503, "message": "etcd is unavailable"}
    for _ in range(100):
        if lost:
            break
        await asyncio.sleep(0.05)
    assert len(lost) == 1 and lost[0].startswith("pod-a lost the leader lease vibechat/vibechat-controller: no renewal for 0.5s")


async def test_candidate_without_rights_to_the_lease_is_told_to_apply_the_rbac(kmock):
    forbidden = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403, "reason": "Forbidden",
                 "message": 'leases.coordination.k8s.io "vibechat-controller" is forbidden'}
    kmock[kmock.action.FETCH, LEASES] << 403 << forbidden
    with pytest.raises(KubernetesError, match=r"could not hold the leader Lease vibechat-controller .*403 .*k8s/10-rbac.yaml"):
        await elect(kmock, "pod-a", [])


async def test_candidate_waits_until_the_holders_lease_runs_out(kmock):
    kmock.objects[LEASES, NS, "vibechat-controller"] = lease("pod-a", duration=1)  # pod-a stopped renewing
    lost = []
    await elect(kmock, "pod-b", lost)
    assert kmock.objects[LEASES, NS, "vibechat-controller"]["spec"]["holderIdentity"] == "pod-b"
    assert len(kmock[kmock.action.FETCH, LEASES]) > 1  # it did not take the lease at its first look
