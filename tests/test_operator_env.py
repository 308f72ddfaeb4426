"""A phase under torchrun with exactly the environment that the Kubeflow training operator (release 1.9,
pkg/controller.v1/pytorch/envvar.go and master.go) and the kubelet give the trainer container of each
pod. Each "pod" of a rendered PyTorchJob runs here as one torchrun process of its container command;
they meet on loopback (the operator's MASTER_ADDR is the Service <job>-master-0) and use one real S3
store, as pods do. What the pod could not see here is kept out: the test's own AWS_* and VIBECHAT_*."""

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from jobs.backends import PhaseJob
from jobs.backends.kubernetes import describe_exit, error_exits, render_pytorchjob
from tests.conftest import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, free_port
from vibechat.dataset import write_shard
from vibechat.storage import open_store

ROOT = Path(__file__).resolve().parents[1]
RUN = "run-261125-093000"
PROBE = "tests.operator_probe"
SECRET = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}


def phase_job(store_url: str, module: str = "jobs.base_train", nnodes: int = 2, args: tuple = ()) -> PhaseJob:
    return PhaseJob(RUN, module.removeprefix("jobs."), 1, module, list(args),
                    {"VIBECHAT_STORE": store_url, "VIBECHAT_RUN": RUN}, nnodes=nnodes, nproc_per_node=1, gpus_per_node=0)


def config_map(endpoint: str) -> dict:
    """k8s/20-config.yaml's variables, with the S3 endpoint moved to the loopback server."""
    data = next(yaml.safe_load_all((ROOT / "k8s" / "20-config.yaml").read_text()))["data"]
    return {**data, "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": S3_REGION}


def pod_env(manifest: dict, replica: str, index: int, master_port: int, config: dict, secret: dict) -> dict:
    """The trainer container's variables: envFrom (ConfigMap, then Secret), the template's env, then
    what the operator appends to every container of a job with a Master."""
    spec = manifest["spec"]
    container = spec["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]
    env = {}
    for source in container.get("envFrom", []):
        env.update(config if "configMapRef" in source else secret)
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    nnodes = sum(r["replicas"] for r in spec["pytorchReplicaSpecs"].values())
    rank = index + 1 if replica == "Worker" else index
    env.update({
        "PYTHONUNBUFFERED": "0",
        "MASTER_PORT": str(master_port), "PET_MASTER_PORT": str(master_port),
        "MASTER_ADDR": "127.0.0.1", "PET_MASTER_ADDR": "127.0.0.1",
        "WORLD_SIZE": str(nnodes * int(spec["nprocPerNode"])), "RANK": str(rank),  # pods, not processes
        "PET_NPROC_PER_NODE": spec["nprocPerNode"], "PET_NODE_RANK": str(rank), "PET_NNODES": str(nnodes),
    })
    return env


def kubelet_expand(arg: str, env: dict) -> str:
    """The kubelet's $(VAR) substitution in a container's command and args; unknown references stay."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def start_pod(manifest: dict, replica: str, index: int, master_port: int, config: dict, secret: dict,
              log: Path, module: str | None = None) -> subprocess.Popen:
    """Start one pod's trainer container as a process; `module` replaces the program after `-m`."""
    container = manifest["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]
    env = pod_env(manifest, replica, index, master_port, config, secret)
    argv = [kubelet_expand(a, env) for a in container["command"] + container["args"]]
    if module:
        argv[argv.index("-m") + 1] = module
    # like the image: the venv first on PATH, the project on PYTHONPATH, a HOME of its own
    machine = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
               "HOME": str(log.parent), "AWS_EC2_METADATA_DISABLED": "true"}  # no credential lookups off this machine
    return subprocess.Popen(argv, env={**machine, **env}, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)


def run_pods(manifest: dict, endpoint: str, tmp_path: Path, secret: dict = SECRET, module: str | None = None) -> list[tuple[int, str]]:
    """Run every pod of the job to its end; (exit code, output) of each, master first."""
    port = free_port()
    pods = [(kind, i) for kind, spec in manifest["spec"]["pytorchReplicaSpecs"].items() for i in range(spec["replicas"])]
    logs = [tmp_path / f"{kind.lower()}-{i}.log" for kind, i in pods]
    procs = [start_pod(manifest, kind, i, port, config_map(endpoint), secret, log, module) for (kind, i), log in zip(pods, logs)]
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(code, log.read_text()) for code, log in zip(codes, logs)]


def test_master_and_worker_pods_form_one_process_group_over_one_store(s3_url, s3_env, tmp_path):
    manifest = render_pytorchjob(phase_job(s3_url), "vibechat:test", "vibechat")
    results = run_pods(manifest, s3_env, tmp_path, module=PROBE)
    assert [code for code, _ in results] == [0, 0], results
    store = open_store(f"{s3_url}/runs/{RUN}")
    records = [json.loads(store.get_text(f"probe/rank_{r}.json")) for r in (0, 1)]
    assert records == [
        {"rank": 0, "local_rank": 0, "world_size": 2, "node_rank": 0, "rank_sum": 1},
        {"rank": 1, "local_rank": 0, "world_size": 2, "node_rank": 1, "rank_sum": 1},
    ]


def test_one_pod_cpu_phase_runs_as_a_process_group_of_one(s3_url, s3_env, tmp_path):
    # the operator sets RANK=0 and WORLD_SIZE=1 but no LOCAL_RANK: the template's torchrun completes the set
    manifest = render_pytorchjob(phase_job(s3_url, "jobs.report", nnodes=1), "vibechat:test", "vibechat")
    [(code, output)] = run_pods(manifest, s3_env, tmp_path, module=PROBE)
    assert code == 0, output
    record = json.loads(open_store(f"{s3_url}/runs/{RUN}").get_text("probe/rank_0.json"))
    assert (record["rank"], record["world_size"]) == (0, 1)


def test_wrong_s3_secret_fails_the_phase_with_a_message_naming_the_key(s3_url, s3_env, tmp_path):
    manifest = render_pytorchjob(phase_job(s3_url, nnodes=1), "vibechat:test", "vibechat")
    wrong = {**SECRET, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    [(code, output)] = run_pods(manifest, s3_env, tmp_path, secret=wrong, module=PROBE)
    assert code != 0
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "S3 refused access" in errors[0] and "AWS_SECRET_ACCESS_KEY" in errors[0]
    # what the backend reports from the pod status the kubelet writes (FallbackToLogsOnError keeps the
    # log's last 2 KiB) and the crashed container's log
    pod = {"metadata": {"name": "master-0", "labels": {"training.kubeflow.org/replica-type": "master"}},
           "status": {"containerStatuses": [{"name": "pytorch", "restartCount": 1,
                                             "lastState": {"terminated": {"exitCode": code, "message": output[-2048:]}}}]}}
    [(_, _, ended, previous)] = error_exits([pod])
    crash = describe_exit(ended, output)
    assert previous and crash.startswith(f"exit {code}: error: S3 refused access") and "AWS_SECRET_ACCESS_KEY" in crash


def test_missing_s3_secret_fails_the_phase_with_a_message_naming_the_keys(s3_url, s3_env, tmp_path):
    # the template's secretRef is optional: without the Secret the pod starts and the phase says what is missing
    manifest = render_pytorchjob(phase_job(s3_url, nnodes=1), "vibechat:test", "vibechat")
    [(code, output)] = run_pods(manifest, s3_env, tmp_path, secret={}, module=PROBE)
    assert code != 0
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "AWS_ACCESS_KEY_ID" in errors[0] and "AWS_SECRET_ACCESS_KEY" in errors[0]


def write_corpus(store_url: str, dataset: str) -> None:
    """Two small shards (train, val) of standard library docstrings, in the store's data layout."""
    modules = [importlib.import_module(m) for m in ("argparse", "collections", "json", "os", "pathlib", "re", "subprocess", "functools")]
    docs = [inspect.getdoc(obj) for m in modules for obj in (m, *vars(m).values()) if callable(obj) or obj is m]
    docs = [d for d in dict.fromkeys(docs) if d and len(d) > 200]
    store = open_store(store_url)
    write_shard(store, dataset, 0, [d for i, d in enumerate(docs) if i % 10], row_group_size=4)
    write_shard(store, dataset, 1, docs[::10], row_group_size=4)


def test_base_train_runs_two_steps_across_master_and_worker_pods(s3_url, s3_env, tmp_path):
    # what the data and tokenizer phases leave in the store: a small corpus, and a tokenizer the real program trains
    dataset = {"VIBECHAT_DATASET": "stdlib-docs"}
    write_corpus(s3_url, dataset["VIBECHAT_DATASET"])
    tok_train = [sys.executable, "-m", "jobs.tok_train", "--vocab-size=512", "--max-chars=200000"]
    subprocess.run(tok_train, env={**os.environ, "VIBECHAT_STORE": s3_url, "VIBECHAT_RUN": RUN, **dataset},
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    args = ("--depth=2", "--max-seq-len=64", "--device-batch-size=2", "--total-batch-size=256", "--num-iterations=2",
            "--eval-every=2", "--eval-tokens=256", "--save-every=2", "--device=cpu")
    job = phase_job(s3_url, args=args)
    manifest = render_pytorchjob(replace(job, env={**job.env, **dataset}), "vibechat:test", "vibechat")
    results = run_pods(manifest, s3_env, tmp_path)
    assert [code for code, _ in results] == [0, 0], results
    assert "step 2/2 | loss" in results[0][1]
    checkpoints = open_store(f"{s3_url}/runs/{RUN}/checkpoints/base/d2")
    assert {"meta_000002.json", "optim_000002_rank0.pt", "optim_000002_rank1.pt"} <= set(checkpoints.list())
