"""Moving a run forward: which backend runs its phases, the job of each phase, and the Driver, which does one
step of the run per tick while it holds the run's lease."""

import os
import subprocess
import sys
import time

from jobs import health, pipeline
from jobs.backends import Backend, JobStatus, PhaseJob
from jobs.console import Console
from jobs.runstore import LEASE_SECONDS, RunNotFound, claim, read_run, write_run
from vibechat import liveness
from vibechat.common import VibechatError, format_duration, get_store_url
from vibechat.layout import in_run, log_key
from vibechat.storage import LocalStore, PreconditionFailed, S3Store, Store, open_store

LOG_UPLOAD_SECONDS = 30  # how often a running job's output is copied to the store
OVER = (pipeline.SUCCEEDED, pipeline.FAILED, pipeline.CANCELLED)


def store_root(store: Store) -> str:
    """The store's URL as phases on other processes (another cwd) must see it."""
    return store.root if isinstance(store, LocalStore) else store.url


def local_state_dir(store: Store) -> str:
    """Where the local backend keeps its job folders (see jobs/backends/local.py)."""
    if isinstance(store, S3Store):
        base = os.path.join(os.path.expanduser("~"), ".cache", "vibechat", "local-jobs", store.bucket, store.prefix)
        return os.path.normpath(base)
    return os.path.join(store.root, "local-jobs")


def pick_backend(choice: str, store: Store) -> tuple[str, str]:
    """(backend name, why): `auto` takes Kubernetes when a cluster with the PyTorchJob CRD answers."""
    if choice == "local":
        return "local", "asked for with --backend local"
    if choice == "kubernetes":
        if not isinstance(store, S3Store):
            raise VibechatError(f"--backend kubernetes needs an s3:// store that pods can reach, not {store.url!r}: "
                                "pass --store s3://bucket/prefix")
        return "kubernetes", "asked for with --backend kubernetes"
    if not isinstance(store, S3Store):
        return "local", "the store is a local folder, which cluster pods cannot reach"
    try:
        from jobs.backends.kubernetes import kubernetes_available
    except ImportError as e:
        return "local", f"the Kubernetes backend cannot load ({e})"
    ok, why = kubernetes_available()
    return ("kubernetes", why) if ok else ("local", why)


def make_backend(run: pipeline.RunState, store: Store) -> Backend:
    if run.backend == "kubernetes":
        from jobs.backends.kubernetes import KubernetesBackend

        k8s = run.config["kubernetes"]
        return KubernetesBackend(namespace=k8s["namespace"], image=k8s["image"], settings=k8s)
    from jobs.backends.local import LocalBackend

    return LocalBackend(local_state_dir(store))


def phase_job(run: pipeline.RunState, store: Store, phase: str, attempt: int) -> PhaseJob:
    cfg = run.config["phases"][phase]
    env = {
        "VIBECHAT_STORE": store_root(store),
        "VIBECHAT_RUN": run.run_id,
        "VIBECHAT_PHASE": phase,  # with VIBECHAT_ATTEMPT: the liveness record the phase renews
        "VIBECHAT_ATTEMPT": str(attempt),
        "VIBECHAT_DATASET": run.config["dataset"],
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(run.config["omp_num_threads"] or os.cpu_count() or 1),
    }
    return PhaseJob(run.run_id, phase, attempt, cfg["module"], pipeline.phase_argv(phase, cfg["args"]), env,
                    cfg["nnodes"], cfg["nproc_per_node"], cfg["gpus_per_node"], cfg.get("resources", {}))


class Driver:
    """Moves one run forward, one step() per tick, while holding its lease.

    With follow, the output of the phase jobs is printed too (where the backend can stream it).
    """

    def __init__(self, store: Store, run_id: str, backend: Backend, owner: str, console: Console, follow: bool):
        self.store, self.run_id, self.backend, self.owner = store, run_id, backend, owner
        self.console, self.follow = console, follow
        self.offsets: dict[str, int] = {}  # job name -> how much of its output was printed
        self.uploaded_at: dict[str, float] = {}
        self.watching: PhaseJob | None = None
        self.known: set[str] = set()  # jobs this driver submitted or adopted
        self.idle = False  # the last step only waited: sleep before the next

    def say(self, message: str) -> None:
        self.console.say(message)

    def step(self) -> pipeline.RunState | None:
        """Read run.json, do what the run needs next, write the outcome back.

        Returns the run as written, or None where run.json changed under us (the next step reads it again).
        """
        try:
            run, version = read_run(self.store, self.run_id)
        except RunNotFound:
            if self.watching is not None:  # the run is gone: its job must not go on writing into nothing
                self.backend.stop(self.watching)
            raise
        now = time.time()
        self.idle = False
        lease_was = run.lease
        claim(run, self.owner, now)
        action = pipeline.next_action(run, now)
        if action.kind == "submit" and self._previous_alive(run, action.phase, action.attempt, now):
            action = pipeline.Action("wait", action.phase, action.attempt)
        if action.kind == "submit":
            job = phase_job(run, self.store, action.phase, action.attempt)
            pipeline.mark_running(run, action.phase, action.attempt, job.name, now)
            # record the attempt before starting it: a crash in between resubmits the same job name, never a new one
            if not self._write(run, version):
                return None
            # alive from now for any controller, until the phase renews it itself (or fails to start in time)
            liveness.write(self.store, run.run_id, job.phase, job.attempt,
                           liveness.Liveness(self.owner, now + liveness.TTL_SECONDS))
            self.backend.submit(job)
            health.SUBMITTED.inc()
            self.known.add(job.name)
            self.watching, self.offsets[job.name] = job, 0
            self.say(f"{action.phase}: started attempt {action.attempt} as {job.name}")
            return run
        changed, ended = False, None
        if action.kind == "watch":
            job = phase_job(run, self.store, action.phase, action.attempt)
            changed = self._watch(run, job, now)
            ended = job if run.phases[job.phase].state != pipeline.RUNNING else None
            self.idle = not changed
        elif action.kind == "wait":
            self.idle = True
        elif action.kind == "cancelled":
            for name, p in run.phases.items():
                if p.state == pipeline.CANCELLED and p.job_name:
                    self.backend.stop(phase_job(run, self.store, name, p.attempt))
        if pipeline.run_status(run) in OVER:
            pipeline.release_lease(run, self.owner)
            changed = True
        renew = lease_was is None or lease_was.owner != self.owner or lease_was.expires_at - now < LEASE_SECONDS / 2
        if (changed or renew) and not self._write(run, version):
            return None
        if ended is not None:
            # its end is in run.json now: the job may go (the kubernetes backend lets the operator delete it later)
            getattr(self.backend, "recorded", lambda job: None)(ended)
        return run

    def _watch(self, run: pipeline.RunState, job: PhaseJob, now: float) -> bool:
        """Follow the phase's job; True when `run` changed (the job was seen, or its end recorded)."""
        self.watching = job
        status = self.backend.status(job)
        known_here = status.state != "missing"  # this machine's backend follows the job itself
        seen = run.phases[job.phase].job_seen
        elsewhere = None
        if status.state == "missing":
            # a job this machine's backend does not know may run (or have ended) on another: its liveness record says
            elsewhere = self._elsewhere(job, now)
            if elsewhere and elsewhere.state == "running":
                if job.name not in self.offsets:
                    self.offsets[job.name] = 0
                    self.say(f"{job.phase}: following {job.name}, {elsewhere.message}")
                return False
            status = elsewhere or status
            if seen and status.state == "missing":
                # it existed and is gone before its end was seen, with no record of its process: the outcome is
                # unknown, so the attempt failed and a retry starts under a new name (training resumes from its checkpoint)
                status = JobStatus("failed", f"job {job.name} was deleted before the controller saw it end")
        self._follow(job, now)
        if status.state == "missing":
            # recorded as running but never started: the last controller stopped between the two
            self.say(f"{job.phase}: job {job.name} not found; submitting it")
            self.backend.submit(job)
            health.SUBMITTED.inc()
            self.known.add(job.name)
            return False
        if known_here and job.name not in self.known:  # started by a controller before this one
            health.ADOPTED.inc()
            self.known.add(job.name)
        if not seen:
            pipeline.mark_seen(run, job.phase)
            return True
        if status.state in ("pending", "running"):
            if now - self.uploaded_at.get(job.name, now) > LOG_UPLOAD_SECONDS:
                self._upload_log(job, now)
            self.uploaded_at.setdefault(job.name, now)
            return False
        if not elsewhere:  # its output is on the other machine, whose controller copied it while it could
            self._upload_log(job, now)
        if status.state == "succeeded":
            pipeline.mark_succeeded(run, job.phase, now)
            p = run.phases[job.phase]
            self.say(f"{job.phase}: succeeded in {format_duration(now - p.started_at)}")
        else:
            pipeline.mark_failed(run, job.phase, status.message, now)
            p = run.phases[job.phase]
            delay = pipeline.retry_delay(p.failures, run.config["retries"])
            retry = "" if p.state == pipeline.FAILED else f"; retrying in {delay:g}s"
            self.say(f"{job.phase}: attempt {job.attempt} failed: {status.message}{retry}")
        self.watching = None
        return True

    def _previous_alive(self, run: pipeline.RunState, phase: str, attempt: int, now: float) -> bool:
        """Whether the attempt before `attempt` still runs on another machine (stopped or reset from this one, which
        could not reach it): the next one waits for it, never two at once."""
        if attempt == 1:
            return False
        job = phase_job(run, self.store, phase, attempt - 1)
        if self.backend.status(job).state != "missing":
            return False  # this machine's backend runs it, and stop or resume stopped it
        status = self._elsewhere(job, now)
        if status is None or status.state != "running":
            return False
        if job.name not in self.offsets:
            self.offsets[job.name] = 0
            self.say(f"{phase}: waiting for {job.name} to end, still {status.message}")
        return True

    def _elsewhere(self, job: PhaseJob, now: float) -> JobStatus | None:
        """The job's status by its liveness record (running elsewhere, ended, or dead); None without a record."""
        record = liveness.read(self.store, job.run_id, job.phase, job.attempt)
        if record is None:
            return None
        if record.alive(now):
            return JobStatus("running", f"running on {record.owner}")
        if record.exit_code == 0:
            return JobStatus("succeeded")
        if record.exit_code is not None:
            return JobStatus("failed", f"exit code {record.exit_code} on {record.owner}")
        until = time.strftime("%H:%M:%S", time.localtime(record.deadline))
        return JobStatus("failed", f"its process {record.owner} stopped renewing its liveness record (due {until}): "
                                   "it died or never started")

    def _follow(self, job: PhaseJob, now: float) -> None:
        read_log = getattr(self.backend, "read_log", None)  # only backends that can stream have it
        if not self.follow or read_log is None:
            return
        if job.name not in self.offsets:
            # a job adopted from an earlier controller: show what comes next, not its whole past
            self.offsets[job.name] = read_log(job, 0)[1]
            if self.offsets[job.name]:
                self.say(f"{job.phase}: following {job.name}, already running")
        text, self.offsets[job.name] = read_log(job, self.offsets[job.name])
        self.console.output(job, text, now)

    def _upload_log(self, job: PhaseJob, now: float) -> None:
        self.store.put_text(in_run(job.run_id, log_key(job.phase, job.attempt)), self.backend.logs(job))
        self.uploaded_at[job.name] = now

    def _write(self, run: pipeline.RunState, version: str) -> bool:
        try:
            write_run(self.store, run, version)
            return True
        except PreconditionFailed:
            return False  # someone (stop, resume) changed run.json: read it again next tick

    def drive(self) -> pipeline.RunState:
        """step() until the run is over; Ctrl-C lets go of the run and leaves its job running."""
        try:
            while True:
                run = self.step()
                if run is not None and pipeline.run_status(run) in OVER:
                    return run
                if self.idle:
                    self.backend.idle()
        except KeyboardInterrupt:
            self.let_go()
            phase = self.watching.phase if self.watching else None
            print(f"\ndetached from run {self.run_id}" + (f"; phase {phase} keeps running" if phase else "") +
                  f".\n  follow it again: python -m jobs.controller resume {self.run_id}{store_flag(self.store)}"
                  f"\n  stop it:         python -m jobs.controller stop {self.run_id}{store_flag(self.store)}",
                  flush=True)
            sys.exit(130)

    def let_go(self) -> None:
        for _ in range(5):
            run, version = read_run(self.store, self.run_id)
            if pipeline.lease_holder(run, time.time()) != self.owner:
                return
            pipeline.release_lease(run, self.owner)
            if self._write(run, version):
                return


def stop_run(store: Store, run_id: str) -> list[str] | None:
    """Cancel the run and stop the jobs of its running phases: their names, or None if the run was over already."""
    while True:
        run, version = read_run(store, run_id)
        if pipeline.run_status(run) in OVER:
            return None
        running = pipeline.cancel(run, time.time())
        try:
            write_run(store, run, version)
            break
        except PreconditionFailed:
            continue  # changed under us: decide again on the new state
    backend = make_backend(run, store)
    for name in running:
        backend.stop(phase_job(run, store, name, run.phases[name].attempt))
    return [run.phases[name].job_name for name in running]


def drive_in_background(store: Store, run_id: str) -> str:
    """Drive the run from a controller process of its own (`resume`), which outlives this one; its output's path."""
    log_dir = local_state_dir(store)
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{run_id}-controller.log")
    with open(log_path, "ab") as log:
        subprocess.Popen([sys.executable, "-m", "jobs.controller", "resume", run_id, "--store", store_root(store)],
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return log_path


def phase_log(store: Store, run: pipeline.RunState, phase: str, attempt: int) -> str:
    """The output of one attempt of a phase: from the backend while it runs (the store's copy lags behind) or when
    the store has none (its controller died before copying it), else the store's copy."""
    job = phase_job(run, store, phase, attempt)
    p = run.phases[phase]
    if p.state == pipeline.RUNNING and attempt == p.attempt:
        return make_backend(run, store).logs(job)
    try:
        return store.get_text(in_run(run.run_id, log_key(phase, attempt)))
    except FileNotFoundError:
        return make_backend(run, store).logs(job)


def store_flag(store: Store) -> str:
    """' --store URL' where the store is not the default one, so printed commands work as they are."""
    return "" if store_root(store) == store_root(open_store(get_store_url())) else f" --store {store_root(store)}"
