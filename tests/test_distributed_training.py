"""Pretraining as a process group on CPU (gloo): two processes under one torchrun, two one-process "nodes"
set up the way the Kubeflow operator sets up pods, a rank or a whole node killed mid-run, and the restart.
These are the code paths of a multi-GPU run (DistAdamW, DistMuon, per-rank optimizer and loader state, the
checkpoint barrier) on the backend that runs here. One uninterrupted two-process run is the reference the
others must reproduce bit for bit."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import free_port
from tests.phase_fixtures import REPO, make_store, phase_env, run_phase
from vibechat.checkpoint_manager import find_last_step, load_checkpoint

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
# 2 sequences x 32 tokens x 2 ranks = 128 tokens per step, no accumulation; enough steps that a rank
# killed after the first checkpoint dies mid-run
ARGS = ["--depth=1", "--max-seq-len=32", "--device-batch-size=2", "--total-batch-size=128", "--num-iterations=40",
        "--eval-every=10", "--eval-tokens=128", "--save-every=10", "--keep-last=0", "--dtype=float32"]
SAVED_STEPS = [10, 20, 30, 40]
TEARDOWN_S = 60  # a job with a dead rank must be over by then, not wait out the collective timeout (10-30 min)


def checkpoint_dir(root: str) -> str:
    return f"{root}/runs/r1/checkpoints/base/d1"


def final_weights(root: str) -> dict:
    step = find_last_step(checkpoint_dir(root))
    return load_checkpoint(checkpoint_dir(root), step, "cpu")[0]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun this test started and its workers (each worker has a session of its own)."""
    if proc.poll() is not None:
        return
    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted two-process run in which every rank also writes its own weights at each checkpoint."""
    root = tmp_path_factory.mktemp("reference")
    probe_dir = root / "probe"
    probe_dir.mkdir()
    env = {**make_store(str(root / "store")), "VIBECHAT_PROBE_DIR": str(probe_dir)}
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "tests.rank_weights_probe", *ARGS],
                            env=phase_env(env), cwd=REPO, capture_output=True, text=True, timeout=300)
    return result, str(root / "store"), probe_dir


def test_two_process_run_commits_both_ranks_optimizer_state_under_one_meta_per_step(reference):
    result, root, _ = reference
    assert result.returncode == 0, result.stdout + result.stderr
    assert "step 40/40 | loss" in result.stdout
    files = set(os.listdir(checkpoint_dir(root)))
    expected = {name for s in SAVED_STEPS for name in
                (f"model_{s:06d}.pt", f"meta_{s:06d}.json", f"optim_{s:06d}_rank0.pt", f"optim_{s:06d}_rank1.pt")}
    assert files == expected


def test_both_ranks_hold_identical_weights_at_every_checkpoint(reference):
    result, root, probe_dir = reference
    assert result.returncode == 0, result.stdout + result.stderr
    for step in SAVED_STEPS:
        rank0, rank1 = (torch.load(probe_dir / f"rank{r}_step{step:06d}.pt") for r in (0, 1))
        assert_same_weights(rank0, rank1)
        assert_same_weights(rank0, load_checkpoint(checkpoint_dir(root), step, "cpu")[0])


def operator_env(node: int, port: int) -> dict:
    """What the training operator puts in the environment of pod `node` of a two-pod, one-process-per-pod job."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port), "PET_NNODES": "2", "PET_NODE_RANK": str(node), "PET_NPROC_PER_NODE": "1",
            "WORLD_SIZE": "2", "RANK": str(node)}


def start_nodes(env: dict, logs: list[Path]) -> list[subprocess.Popen]:
    """Two "nodes" on this host, each a bare `torchrun -m jobs.base_train` as in a pod, logging to its own file."""
    port = free_port()
    return [subprocess.Popen([TORCHRUN, "-m", "jobs.base_train", *ARGS], cwd=REPO, stdout=log.open("w"),
                             stderr=subprocess.STDOUT, env={**phase_env(env), **operator_env(node, port)})
            for node, log in enumerate(logs)]


def test_two_nodes_set_up_only_by_the_operators_variables_train_the_same_model(reference, tmp_path):
    # no torchrun flags: --nnodes, --node-rank, --nproc-per-node, --master-addr and --master-port come from PET_*
    root = str(tmp_path / "store")
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = start_nodes(make_store(root), logs)
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            kill_tree(p)
    assert codes == [0, 0], [log.read_text() for log in logs]
    assert "step 40/40 | loss" in logs[0].read_text()
    assert {"optim_000040_rank0.pt", "optim_000040_rank1.pt"} <= set(os.listdir(checkpoint_dir(root)))
    assert_same_weights(final_weights(root), final_weights(reference[1]))


def test_losing_the_worker_node_fails_the_master_node(tmp_path):
    # a pod killed whole (OOM, eviction): its torchrun and its rank die together, so only the collectives
    # of the master's rank can notice; the master pod must fail, not wait, for the operator to restart the job
    root = str(tmp_path / "store")
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = start_nodes(make_store(root), logs)
    try:
        while "saved checkpoint step 10" not in logs[0].read_text() and procs[0].poll() is None:
            time.sleep(0.1)
        worker = psutil.Process(procs[1].pid)
        for p in [worker, *worker.children(recursive=True)]:
            p.kill()
        try:
            code = procs[0].wait(timeout=TEARDOWN_S)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        for p in procs:
            kill_tree(p)
    log = logs[0].read_text()
    assert "saved checkpoint step 10" in log, log
    assert code is not None, f"the master node still ran {TEARDOWN_S} s after the worker node died"
    assert code != 0 and "step 40/40" not in log


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A two-process run whose rank 1 gets SIGKILL right after the first checkpoint:
    (torchrun's exit code or None if it still ran TEARDOWN_S later, its output, the store, the env)."""
    root = str(tmp_path_factory.mktemp("killed") / "store")
    env = make_store(root)
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "jobs.base_train", *ARGS],
                            env=phase_env(env), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ""
    try:
        for line in proc.stdout:
            output += line
            if line.startswith("saved checkpoint step 10"):
                [rank1] = [c for c in psutil.Process(proc.pid).children() if c.environ().get("RANK") == "1"]
                rank1.send_signal(signal.SIGKILL)
                break
        try:
            output += proc.communicate(timeout=TEARDOWN_S)[0]
        except subprocess.TimeoutExpired:
            pass
        code = proc.poll()
    finally:
        kill_tree(proc)
    return code, output, root, env


def test_killing_one_rank_fails_the_whole_job(killed):
    code, output, _, _ = killed
    assert "saved checkpoint step 10" in output, output
    assert code is not None, f"torchrun still running {TEARDOWN_S} s after rank 1 was killed"
    assert code != 0
    assert "step 40/40" not in output


def test_restart_after_a_killed_rank_resumes_from_the_last_commit_to_the_uninterrupted_weights(killed, reference):
    _, _, root, env = killed
    last = find_last_step(checkpoint_dir(root))
    assert 10 <= last < 40
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "jobs.base_train", *ARGS],
                            env=phase_env(env), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming from step {last} " in result.stdout
    assert "step 40/40 | loss" in result.stdout
    assert_same_weights(final_weights(root), final_weights(reference[1]))


def test_resume_with_another_rank_count_names_both_counts(tmp_path):
    env = make_store(str(tmp_path))
    short = [a if not a.startswith("--num-iterations") else "--num-iterations=10" for a in ARGS]
    assert run_phase("jobs.base_train", short, env).returncode == 0
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "jobs.base_train", *ARGS],
                            env=phase_env(env), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "was written by 1 ranks but this run has 2" in result.stdout + result.stderr
