"""Phases as processes on this machine: `python -m <module>`, or torchrun over the visible GPUs.

Each job runs under a small wrapper (`python -m jobs.backends.local <job_dir>`, this file) in a
session of its own, so that Ctrl-C or a SIGKILL of the controller leaves it running. The wrapper
sends the job's output to <job_dir>/output.log and, when the job ends, writes its exit code to
<job_dir>/exit.json. A controller started later finds the job by its deterministic name: its
process group alive -> running (adopted), exit.json -> its outcome, neither -> it died unrecorded.
The controller prints new output as it comes (read_log) and copies it into the store as
runs/<run>/logs/<phase>-<attempt>.log.

Job folders are machine-local bookkeeping, not artifacts: <store>/local-jobs/<job_name>/ for a
local store, ~/.cache/vibechat/local-jobs/<bucket>/<prefix>/<job_name>/ for an S3 store.
This module imports only the standard library at the top, so the wrapper starts in milliseconds.
"""

import json
import os
import signal
import subprocess
import sys
import time

from jobs.backends import JobStatus, PhaseJob

STOP_GRACE_SECONDS = 20  # SIGTERM, then this long for the job to exit, then SIGKILL


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def command(job: PhaseJob) -> list[str]:
    """torchrun over all visible GPUs for a GPU phase on a multi-GPU machine, else one plain process."""
    n = visible_gpus() if job.gpus_per_node > 0 else 0
    if n > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                "-m", job.module, *job.args]
    return [sys.executable, "-m", job.module, *job.args]


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class LocalBackend:
    """Runs each phase as a child process of a small wrapper, its folder named after the job."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self._children: dict[str, subprocess.Popen] = {}  # wrappers this process started, reaped in status()

    def idle(self) -> None:
        """Wait before the next check of a job: a child's output is followed at this pace."""
        time.sleep(0.5)

    def job_dir(self, job: PhaseJob) -> str:
        return os.path.join(self.state_dir, job.name)

    def submit(self, job: PhaseJob) -> None:
        job_dir = self.job_dir(job)
        try:
            os.makedirs(job_dir)
        except FileExistsError:
            return  # submitted before: adopt it, never start a second copy
        spec = {"argv": command(job), "env": job.env, "cwd": os.getcwd(), "submitted_at": time.time()}
        _write_json(os.path.join(job_dir, "job.json"), spec)
        # the wrapper leads a new session: signals to the controller's terminal do not reach it
        self._children[job.name] = subprocess.Popen(
            [sys.executable, "-m", "jobs.backends.local", job_dir], start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _write_json(os.path.join(job_dir, "pid.json"), {"pid": self._children[job.name].pid})

    def status(self, job: PhaseJob) -> JobStatus:
        job_dir = self.job_dir(job)
        if not os.path.isdir(job_dir):
            return JobStatus("missing")
        if job.name in self._children:
            self._children[job.name].poll()  # reap a finished wrapper so its group reads as gone
        ended = _read_json(os.path.join(job_dir, "exit.json"))
        if ended is not None:
            code = ended["returncode"]
            if code == 0:
                return JobStatus("succeeded")
            return JobStatus("failed", f"exit code {code}: {self._last_line(job)}")
        pid = _read_json(os.path.join(job_dir, "pid.json"))
        if pid is not None and _group_alive(pid["pid"]):
            return JobStatus("running")
        return JobStatus("failed", "the process ended without recording an exit status (killed, or the machine "
                                   f"restarted); last output: {self._last_line(job)}")

    def stop(self, job: PhaseJob) -> None:
        pid = _read_json(os.path.join(self.job_dir(job), "pid.json"))
        if pid is None or not _group_alive(pid["pid"]):
            return
        os.killpg(pid["pid"], signal.SIGTERM)
        deadline = time.time() + STOP_GRACE_SECONDS
        while time.time() < deadline and self.status(job).state == "running":
            time.sleep(0.2)
        if _group_alive(pid["pid"]):
            os.killpg(pid["pid"], signal.SIGKILL)
            if job.name in self._children:
                self._children[job.name].wait()
        # a killed group lingers (as zombies) until its parent reaps it; return once it is gone
        deadline = time.time() + STOP_GRACE_SECONDS
        while _group_alive(pid["pid"]) and time.time() < deadline:
            time.sleep(0.1)

    def logs(self, job: PhaseJob) -> str:
        return self.read_log(job, 0)[0]

    def read_log(self, job: PhaseJob, offset: int) -> tuple[str, int]:
        """The output written since byte `offset` (whole lines only) and the offset to read from next."""
        try:
            with open(os.path.join(self.job_dir(job), "output.log"), "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return "", offset
        cut = data.rfind(b"\n") + 1
        return data[:cut].decode("utf-8", errors="replace"), offset + cut

    def _last_line(self, job: PhaseJob) -> str:
        lines = [line for line in self.logs(job).splitlines() if line.strip()]
        return lines[-1].strip() if lines else "(no output)"


def wrap(job_dir: str) -> int:
    """Run the job of job_dir with its output in output.log; record its exit code in exit.json."""
    spec = _read_json(os.path.join(job_dir, "job.json"))
    _write_json(os.path.join(job_dir, "pid.json"), {"pid": os.getpid()})
    # stop() signals the whole group: outlive the job so that its exit code is still written
    signal.signal(signal.SIGTERM, lambda *_: None)
    env = {k: v for k, v in os.environ.items() if k != "VIBECHAT_BASE_DIR"}  # it would override VIBECHAT_RUN
    with open(os.path.join(job_dir, "output.log"), "ab") as log:
        try:
            proc = subprocess.Popen(spec["argv"], env={**env, **spec["env"]}, cwd=spec["cwd"], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)
            returncode = proc.wait()
        except OSError as e:
            log.write(f"could not start {spec['argv']}: {e}\n".encode())
            returncode = 127
    _write_json(os.path.join(job_dir, "exit.json"), {"returncode": returncode, "ended_at": time.time()})
    return returncode


if __name__ == "__main__":
    sys.exit(wrap(sys.argv[1]))
