"""Base training: runs, checkpoints, and resumes exactly after a kill."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.phase_fixtures import REPO, make_store, phase_env, run_phase
from vibechat.checkpoint_manager import find_last_step, load_checkpoint

ARGS = ["--depth=1", "--max-seq-len=32", "--device-batch-size=2", "--total-batch-size=128", "--num-iterations=6",
        "--eval-every=3", "--eval-tokens=128", "--save-every=2", "--dtype=float32"]


def final_state(root: str):
    ckpt = f"{root}/runs/r1/checkpoints/base/d1"
    step = find_last_step(ckpt)
    model, _, meta = load_checkpoint(ckpt, step, "cpu")
    return step, model, meta


def losses(root: str) -> dict[int, float]:
    lines = open(f"{root}/runs/r1/metrics/base.jsonl").read().splitlines()
    return {r["step"]: r["raw_loss"] for r in map(json.loads, lines) if "raw_loss" in r}


def test_base_train_runs_to_the_end_and_commits_a_checkpoint(tmp_path):
    env = make_store(str(tmp_path))
    result = run_phase("jobs.base_train", ARGS, env)
    assert result.returncode == 0, result.stderr
    step, _, meta = final_state(str(tmp_path))
    assert step == 6 and meta["val_bpb"] > 0
    assert "step 6/6" in result.stdout


def test_each_training_record_carries_the_hosts_cpu_use(tmp_path):
    assert run_phase("jobs.base_train", ARGS, make_store(str(tmp_path))).returncode == 0
    records = [json.loads(line) for line in open(f"{tmp_path}/runs/r1/metrics/base.jsonl")]
    cpu = [r["cpu_percent"] for r in records if "raw_loss" in r]
    assert len(cpu) == 6 and all(0 <= c <= 100 for c in cpu)


def test_killed_run_resumes_on_the_same_loss_curve(tmp_path):
    straight, killed = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_phase("jobs.base_train", ARGS, make_store(straight)).returncode == 0

    env = make_store(killed)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.base_train", *ARGS], env=phase_env(env), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "saved checkpoint step 4" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert find_last_step(f"{killed}/runs/r1/checkpoints/base/d1") == 4
    resumed = run_phase("jobs.base_train", ARGS, env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 4" in resumed.stdout

    assert losses(killed) == pytest.approx(losses(straight), rel=1e-6, abs=1e-6)
    (_, a, _), (_, b, _) = final_state(straight), final_state(killed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6)


def test_a_phase_resumed_from_an_earlier_checkpoint_records_each_step_once(tmp_path):
    env = make_store(str(tmp_path))
    assert run_phase("jobs.base_train", ARGS, env).returncode == 0
    # as if killed after logging step 6 but before committing it: the resumed attempt replays 5 and 6
    (tmp_path / "runs/r1/checkpoints/base/d1/meta_000006.json").unlink()
    resumed = run_phase("jobs.base_train", ARGS, env)
    assert "resuming from step 4" in resumed.stdout, resumed.stderr
    records = [json.loads(line) for line in open(f"{tmp_path}/runs/r1/metrics/base.jsonl")]
    train_steps = [r["step"] for r in records if "raw_loss" in r]
    eval_steps = [r["step"] for r in records if "val_bpb" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6] and eval_steps == [0, 3, 6]


def test_checkpoints_older_than_the_newest_two_are_deleted_as_the_run_goes(tmp_path):
    assert run_phase("jobs.base_train", ARGS, make_store(str(tmp_path))).returncode == 0  # saves at 2, 4, 6
    assert sorted(os.listdir(tmp_path / "runs/r1/checkpoints/base/d1")) == [
        "meta_000004.json", "meta_000006.json", "model_000004.pt", "model_000006.pt",
        "optim_000004_rank0.pt", "optim_000006_rank0.pt"]


def test_unknown_depth_is_one_line_and_exit_code_2(tmp_path):
    result = run_phase("jobs.base_train", ["--depth=0", *ARGS[1:]], make_store(str(tmp_path)))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: depth 0 is out of range")
    assert "Traceback" not in result.stderr


def test_fp8_without_an_fp8_gpu_is_one_line_and_exit_code_2_before_any_step(tmp_path):
    result = run_phase("jobs.base_train", [*ARGS, "--fp8"], make_store(str(tmp_path)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: --fp8 needs an NVIDIA GPU with FP8 matmuls")
    assert "step 1/" not in result.stdout


def test_checkpoint_of_another_architecture_is_refused_and_kept(tmp_path):
    env = make_store(str(tmp_path))
    assert run_phase("jobs.base_train", ARGS, env).returncode == 0
    before = open(f"{tmp_path}/runs/r1/checkpoints/base/d1/model_000006.pt", "rb").read()
    # same folder, wider context: a different model
    other = [a if not a.startswith("--max-seq-len") else "--max-seq-len=64" for a in ARGS]
    result = run_phase("jobs.base_train", other + ["--model-tag=d1", "--num-iterations=8"], env)
    assert result.returncode == 2 and "use another --model-tag" in result.stderr
    assert open(f"{tmp_path}/runs/r1/checkpoints/base/d1/model_000006.pt", "rb").read() == before
