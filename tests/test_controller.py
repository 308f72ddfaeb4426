"""The controller and the local backend, end to end, with stand-in phases (tests/fake_phases/phase.py).

Each run here is real: `python -m jobs.controller` processes, phase jobs as detached local processes,
run.json in a local store. The phases are stand-ins so that these tests do not depend on training.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs import pipeline
from jobs.backends import PhaseJob
from jobs.backends.local import LocalBackend, command
from jobs.config import load_config
from jobs.controller import main as controller_main
from jobs.console import Console
from jobs.pipeline import PHASES
from jobs.runstore import check_run_id, create_run, list_run_ids, new_run_id
from vibechat import liveness
from vibechat.common import run_main
from vibechat.storage import open_store

REPO = Path(__file__).resolve().parents[1]
FAKE = "tests.fake_phases.phase"


# --- helpers ------------------------------------------------------------------------------------

def fake_config(tmp_path, phases=("base", "report"), args=None, max_attempts=2) -> str:
    """A config over the ci preset that runs `phases` with the stand-in program and skips the others."""
    args = args or {}
    config = {
        "retries": {"max_attempts": max_attempts, "backoff_s": 0.2, "backoff_max_s": 1},
        "phases": {name: {"module": FAKE, "skip": False, "args": {"phase": name, "steps": 3, **args.get(name, {})}}
                   if name in phases else {"skip": True} for name in PHASES},
    }
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def controller_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("VIBECHAT_")}


def controller(*args, store) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.controller", *args, "--store", store], cwd=REPO,
                          env=controller_env(), capture_output=True, text=True, timeout=300)


def controller_bg(*args, store, out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.controller", *args, "--store", store], cwd=REPO,
                            env=controller_env(), stdout=open(out, "w"), stderr=subprocess.STDOUT)


def run_controller_here(argv, capsys) -> tuple[int, str, str]:
    """The controller's main in this process, as `python -m jobs.controller` runs it: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: controller_main(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def run_json(store_url, run_id) -> pipeline.RunState:
    return pipeline.from_dict(json.loads(open_store(store_url).get_text(f"runs/{run_id}/run.json")))


def trail(store_url, run_id, phase, name) -> list[str]:
    """Lines of a file the stand-in phase leaves in the store (starts, completions)."""
    key = f"runs/{run_id}/fake/{phase}/{name}"
    store = open_store(store_url)
    return store.get_text(key).splitlines() if store.exists(key) else []


def checkpoint_step(store_url, run_id, phase) -> int:
    key = f"runs/{run_id}/checkpoints/{phase}/step"
    store = open_store(store_url)
    return int(store.get_text(key)) if store.exists(key) else 0


def job_pid(store_url, run_id, phase, attempt) -> int:
    path = Path(store_url) / "local-jobs" / f"vibechat-{run_id}-{phase}-{attempt}" / "pid.json"
    return json.loads(path.read_text())["pid"]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(autouse=True)
def no_stray_jobs(store_url):
    """Whatever a test leaves running in its store (or in the HOMEs it gave controllers) is stopped at its end."""
    yield
    for pid_file in Path(store_url).parent.rglob("local-jobs/**/pid.json"):
        try:
            os.killpg(json.loads(pid_file.read_text())["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- a whole run --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    """(store, the start command's outcome) of one run through every phase with the stand-in program."""
    tmp_path = tmp_path_factory.mktemp("full")
    store_url = str(tmp_path / "store")
    r = controller("start", "--preset", "ci", "--config", fake_config(tmp_path, phases=PHASES), "--run-id", "full",
                   store=store_url)
    assert r.returncode == 0, r.stdout + r.stderr
    return store_url, r


def test_a_run_goes_through_every_phase_and_status_shows_each_succeeded(full_run, capsys):
    store_url, _ = full_run
    code, status, _ = run_controller_here(["status", "full", "--store", store_url], capsys)
    assert code == 0 and status.startswith("run full: succeeded")
    for phase in PHASES:
        assert re.search(rf"^{phase}\s+succeeded\s+1\s", status, re.M), status
        assert len(trail(store_url, "full", phase, "completions")) == 1


def test_start_says_why_it_chose_its_backend(full_run):
    assert "backend local: the store is a local folder" in full_run[1].stdout


def test_start_shows_a_phase_progress_line(full_run):
    assert "base | step 3/3 (100%) | loss 1.0000 | tok/s 3000" in full_run[1].stdout


def test_a_finished_run_says_where_its_report_is_and_how_to_open_the_dashboard(full_run):
    store_url, r = full_run
    assert f"{store_url}/runs/full/report/report.md" in r.stdout
    assert f"VIBECHAT_STORE={store_url} streamlit run dashboard/app.py" in r.stdout


def test_a_phase_gets_the_store_the_run_the_dataset_and_unbuffered_output(full_run):
    store_url, _ = full_run
    env = json.loads(open_store(store_url).get_text("runs/full/fake/base/env.json"))
    assert env["VIBECHAT_STORE"] == store_url and env["VIBECHAT_RUN"] == "full"
    assert env["VIBECHAT_DATASET"] == "pydocs" and env["PYTHONUNBUFFERED"] == "1"
    assert int(env["OMP_NUM_THREADS"]) >= 1


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    """(store, the resume command's outcome) of a run that succeeded, then was resumed from its report phase."""
    tmp_path = tmp_path_factory.mktemp("again")
    store_url = str(tmp_path / "store")
    assert controller("start", "--preset", "ci", "--config", fake_config(tmp_path), "--run-id", "again",
                      store=store_url).returncode == 0
    r = controller("resume", "again", "--from", "report", store=store_url)
    assert r.returncode == 0, r.stdout + r.stderr
    return store_url, r


def test_resume_from_a_phase_redoes_it_and_what_follows_only(resumed_run):
    store_url, _ = resumed_run
    run = run_json(store_url, "again")
    assert run.phases["base"].attempt == 1 and run.phases["report"].attempt == 2
    assert len(trail(store_url, "again", "base", "starts")) == 1
    assert len(trail(store_url, "again", "report", "starts")) == 2


def test_resume_from_a_phase_says_its_checkpoints_are_kept(resumed_run):
    assert "note: checkpoints of report are kept" in resumed_run[1].stdout


def test_resume_help_says_what_from_does_with_checkpoints(store_url):
    helped = controller("resume", "--help", store=store_url).stdout
    assert "a training phase that has checkpoints continues from its newest" in " ".join(helped.split())


def test_logs_shows_an_earlier_attempt_of_a_phase(resumed_run, capsys):
    store_url, _ = resumed_run
    code, logs, _ = run_controller_here(["logs", "again", "report", "--attempt", "1", "--store", store_url], capsys)
    assert code == 0 and "step 3/3 | loss 1.0000" in logs


def test_list_shows_each_run_with_its_preset_and_status(resumed_run, capsys):
    store_url, _ = resumed_run
    code, listing, _ = run_controller_here(["list", "--store", store_url], capsys)
    assert code == 0 and re.search(r"^again\s+ci\s+succeeded", listing, re.M), listing


def failed_run(store_url, tmp_path) -> subprocess.CompletedProcess:
    """Start run `fl`, whose base phase fails on its first two starts: with two attempts allowed, the run fails."""
    config = fake_config(tmp_path, phases=("data", "base"), args={"base": {"fail_starts": 2}}, max_attempts=2)
    return controller("start", "--preset", "ci", "--config", config, "--run-id", "fl", store=store_url)


def test_a_failing_phase_is_retried_then_fails_the_run(store_url, tmp_path):
    r = failed_run(store_url, tmp_path)
    assert r.returncode == 1 and "run fl failed at phase base" in r.stdout
    run = run_json(store_url, "fl")
    assert run.phases["base"].state == "failed" and run.phases["base"].attempt == 2
    assert run.phases["base"].error == "exit code 2: error: fake base failing on purpose (start 2)"


def test_resume_after_a_failure_retries_the_failed_phase_and_redoes_no_succeeded_one(store_url, tmp_path):
    failed_run(store_url, tmp_path)
    r = controller("resume", "fl", store=store_url)
    assert r.returncode == 0, r.stdout + r.stderr
    run = run_json(store_url, "fl")
    assert run.phases["base"].state == "succeeded" and run.phases["base"].attempt == 3
    assert len(trail(store_url, "fl", "data", "starts")) == 1


# --- controllers that die, race, or are stopped --------------------------------------------------

def test_after_the_controller_is_killed_mid_phase_one_of_two_resumes_adopts_the_running_job(store_url, tmp_path):
    gate = tmp_path / "gate"
    config = fake_config(tmp_path, args={"base": {"gate": str(gate)}})
    first = controller_bg("start", "--preset", "ci", "--config", config, "--run-id", "kill", store=store_url,
                          out=tmp_path / "first.out")
    wait_for(lambda: checkpoint_step(store_url, "kill", "base") >= 1, "base to be mid-way")
    first.send_signal(signal.SIGKILL)
    first.wait()

    resumers = [controller_bg("resume", "kill", store=store_url, out=tmp_path / f"resume{i}.out") for i in range(2)]
    wait_for(lambda: any(p.poll() is not None for p in resumers), "one resume to give up")
    loser = next(i for i, p in enumerate(resumers) if p.poll() is not None)
    winner = resumers[1 - loser]
    assert resumers[loser].returncode == 2
    loser_out = (tmp_path / f"resume{loser}.out").read_text()
    assert f"is being driven by controller {socket.gethostname()}:{winner.pid}" in loser_out
    gate.touch()  # only now may the phase go on: it was mid-way through all of the above
    assert winner.wait(timeout=300) == 0, (tmp_path / f"resume{1 - loser}.out").read_text()
    assert "base: following vibechat-kill-base-1, already running" in (tmp_path / f"resume{1 - loser}.out").read_text()

    run = run_json(store_url, "kill")
    assert pipeline.run_status(run) == "succeeded" and run.phases["base"].attempt == 1
    assert len(trail(store_url, "kill", "base", "starts")) == 1  # adopted, not started again
    for phase in ("base", "report"):
        assert len(trail(store_url, "kill", phase, "completions")) == 1


def test_a_job_that_died_with_its_controller_is_retried_and_continues_from_its_checkpoint(store_url, tmp_path):
    gate = tmp_path / "gate"
    config = fake_config(tmp_path, phases=("base",), args={"base": {"gate": str(gate)}})
    first = controller_bg("start", "--preset", "ci", "--config", config, "--run-id", "crash", store=store_url,
                          out=tmp_path / "first.out")
    wait_for(lambda: checkpoint_step(store_url, "crash", "base") >= 1, "base to be mid-way")
    first.send_signal(signal.SIGKILL)
    first.wait()
    os.killpg(job_pid(store_url, "crash", "base", 1), signal.SIGKILL)  # as if the machine had restarted
    gate.touch()

    r = controller("resume", "crash", store=store_url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ended without recording an exit status" in r.stdout
    run = run_json(store_url, "crash")
    assert run.phases["base"].state == "succeeded" and run.phases["base"].attempt == 2
    starts = trail(store_url, "crash", "base", "starts")
    assert [line.split()[1] for line in starts] == ["0", "1"]  # the second attempt went on from step 1
    assert len(trail(store_url, "crash", "base", "completions")) == 1


def stopped_run(store_url, tmp_path) -> tuple[subprocess.CompletedProcess, Path]:
    """Start run `st` detached, stop it while its base phase waits at step 1; (the stop's outcome, the gate that
    lets the phase go on)."""
    gate = tmp_path / "gate"
    config = fake_config(tmp_path, phases=("base",), args={"base": {"gate": str(gate)}})
    r = controller("start", "--preset", "ci", "--config", config, "--run-id", "st", "--detach", store=store_url)
    assert r.returncode == 0 and "driving run st in the background" in r.stdout
    wait_for(lambda: checkpoint_step(store_url, "st", "base") >= 1, "base to be mid-way")
    return controller("stop", "st", store=store_url), gate


def test_stop_cancels_a_detached_run_and_its_job(store_url, tmp_path):
    r, _ = stopped_run(store_url, tmp_path)
    assert r.returncode == 0 and "stopping vibechat-st-base-1" in r.stdout
    run = run_json(store_url, "st")
    assert pipeline.run_status(run) == "cancelled" and run.phases["base"].state == "cancelled"
    assert not group_alive(job_pid(store_url, "st", "base", 1))
    wait_for(lambda: run_json(store_url, "st").lease is None, "the detached controller to let go")


def test_resume_after_a_stop_continues_from_the_phase_checkpoint(store_url, tmp_path):
    _, gate = stopped_run(store_url, tmp_path)
    wait_for(lambda: run_json(store_url, "st").lease is None, "the detached controller to let go")
    gate.touch()
    r = controller("resume", "st", store=store_url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [line.split()[1] for line in trail(store_url, "st", "base", "starts")] == ["0", "1"]


def test_deleting_a_run_folder_mid_run_stops_its_job_and_the_controller_with_one_error(store_url, tmp_path):
    gate = tmp_path / "gate"
    config = fake_config(tmp_path, phases=("base",), args={"base": {"gate": str(gate)}})
    proc = controller_bg("start", "--preset", "ci", "--config", config, "--run-id", "gone", store=store_url,
                         out=tmp_path / "out")
    wait_for(lambda: checkpoint_step(store_url, "gone", "base") >= 1, "base to be mid-way")
    shutil.rmtree(Path(store_url) / "runs" / "gone")
    assert proc.wait(timeout=120) == 2
    out = (tmp_path / "out").read_text()
    assert "error: no run 'gone' in store" in out and "was deleted" in out and "Traceback" not in out
    assert not group_alive(job_pid(store_url, "gone", "base", 1))


def test_serve_drives_a_run_that_no_controller_holds(store_url, tmp_path):
    store = open_store(store_url)
    create_run(store, "ci", load_config("ci", fake_config(tmp_path, phases=("base",))), "local", "srv", owner=None)
    serve = controller_bg("serve", "--backend", "local", "--interval", "0.2", store=store_url,
                          out=tmp_path / "serve.out")
    try:
        wait_for(lambda: pipeline.run_status(run_json(store_url, "srv")) == "succeeded", "serve to finish the run")
    finally:
        serve.terminate()
        serve.wait()
    assert "srv base: succeeded" in (tmp_path / "serve.out").read_text()


def test_a_run_on_an_s3_store_keeps_its_state_and_logs_there(s3_url, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the local backend's job folders for S3 stores live there
    r = controller("start", "--preset", "ci", "--config", fake_config(tmp_path, phases=("base",)), "--run-id", "s3",
                   store=s3_url)
    assert r.returncode == 0, r.stdout + r.stderr
    store = open_store(s3_url)
    assert pipeline.run_status(pipeline.from_dict(json.loads(store.get_text("runs/s3/run.json")))) == "succeeded"
    assert "step 3/3" in store.get_text("runs/s3/logs/base-1.log")
    assert (tmp_path / "home" / ".cache" / "vibechat" / "local-jobs").is_dir()


def orphan_on_machine1(s3_url, tmp_path, monkeypatch) -> Path:
    """Run `two` with its base phase mid-way on "machine 1" (a HOME of its own) and its controller killed; HOME is
    then "machine 2"'s. Returns the gate that lets the phase finish."""
    gate = tmp_path / "gate"
    config = fake_config(tmp_path, phases=("base",), args={"base": {"gate": str(gate)}})
    monkeypatch.setenv("HOME", str(tmp_path / "machine1"))  # the local backend keeps its job folders under HOME
    first = controller_bg("start", "--preset", "ci", "--config", config, "--run-id", "two", store=s3_url,
                          out=tmp_path / "first.out")
    wait_for(lambda: checkpoint_step(s3_url, "two", "base") >= 1, "base to be mid-way")
    first.send_signal(signal.SIGKILL)
    first.wait()
    monkeypatch.setenv("HOME", str(tmp_path / "machine2"))
    return gate


def test_a_phase_alive_on_another_machine_is_followed_not_started_again(s3_url, tmp_path, monkeypatch):
    gate = orphan_on_machine1(s3_url, tmp_path, monkeypatch)
    second = controller_bg("resume", "two", store=s3_url, out=tmp_path / "second.out")
    try:
        wait_for(lambda: "following vibechat-two-base-1, running on" in (tmp_path / "second.out").read_text(),
                 "the second controller to follow the phase", timeout=60)
        gate.touch()
        assert second.wait(timeout=120) == 0, (tmp_path / "second.out").read_text()
    finally:
        second.kill()
    assert len(trail(s3_url, "two", "base", "starts")) == 1  # one phase process, on the first machine
    assert len(trail(s3_url, "two", "base", "completions")) == 1
    run = run_json(s3_url, "two")
    assert run.phases["base"].state == "succeeded" and run.phases["base"].attempt == 1
    assert not (tmp_path / "machine2" / ".cache" / "vibechat" / "local-jobs").exists()


def test_a_phase_stopped_from_another_machine_is_not_run_twice_at_once(s3_url, tmp_path, monkeypatch):
    gate = orphan_on_machine1(s3_url, tmp_path, monkeypatch)
    assert controller("stop", "two", store=s3_url).returncode == 0  # machine 2 cannot reach machine 1's process
    second = controller_bg("resume", "two", store=s3_url, out=tmp_path / "second.out")
    try:
        wait_for(lambda: "waiting for vibechat-two-base-1 to end, still running on" in
                 (tmp_path / "second.out").read_text(), "the second controller to wait", timeout=60)
        gate.touch()
        assert second.wait(timeout=120) == 0, (tmp_path / "second.out").read_text()
    finally:
        second.kill()
    starts = trail(s3_url, "two", "base", "starts")
    assert [line.split()[1] for line in starts] == ["0", "3"]  # attempt 2 started once attempt 1 had finished
    assert run_json(s3_url, "two").phases["base"].attempt == 2


def test_a_phase_whose_liveness_record_expired_elsewhere_is_known_dead_and_retried(s3_url, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    store = open_store(s3_url)
    run = create_run(store, "ci", load_config("ci", fake_config(tmp_path, phases=("base",))), "local", "dead",
                     owner=None)
    pipeline.mark_running(run, "base", 1, "vibechat-dead-base-1", time.time() - 300)
    store.put_text("runs/dead/run.json", json.dumps(pipeline.to_dict(run)))
    liveness.write(store, "dead", "base", 1, liveness.Liveness("machine1:4242", time.time() - 200))
    r = controller("resume", "dead", store=s3_url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "base: attempt 1 failed: its process machine1:4242 stopped renewing its liveness record" in r.stdout
    assert run_json(s3_url, "dead").phases["base"].attempt == 2


def test_a_10_second_s3_outage_mid_phase_is_ridden_out_without_a_resume(own_s3, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    url = "s3://own/vibechat"
    config = fake_config(tmp_path, phases=("base",), args={"base": {"steps": 20, "sleep": 0.5}})
    proc = controller_bg("start", "--preset", "ci", "--config", config, "--run-id", "outage", store=url,
                         out=tmp_path / "out")
    wait_for(lambda: checkpoint_step(url, "outage", "base") >= 2, "base to be mid-way")
    own_s3.stop()
    time.sleep(10)  # the phase writes a checkpoint every 0.5 s and the controller reads run.json every tick
    own_s3.start()
    assert proc.wait(timeout=240) == 0, (tmp_path / "out").read_text()
    run = run_json(url, "outage")
    assert run.phases["base"].attempt == 1 and run.phases["base"].failures == 0
    assert len(trail(url, "outage", "base", "completions")) == 1


# --- bad input: one clear error each, exit code 2, run.json intact ------------------------------

@pytest.fixture
def existing_run(store_url, tmp_path):
    """A run named `r` that nothing drives yet; returns its run.json bytes."""
    store = open_store(store_url)
    create_run(store, "ci", load_config("ci", fake_config(tmp_path)), "local", "r", owner=None)
    return store.get_bytes("runs/r/run.json")


def typo_config(tmp_path) -> str:
    path = tmp_path / "typo.yaml"
    path.write_text("phases:\n  base:\n    argz: {depth: 4}\n")
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["start", "--preset", "huge"], "unknown preset 'huge': choose one of ci, d12, d20, d26, d32, tiny"),
    (["start", "--config", "TYPO"], "unknown key 'phases.base.argz' (did you mean 'args'?); valid keys under "
                                    "'phases.base': module, args, skip"),
    (["start", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["start", "--config", "FOLDER"], "is a folder: pass a YAML file"),
    (["start", "--config", "BINARY"], "is not UTF-8 text: pass a YAML file"),
    (["start", "--store", "ftp://host/x"], "unknown scheme 'ftp'"),
    (["start", "--run-id", "Bad_Id"], "run id 'Bad_Id' is not usable"),
    (["start", "--run-id", ""], "run id '' is not usable"),
    (["start", "--run-id", "r"], "run 'r' already exists"),
    (["start", "--backend", "kubernetes"], "--backend kubernetes needs an s3:// store"),
    (["status", "nope"], "no run 'nope' in store"),
    (["logs", "r", "pretrain"], "unknown phase 'pretrain': valid phases are data, tokenizer, tokenizer_eval, base"),
    (["logs", "r", "base"], "phase base of run r has not started yet"),
    (["resume", "r", "--from", "pretrain"], "unknown phase 'pretrain'"),
])
def test_bad_input_gets_one_clear_error(argv, message, store_url, tmp_path, existing_run, capsys):
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe")
    files = {"TYPO": typo_config(tmp_path), "FOLDER": str(tmp_path), "BINARY": str(tmp_path / "binary.yaml")}
    argv = [files.get(a, a) for a in argv]
    if "--store" not in argv:
        argv += ["--store", store_url]
    code, _, err = run_controller_here(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert open_store(store_url).get_bytes("runs/r/run.json") == existing_run
    assert list_run_ids(open_store(store_url)) == ["r"]


@pytest.mark.parametrize("argv, message", [
    (["serve", "--interval", "0"], "--interval: 0 must be above 0"),
    (["serve", "--interval", "soon"], "--interval: 'soon' is not a number"),
    (["logs", "r", "base", "--attempt", "0"], "--attempt: 0 must be at least 1"),
    (["serve", "--http-port", "99999"], "--http-port 99999 is not a port: use 0-65535"),
])
def test_bad_flag_values_are_one_usage_error(argv, message, store_url, capsys):
    code, _, err = run_controller_here(argv + ["--store", store_url], capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize("text, message", [
    ("base: {args: {num_iterations: 0}}", "phases.base.args: argument --num-iterations: 0 is not a number of steps: "
                                          "give at least 1, or -1 to derive the count"),
    ("rl: {args: {num_iterations: -5}}", "phases.rl.args: argument --num-iterations: -5 is not a number of steps"),
    ("base: {args: {depth: four}}", "phases.base.args: argument --depth: invalid int value: 'four'"),
    ("sft: {args: {log_every: 0}}", "phases.sft.args: argument --log-every: 0 must be at least 1"),
    ("mid: {args: {total_batch_size: 0}}", "phases.mid.args: argument --total-batch-size: 0 must be at least 1"),
    ("sft: {args: {learning_rate: 0.1}}", "phases.sft.args: unrecognized arguments: --learning-rate=0.1"),
    ("data: {args: {shards: 2}}", "phases.data.args: unrecognized arguments: --shards=2"),
    ("report: {args: {gpu_hour_cost: -1}}", "phases.report.args: --gpu-hour-cost -1.0 is not a price"),
    ("sft: {module: mylab.my_sft}", "phases.sft.module 'mylab.my_sft' cannot be imported (No module named 'mylab')"),
])
def test_a_phase_argument_its_program_rejects_fails_the_start_before_any_phase_runs(text, message, store_url,
                                                                                      tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("phases: {" + text + "}\n")
    code, _, err = run_controller_here(["start", "--preset", "ci", "--config", str(path), "--store", store_url],
                                       capsys)
    assert code == 2 and err.startswith(f"error: preset ci with {path}: {message}") and err.count("\n") == 1, err
    assert not os.path.exists(store_url)  # no run, no job: nothing was written


def test_status_into_a_closed_pipe_ends_quietly_like_other_tools(store_url, existing_run):
    proc = subprocess.Popen([sys.executable, "-m", "jobs.controller", "status", "r", "--store", store_url], cwd=REPO,
                            env=controller_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # as `| head -1` does once it has its line
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE and err == ""


def test_a_run_whose_folder_was_deleted_is_a_clear_error(store_url, existing_run, capsys):
    shutil.rmtree(Path(store_url) / "runs" / "r")
    for argv in (["status", "r"], ["resume", "r"], ["stop", "r"]):
        code, _, err = run_controller_here(argv + ["--store", store_url], capsys)
        assert code == 2 and "no run 'r' in store" in err and "was deleted" in err


def test_a_corrupt_run_file_is_a_clear_error_and_left_as_it_is(store_url, existing_run, capsys):
    store = open_store(store_url)
    store.put_bytes("runs/r/run.json", existing_run[:40])
    code, _, err = run_controller_here(["resume", "r", "--store", store_url], capsys)
    assert code == 2 and "runs/r/run.json is not valid JSON" in err
    assert store.get_bytes("runs/r/run.json") == existing_run[:40]


def test_default_run_ids_are_readable_and_usable_in_job_names():
    run_id = new_run_id(time.mktime((2025, 6, 12, 14, 30, 5, 0, 0, -1)))
    assert run_id == "run-250612-143005"
    check_run_id(run_id)


def test_step_lines_become_one_progress_line_with_an_eta_and_other_lines_pass_through(capsys):
    console, job = Console(), PhaseJob("r", "base", 1, "jobs.base_train")
    console.output(job, "model d4\nstep 0/100 | val bpb 3.2100\n", 0.0)
    console.output(job, "step 10/100 | loss 4.5000 | lr 1.0 | tok/s 1,200\n", 0.0)
    console.output(job, "step 20/100 | loss 4.0000 | tok/s 1,300\n", 60.0)
    assert capsys.readouterr().out.splitlines() == [
        "  base | model d4",
        "  base | step 0/100 | val bpb 3.2100",
        "  base | step 10/100 (10%) | loss 4.5000 | tok/s 1,200",
        "  base | step 20/100 (20%) | loss 4.0000 | tok/s 1,300 | eta 8m00s",
    ]


def test_an_eta_past_an_hour_shows_hours_minutes_and_seconds(capsys):
    console, job = Console(), PhaseJob("r", "base", 1, "jobs.base_train")
    console.output(job, "step 10/10000 | loss 4.0000\n", 0.0)
    console.output(job, "step 20/10000 | loss 3.9000\n", 10.0)  # a second a step, 9,980 steps to go
    assert capsys.readouterr().out.splitlines()[-1].endswith("eta 2h46m20s")


# --- the local backend --------------------------------------------------------------------------

def fake_job(store_url, run_id, **args) -> PhaseJob:
    env = {"VIBECHAT_STORE": store_url, "VIBECHAT_RUN": run_id}
    argv = pipeline.phase_argv("base", {"phase": "base", **args})
    return PhaseJob(run_id, "base", 1, FAKE, argv, env)


def test_a_gpu_phase_on_a_machine_without_gpus_runs_as_one_plain_process():
    job = PhaseJob("r", "base", 1, "jobs.base_train", ["--depth=4"], gpus_per_node=8, nproc_per_node=8)
    assert command(job) == [sys.executable, "-m", "jobs.base_train", "--depth=4"]


def test_submitting_a_job_twice_adopts_the_first_and_runs_it_once(store_url, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("VIBECHAT_BASE_DIR", str(tmp_path / "elsewhere"))  # must not divert the job
    gate = tmp_path / "gate"
    backend = LocalBackend(str(tmp_path / "jobs"))
    job = fake_job(store_url, "twice", gate=str(gate))
    backend.submit(job)
    wait_for(lambda: checkpoint_step(store_url, "twice", "base") >= 1, "the job to be mid-way")
    assert backend.status(job).state == "running"
    LocalBackend(str(tmp_path / "jobs")).submit(job)  # as a restarted controller would
    gate.touch()
    wait_for(lambda: backend.status(job).state != "running", "the job to end")
    assert backend.status(job).state == "succeeded"
    assert len(trail(store_url, "twice", "base", "starts")) == 1
    assert "step 3/3" in backend.logs(job)


def test_a_failed_job_reports_its_exit_code_and_last_line(store_url, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    backend = LocalBackend(str(tmp_path / "jobs"))
    job = fake_job(store_url, "bad", fail_starts=1)
    backend.submit(job)
    wait_for(lambda: backend.status(job).state != "running", "the job to end")
    status = backend.status(job)
    assert status.state == "failed"
    assert status.message == "exit code 2: error: fake base failing on purpose (start 1)"
