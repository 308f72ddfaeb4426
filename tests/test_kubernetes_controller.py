"""The controller driving runs as PyTorchJobs against kmock's Kubernetes API emulator on loopback, with a
real S3 store (SeaweedFS): a finished job is never submitted again, a new controller adopts a running
job, one leader acts, SIGTERM hands the Lease over, and the Role grants exactly the calls the code makes.
The tests write what the training operator would (conditions) and do what its TTL would (delete)."""

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import kmock
import pytest
import yaml

from jobs import controller, health, runstore
from jobs import pipeline as pl
from jobs.backends.kubernetes import KEEP_FINISHED_SECONDS, KubernetesBackend, LeaseLock
from jobs.config import load_config
from jobs.console import Console
from jobs.driver import Driver, phase_job
from tests.kmock_fixtures import api_client, call, cluster  # noqa: F401 (cluster is a fixture)
from vibechat import liveness
from vibechat.layout import in_run, liveness_key
from vibechat.storage import open_store

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parents[1]
NS = "vibechat"
IMAGE = "registry.example/vibechat:0.1.0"
JOBS = kmock.resource("kubeflow.org", "v1", "pytorchjobs")
LEASES = kmock.resource("coordination.k8s.io", "v1", "leases")






@pytest.fixture
def kubeconfig(cluster, tmp_path, monkeypatch) -> str:
    """A kubeconfig naming the emulator, for code that finds its cluster itself (serve, make_backend)."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(cluster.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": NS}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return str(path)


@pytest.fixture
def store(s3_url):
    return open_store(s3_url)


def new_run(store, run_id: str = "r1") -> pl.RunState:
    config = load_config("tiny")
    config["retries"] = {**config["retries"], "backoff_s": 0}  # a retry may start at once
    return runstore.create_run(store, "tiny", config, "kubernetes", run_id, owner=None)


def driver(store, cluster, owner: str, run_id: str = "r1") -> Driver:
    backend = KubernetesBackend(NS, IMAGE, api_client=api_client(cluster))
    return Driver(store, run_id, backend, owner, Console(), follow=False)




def created(cluster) -> list[str]:
    return [r.data["metadata"]["name"] for r in cluster[kmock.action.CREATE, JOBS]]


def operator_says(cluster, name: str, condition: str) -> None:
    """What the training operator writes into a job's status."""
    cluster.objects[JOBS, NS, name].patch({"status": {"conditions": [
        {"type": condition, "status": "True", "reason": f"PyTorchJob{condition}", "message": condition.lower()}]}})


def phase_of(store, name: str, run_id: str = "r1") -> pl.PhaseState:
    return runstore.read_run(store, run_id)[0].phases[name]


async def start_first_phase(store, cluster, d: Driver) -> tuple[str, str]:
    """Submit the run's first phase and let the driver see its job running: (phase, job name)."""
    await call(d.step)
    (name,) = created(cluster)
    phase = next(p for p, s in runstore.read_run(store, "r1")[0].phases.items() if s.state == pl.RUNNING)
    operator_says(cluster, name, "Running")
    await call(d.step)
    assert phase_of(store, phase).job_seen
    return phase, name


# --- never again an attempt seen finished ----------------------------------------------------------------


async def test_a_job_deleted_by_its_ttl_after_it_succeeded_is_not_submitted_again(store, cluster):
    new_run(store)
    d = driver(store, cluster, "ctl-a")
    phase, name = await start_first_phase(store, cluster, d)
    operator_says(cluster, name, "Succeeded")
    await call(d.step)
    assert phase_of(store, phase).state == pl.SUCCEEDED
    # only now, with the end in run.json, may the operator delete the job
    assert cluster.objects[JOBS, NS, name]["spec"]["runPolicy"]["ttlSecondsAfterFinished"] == KEEP_FINISHED_SECONDS
    del cluster.objects[JOBS, NS, name]
    await call(d.step)
    assert created(cluster)[0] == name and name not in created(cluster)[1:]
    assert len(created(cluster)) == 2  # the run moved on to its next phase


async def test_a_job_deleted_before_its_end_was_seen_is_a_failed_attempt_never_resubmitted(store, cluster):
    new_run(store)
    d = driver(store, cluster, "ctl-a")
    phase, name = await start_first_phase(store, cluster, d)
    del cluster.objects[JOBS, NS, name]
    await call(d.step)
    assert phase_of(store, phase).state == pl.RUNNING  # its process may still run: followed until its record expires
    record = liveness.read(store, "r1", phase, 1)
    liveness.write(store, "r1", phase, 1, liveness.Liveness(record.owner, time.time() - 1))
    await call(d.step)
    p = phase_of(store, phase)
    assert p.state == pl.PENDING and p.failures == 1 and "stopped renewing its liveness record" in p.error
    await call(d.step)
    assert created(cluster) == [name, name.removesuffix("-1") + "-2"]


async def test_a_job_deleted_before_its_end_was_seen_with_no_liveness_record_is_a_failed_attempt(store, cluster):
    new_run(store)
    d = driver(store, cluster, "ctl-a")
    phase, name = await start_first_phase(store, cluster, d)
    del cluster.objects[JOBS, NS, name]
    store.delete(in_run("r1", liveness_key(phase, 1)))
    await call(d.step)
    p = phase_of(store, phase)
    assert p.state == pl.PENDING and p.failures == 1 and "deleted before the controller saw it end" in p.error


async def test_a_job_recorded_but_never_created_is_created(store, cluster):
    run = new_run(store)
    phase = pl.next_action(run, time.time()).phase
    job = phase_job(run, store, phase, attempt=1)
    pl.mark_running(run, phase, 1, job.name, time.time())  # a controller that stopped right after this write
    runstore.write_run(store, run, runstore.read_run(store, "r1")[1])
    await call(driver(store, cluster, "ctl-b").step)
    assert created(cluster) == [job.name]


async def test_a_controller_killed_while_its_job_runs_is_replaced_by_one_that_adopts_the_job(store, cluster):
    new_run(store)
    phase, name = await start_first_phase(store, cluster, driver(store, cluster, "ctl-a"))
    run, version = runstore.read_run(store, "r1")
    run.lease.expires_at = 0  # ctl-a died: its lease on the run ran out
    runstore.write_run(store, run, version)
    adopted = health.ADOPTED._value.get()
    d = driver(store, cluster, "ctl-b")
    await call(d.step)
    operator_says(cluster, name, "Succeeded")
    await call(d.step)
    assert created(cluster) == [name] and phase_of(store, phase).state == pl.SUCCEEDED
    assert health.ADOPTED._value.get() == adopted + 1


# --- leader election ---------------------------------------------------------------------------------------


async def test_of_two_controllers_electing_a_leader_exactly_one_submits(store, cluster, kubeconfig):
    new_run(store)
    controllers = {name: (LeaseLock("vibechat-controller", NS, name, api_client=api_client(cluster)), {})
                   for name in ("ctl-a", "ctl-b")}
    for _ in range(3):
        for name, (lock, drivers) in controllers.items():
            if await call(lock.try_acquire):
                await call(controller.serve_pass, store, "kubernetes", name, drivers)
    (leader,) = [name for name, (_, drivers) in controllers.items() if drivers]
    assert cluster.objects[LEASES, NS, "vibechat-controller"]["spec"]["holderIdentity"] == leader
    assert len(created(cluster)) == 1


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"waited {seconds}s for {what}"
        await asyncio.sleep(0.1)


def get(port: int, path: str) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read().decode()


def lease_holder(cluster) -> str | None:
    try:
        return cluster.objects[LEASES, NS, "vibechat-controller"]["spec"].get("holderIdentity")
    except KeyError:
        return None


async def test_sigterm_releases_the_lease_so_the_other_replica_leads_within_5_seconds(store, cluster, kubeconfig):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    serve = subprocess.Popen([sys.executable, "-m", "jobs.controller", "serve", "--leader-elect", "--namespace", NS,
                              "--store", store.uri(), "--http-port", str(port), "--interval", "1"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        await wait_for(lambda: lease_holder(cluster), 60, "the controller to take the Lease")
        await wait_for(lambda: "vibechat_leader 1.0" in get(port, "/metrics"), 30, "its first pass as the leader")
        assert "vibechat_runs{state=\"pending\"} 0.0" in get(port, "/metrics")
        assert get(port, "/healthz") == "ok\n"
        serve.send_signal(signal.SIGTERM)
        assert await call(serve.wait, 30) == 0
        other = LeaseLock("vibechat-controller", NS, "ctl-b", api_client=api_client(cluster))
        started = time.monotonic()
        while not await call(other.try_acquire):  # a replica's retry period is 2 s
            assert time.monotonic() - started < 5, "the other replica did not lead within 5 s"
            await asyncio.sleep(0.2)
        assert lease_holder(cluster) == "ctl-b"
    finally:
        if serve.poll() is None:
            serve.kill()
        print(serve.communicate()[0])


# --- watch instead of polling ------------------------------------------------------------------------------


async def test_a_driver_waiting_for_its_job_wakes_on_a_change_not_a_timer(cluster):
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
           "metadata": {"name": "j1", "namespace": NS, "resourceVersion": "6", "labels": {"vibechat.run": "r9"}},
           "status": {"conditions": [{"type": "Running", "status": "True"}]}}

    cluster[kmock.action.LIST, JOBS] << {"metadata": {"resourceVersion": "5"}, "items": []}
    cluster[kmock.action.WATCH, JOBS] << (lambda: ({"type": "MODIFIED", "object": job},))
    backend = KubernetesBackend(NS, IMAGE, api_client=api_client(cluster))
    started = time.monotonic()
    await call(backend.idle)
    assert time.monotonic() - started < 10  # woken by the change; without one it waits RESYNC_SECONDS (30)
    assert cluster[kmock.action.WATCH, JOBS][0].params["resourceVersion"] == "5"


# --- RBAC ----------------------------------------------------------------------------------------------------


VERBS = {kmock.action.LIST: "list", kmock.action.WATCH: "watch", kmock.action.FETCH: "get",
         kmock.action.CREATE: "create", kmock.action.DELETE: "delete"}


def rbac_verb(request) -> str:
    if request.action == kmock.action.UPDATE:
        return "patch" if request.method == "PATCH" else "update"
    return VERBS[request.action]


async def test_the_role_grants_exactly_what_the_controller_calls(store, cluster):
    new_run(store)
    d = driver(store, cluster, "ctl-a")
    phase, name = await start_first_phase(store, cluster, d)
    await call(d.backend.logs, d.watching)
    cluster[kmock.action.LIST, JOBS] << {"metadata": {"resourceVersion": "5"}, "items": []}
    cluster[kmock.action.WATCH, JOBS] << (lambda: ({"type": "MODIFIED", "object": {"metadata": {"name": name, "resourceVersion": "6"}}},))
    await call(d.backend.idle)
    operator_says(cluster, name, "Succeeded")
    await call(d.step)
    await call(d.backend.stop, d.watching or phase_job(runstore.read_run(store, "r1")[0], store, phase, 1))
    lock = LeaseLock("vibechat-controller", NS, "ctl-a", api_client=api_client(cluster))
    for act in (lock.try_acquire, lock.try_acquire, lock.release):
        await call(act)
    calls = {(r.resource.group, r.resource.plural + (f"/{r.subresource}" if r.subresource else ""), rbac_verb(r))
             for action in kmock.action for r in cluster[action] if r.resource is not None}
    role = yaml.safe_load_all((ROOT / "k8s" / "10-rbac.yaml").read_text())
    rules = next(doc for doc in role if doc["kind"] == "Role")["rules"]
    granted = {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert calls == granted


async def test_serve_on_a_port_in_use_says_to_pick_another(tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "jobs.controller", "serve", "--backend", "local",
                                 "--store", str(tmp_path), "--http-port", str(port)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"cannot serve /healthz and /metrics on port {port}" in result.stderr and "pass another --http-port" in result.stderr
    assert "Traceback" not in result.stderr
