"""Run the vibechat pipeline: one phase job after another, on this machine or on Kubernetes.

    python -m jobs.controller start --preset tiny      # the whole pipeline here, with progress
    python -m jobs.controller status [RUN]             # every phase of a run (default: the newest)
    python -m jobs.controller list                     # all runs in the store
    python -m jobs.controller resume RUN [--from sft]  # go on after a failure, a stop or a crash
    python -m jobs.controller stop RUN                 # cancel a run and stop its job
    python -m jobs.controller logs RUN PHASE           # a phase's output
    python -m jobs.controller serve                    # in-cluster: drive every unfinished run

The controller keeps no state of its own. A run's truth is runs/<run_id>/run.json in the store,
changed only by compare-and-swap, plus what the backend says about the run's jobs. A controller
drives a run only while it holds the lease written in run.json (renewed as it goes), so two
controllers never both move one run; job names are deterministic, so a controller that restarts
adopts the job already running instead of starting a second copy.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from jobs import health
from jobs import pipeline as pl
from jobs.backends import Backend, JobStatus, PhaseJob
from jobs.config import ConfigError, complete, load_config, preset_names, validate
from vibechat.common import VibechatError, get_store_url, run_main
from vibechat.storage import LocalStore, PreconditionFailed, S3Store, Store, open_store

LEASE_SECONDS = 60  # a controller that stops renewing loses its run after this long
LOG_UPLOAD_SECONDS = 30  # how often a running job's output is copied to the store
# DNS-1035 and at most 20 characters: vibechat-<run>-tokenizer-eval-<attempt>-worker-<n> must fit in 63
RUN_ID = re.compile(r"^[a-z]([-a-z0-9]{0,18}[a-z0-9])?$")
OVER = (pl.SUCCEEDED, pl.FAILED, pl.CANCELLED)


class LeaseHeld(VibechatError):
    """Another live controller drives the run."""


class RunNotFound(VibechatError):
    """The store has no run.json for the run id."""


# --- runs in the store --------------------------------------------------------------------------

def run_key(run_id: str) -> str:
    return f"runs/{run_id}/run.json"


def check_run_id(run_id: str) -> None:
    if not RUN_ID.match(run_id):
        raise VibechatError(f"run id {run_id!r} is not usable: use 1-20 lowercase letters, digits and '-', "
                            "starting with a letter and not ending with '-' (it becomes part of job names)")


def new_run_id(now: float) -> str:
    return time.strftime("run-%y%m%d-%H%M%S", time.localtime(now))


def read_run(store: Store, run_id: str) -> tuple[pl.RunState, str]:
    """The run and the version of its run.json (for put_if_version)."""
    check_run_id(run_id)
    got = store.get_versioned(run_key(run_id))
    if got is None:
        raise RunNotFound(f"no run {run_id!r} in store {store.uri()} (its folder runs/{run_id}/ is missing or "
                          "was deleted): `python -m jobs.controller list` shows the runs there")
    data, version = got
    where = store.uri(run_key(run_id))
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise pl.RunFileError(f"{where} is not valid JSON ({e}); it is the controller's record of the run: "
                              "restore it or start a new run") from None
    run = pl.from_dict(d, where)
    try:
        validate(run.config, f"{where}: config")
        run.config = complete(run.config, f"{where}: config")
    except ConfigError as e:
        raise pl.RunFileError(str(e)) from None
    return run, version


def write_run(store: Store, run: pl.RunState, version: str | None) -> str:
    """Write run.json only if it is still at `version` (None: only if it does not exist); the new version."""
    return store.put_if_version(run_key(run.run_id), json.dumps(pl.to_dict(run), indent=1).encode(), version)


def list_run_ids(store: Store) -> list[str]:
    return sorted(k.split("/")[1] for k in store.list("runs/") if re.fullmatch(r"runs/[^/]+/run\.json", k))


def store_root(store: Store) -> str:
    """The store's URL as phases on other processes (another cwd) must see it."""
    return store.root if isinstance(store, LocalStore) else store.url


# --- leases -------------------------------------------------------------------------------------

def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str) -> bool:
    """Whether a lease owner may still be driving: checked for a process of this machine, assumed for others."""
    import psutil

    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def claim(run: pl.RunState, owner: str, now: float) -> None:
    """Take or renew the run's lease, or raise LeaseHeld naming the controller that holds it."""
    holder = pl.lease_holder(run, now)
    if holder not in (None, owner):
        if owner_alive(holder):
            until = time.strftime("%H:%M:%S", time.localtime(run.lease.expires_at))
            raise LeaseHeld(f"run {run.run_id} is being driven by controller {holder} (lease renewed until {until}); "
                            f"watch it with `python -m jobs.controller status {run.run_id}` or stop it first")
        run.lease = None  # its owner died on this machine: no need to wait for the expiry
    pl.take_lease(run, owner, now, LEASE_SECONDS)


# --- backends -----------------------------------------------------------------------------------

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


def make_backend(run: pl.RunState, store: Store) -> Backend:
    if run.backend == "kubernetes":
        from jobs.backends.kubernetes import KubernetesBackend

        k8s = run.config["kubernetes"]
        return KubernetesBackend(namespace=k8s["namespace"], image=k8s["image"], settings=k8s)
    from jobs.backends.local import LocalBackend

    return LocalBackend(local_state_dir(store))


def phase_job(run: pl.RunState, store: Store, phase: str, attempt: int) -> PhaseJob:
    cfg = run.config["phases"][phase]
    env = {
        "VIBECHAT_STORE": store_root(store),
        "VIBECHAT_RUN": run.run_id,
        "VIBECHAT_DATASET": run.config["dataset"],
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(run.config["omp_num_threads"] or os.cpu_count() or 1),
    }
    return PhaseJob(run.run_id, phase, attempt, cfg["module"], pl.phase_argv(phase, cfg["args"]), env,
                    cfg["nnodes"], cfg["nproc_per_node"], cfg["gpus_per_node"], cfg.get("resources", {}))


def log_key(run_id: str, phase: str, attempt: int) -> str:
    return f"runs/{run_id}/logs/{phase}-{attempt}.log"


# --- the console --------------------------------------------------------------------------------

STEP = re.compile(r"\bstep\s+(\d+)\s*/\s*(\d+)")
LOSS = re.compile(r"\bloss\s+([-+0-9.eE]+|nan|inf)")
TOKS = re.compile(r"\btok/s\s+([0-9][0-9,.]*)")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Console:
    """Prints a phase's output; its `step N/M | loss X | tok/s Y` lines become one progress line with an ETA."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix  # the run id, where several runs share one console
        self.tty = sys.stdout.isatty()
        self.progress_shown = False
        self.first_step: dict[str, tuple[float, int]] = {}  # job name -> (time, step) of the first step line

    def say(self, message: str) -> None:
        self._end_progress()
        print(f"[{time.strftime('%H:%M:%S')}] {self.prefix}{message}", flush=True)

    def output(self, job: PhaseJob, text: str, now: float) -> None:
        for line in text.splitlines():
            step = STEP.search(line)
            loss, toks = LOSS.search(line), TOKS.search(line)
            # a step line that says more than loss and speed (`step 250/1000 | val bpb 0.91`) is shown as it is
            bare = step is not None and not STEP.sub("", line).strip(" |")
            if step is None or not (loss or toks or bare):
                self._end_progress()
                print(f"  {job.phase} | {line}", flush=True)
                continue
            done, total = int(step.group(1)), int(step.group(2))
            parts = [f"  {job.phase} | step {done}/{total}" + (f" ({100 * done // total}%)" if total else "")]
            if loss:
                parts.append(f"loss {loss.group(1)}")
            if toks:
                parts.append(f"tok/s {toks.group(1)}")
            t0, s0 = self.first_step.setdefault(job.name, (now, done))
            if done > s0 and total >= done:
                parts.append(f"eta {_duration((total - done) * (now - t0) / (done - s0))}")
            if self.tty:
                print("\r\033[K" + " | ".join(parts), end="", flush=True)
                self.progress_shown = True
            else:
                print(" | ".join(parts), flush=True)

    def _end_progress(self) -> None:
        if self.progress_shown:
            print(flush=True)
            self.progress_shown = False


# --- driving a run ------------------------------------------------------------------------------

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

    def step(self) -> pl.RunState | None:
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
        action = pl.next_action(run, now)
        if action.kind == "submit":
            job = phase_job(run, self.store, action.phase, action.attempt)
            pl.mark_running(run, action.phase, action.attempt, job.name, now)
            # record the attempt before starting it: a crash in between resubmits the same job name, never a new one
            if not self._write(run, version):
                return None
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
            ended = job if run.phases[job.phase].state != pl.RUNNING else None
            self.idle = not changed
        elif action.kind == "wait":
            self.idle = True
        elif action.kind == "cancelled":
            for name, p in run.phases.items():
                if p.state == pl.CANCELLED and p.job_name:
                    self.backend.stop(phase_job(run, self.store, name, p.attempt))
        if pl.run_status(run) in OVER:
            pl.release_lease(run, self.owner)
            changed = True
        renew = lease_was is None or lease_was.owner != self.owner or lease_was.expires_at - now < LEASE_SECONDS / 2
        if (changed or renew) and not self._write(run, version):
            return None
        if ended is not None:
            # its end is in run.json now: the job may go (the kubernetes backend lets the operator delete it later)
            getattr(self.backend, "recorded", lambda job: None)(ended)
        return run

    def _watch(self, run: pl.RunState, job: PhaseJob, now: float) -> bool:
        """Follow the phase's job; True when `run` changed (the job was seen, or its end recorded)."""
        self.watching = job
        status = self.backend.status(job)
        self._follow(job, now)
        seen = run.phases[job.phase].job_seen
        if status.state == "missing" and not seen:
            # recorded as running but never started: the last controller stopped between the two
            self.say(f"{job.phase}: job {job.name} not found; submitting it")
            self.backend.submit(job)
            health.SUBMITTED.inc()
            self.known.add(job.name)
            return False
        if status.state == "missing":
            # it existed and is gone before its end was seen: the outcome is unknown, so the attempt
            # failed and a retry starts under a new name (training resumes from its checkpoint)
            status = JobStatus("failed", f"job {job.name} was deleted before the controller saw it end")
        else:
            if job.name not in self.known:  # started by a controller before this one
                health.ADOPTED.inc()
                self.known.add(job.name)
            if not seen:
                pl.mark_seen(run, job.phase)
                return True
        if status.state in ("pending", "running"):
            if now - self.uploaded_at.get(job.name, now) > LOG_UPLOAD_SECONDS:
                self._upload_log(job, now)
            self.uploaded_at.setdefault(job.name, now)
            return False
        self._upload_log(job, now)
        if status.state == "succeeded":
            pl.mark_succeeded(run, job.phase, now)
            p = run.phases[job.phase]
            self.say(f"{job.phase}: succeeded in {_duration(now - p.started_at)}")
        else:
            pl.mark_failed(run, job.phase, status.message, now)
            p = run.phases[job.phase]
            delay = pl.retry_delay(p.failures, run.config["retries"])
            retry = "" if p.state == pl.FAILED else f"; retrying in {delay:g}s"
            self.say(f"{job.phase}: attempt {job.attempt} failed: {status.message}{retry}")
        self.watching = None
        return True

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
        self.store.put_text(log_key(job.run_id, job.phase, job.attempt), self.backend.logs(job))
        self.uploaded_at[job.name] = now

    def _write(self, run: pl.RunState, version: str) -> bool:
        try:
            write_run(self.store, run, version)
            return True
        except PreconditionFailed:
            return False  # someone (stop, resume) changed run.json: read it again next tick

    def drive(self) -> pl.RunState:
        """step() until the run is over; Ctrl-C lets go of the run and leaves its job running."""
        try:
            while True:
                run = self.step()
                if run is not None and pl.run_status(run) in OVER:
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
            if pl.lease_holder(run, time.time()) != self.owner:
                return
            pl.release_lease(run, self.owner)
            if self._write(run, version):
                return


def store_flag(store: Store) -> str:
    """' --store URL' where the store is not the default one, so printed commands work as they are."""
    return "" if store_root(store) == store_root(open_store(get_store_url())) else f" --store {store_root(store)}"


def report_summary(run: pl.RunState, store: Store) -> None:
    report = store.uri(f"runs/{run.run_id}/report/report.md")
    print(f"\nreport:    {report}" + ("" if store.exists(f"runs/{run.run_id}/report/report.md") else " (not written)"))
    print(f"dashboard: VIBECHAT_STORE={store_root(store)} streamlit run dashboard/app.py")


# --- commands -----------------------------------------------------------------------------------

def create_run(store: Store, preset: str, config: dict, backend: str, run_id: str | None,
               owner: str | None) -> pl.RunState:
    """Write the run.json of a new run, leased to `owner` if given."""
    now = time.time()
    run_id = run_id or new_run_id(now)
    check_run_id(run_id)
    run = pl.new_run(run_id, preset, config, backend, now)
    if owner:
        pl.take_lease(run, owner, now, LEASE_SECONDS)
    try:
        write_run(store, run, None)
    except PreconditionFailed:
        raise VibechatError(f"run {run_id!r} already exists in {store.uri()}: resume it with "
                            f"`python -m jobs.controller resume {run_id}` or pick another --run-id") from None
    return run


def cmd_start(args) -> int:
    store = open_store(args.store)
    config = load_config(args.preset, args.config)
    if args.run_id:
        check_run_id(args.run_id)
    backend, why = pick_backend(args.backend, store)
    owner = None if args.detach or args.no_drive else owner_id()
    run = create_run(store, args.preset, config, backend, args.run_id, owner)
    print(f"run {run.run_id}: preset {args.preset}, store {store.uri()}")
    print(f"backend {backend}: {why}")
    skipped = [n for n, p in run.phases.items() if p.state == pl.SKIPPED]
    print("phases: " + " -> ".join(n for n in pl.PHASES if n not in skipped) + (f" (skipped: {', '.join(skipped)})"
                                                                                if skipped else ""))
    if args.no_drive:
        print(f"run {run.run_id} is in the store for a controller to drive (`serve`: the in-cluster leader picks it "
              f"up within its --interval)\n  status: python -m jobs.controller status {run.run_id}{store_flag(store)}")
        return 0
    if args.detach:
        return detach(store, run.run_id)
    return finish(Driver(store, run.run_id, make_backend(run, store), owner, Console(), follow=True).drive(), store)


def detach(store: Store, run_id: str) -> int:
    """Drive the run from a controller process of its own that outlives this one."""
    log_dir = local_state_dir(store)
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{run_id}-controller.log")
    with open(log_path, "ab") as log:
        subprocess.Popen([sys.executable, "-m", "jobs.controller", "resume", run_id, "--store", store_root(store)],
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    flag = store_flag(store)
    print(f"driving run {run_id} in the background (its output: {log_path})")
    print(f"  status: python -m jobs.controller status {run_id}{flag}")
    print(f"  stop:   python -m jobs.controller stop {run_id}{flag}")
    return 0


def finish(run: pl.RunState, store: Store) -> int:
    status = pl.run_status(run)
    name = pl.next_phase(run)
    if status == pl.SUCCEEDED:
        print(f"\nrun {run.run_id} succeeded")
    elif status == pl.FAILED:
        print(f"\nrun {run.run_id} failed at phase {name}: {run.phases[name].error}\n"
              f"  its output: python -m jobs.controller logs {run.run_id} {name}{store_flag(store)}\n"
              f"  go on:      python -m jobs.controller resume {run.run_id}{store_flag(store)}")
    else:
        print(f"\nrun {run.run_id} was cancelled at phase {name}")
    report_summary(run, store)
    return 0 if status == pl.SUCCEEDED else 1


def cmd_resume(args) -> int:
    store = open_store(args.store)
    owner = owner_id()
    while True:
        run, version = read_run(store, args.run_id)
        if pl.run_status(run) == pl.SUCCEEDED and not args.from_phase:
            print(f"run {run.run_id} has succeeded already; `resume {run.run_id} --from PHASE` redoes a phase")
            return 0
        claim(run, owner, time.time())  # before anything changes: a live driver keeps its run
        backend = make_backend(run, store)
        to_stop = pl.resume(run, args.from_phase)
        if args.from_phase:
            kept = [n for n in pl.PHASES[pl.PHASES.index(args.from_phase):]
                    if store.list(f"runs/{run.run_id}/checkpoints/{n}/")]
            if kept:
                print(f"note: checkpoints of {', '.join(kept)} are kept; those phases continue from them "
                      f"(delete runs/{run.run_id}/checkpoints/<phase>/ to redo one from scratch)")
        try:
            write_run(store, run, version)
            break
        except PreconditionFailed:
            continue  # changed under us: decide again on the new state
    for name in to_stop:
        backend.stop(phase_job(run, store, name, run.phases[name].attempt))
    print(f"resuming run {run.run_id} at phase {pl.next_phase(run)} (backend {run.backend})")
    return finish(Driver(store, run.run_id, backend, owner, Console(), follow=True).drive(), store)


def cmd_stop(args) -> int:
    store = open_store(args.store)
    while True:
        run, version = read_run(store, args.run_id)
        if pl.run_status(run) in OVER:
            print(f"run {run.run_id} is already {pl.run_status(run)}")
            return 0
        running = pl.cancel(run, time.time())
        try:
            write_run(store, run, version)
            break
        except PreconditionFailed:
            continue
    backend = make_backend(run, store)
    for name in running:
        print(f"stopping {run.phases[name].job_name}")
        backend.stop(phase_job(run, store, name, run.phases[name].attempt))
    print(f"run {run.run_id} cancelled; `python -m jobs.controller resume {run.run_id}{store_flag(store)}` goes on "
          "from where it stopped")
    return 0


def _clock(t: float | None) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_status(args) -> int:
    store = open_store(args.store)
    run_id = args.run_id
    if run_id is None:
        ids = list_run_ids(store)
        if not ids:
            raise VibechatError(f"no runs in store {store.uri()}: start one with `python -m jobs.controller start`")
        run_id = max(ids, key=lambda i: read_run(store, i)[0].created_at)
    run, _ = read_run(store, run_id)
    now = time.time()
    holder = pl.lease_holder(run, now)
    print(f"run {run.run_id}: {pl.run_status(run)} | preset {run.preset} | backend {run.backend} | "
          f"created {_clock(run.created_at)}" + (f" | driven by {holder}" if holder else ""))
    w = max(map(len, pl.PHASES))
    print(f"{'phase':<{w}} {'state':<10} {'attempt':>7}  {'started':<15} {'took':>8}  job / error")
    for name in pl.PHASES:
        p = run.phases[name]
        took = _duration((p.ended_at or now) - p.started_at) if p.started_at else "-"
        detail = p.error if p.error else (p.job_name if p.state == pl.RUNNING else "")
        print(f"{name:<{w}} {p.state:<10} {p.attempt:>7}  {_clock(p.started_at):<15} {took:>8}  {detail}".rstrip())
    report_summary(run, store)
    return 0


def cmd_list(args) -> int:
    store = open_store(args.store)
    ids = list_run_ids(store)
    if not ids:
        print(f"no runs in store {store.uri()}")
        return 0
    w = max(map(len, pl.PHASES))
    print(f"{'run':<20} {'preset':<8} {'status':<10} {'phase':<{w}} created")
    for run_id in ids:
        try:
            run, _ = read_run(store, run_id)
        except VibechatError as e:
            print(f"{run_id:<20} unreadable: {e}")
            continue
        print(f"{run_id:<20} {run.preset:<8} {pl.run_status(run):<10} {pl.next_phase(run) or '-':<{w}} "
              f"{_clock(run.created_at)}")
    return 0


def cmd_logs(args) -> int:
    store = open_store(args.store)
    if args.phase not in pl.PHASES:
        raise VibechatError(f"unknown phase {args.phase!r}: valid phases are {', '.join(pl.PHASES)}")
    run, _ = read_run(store, args.run_id)
    p = run.phases[args.phase]
    attempt = args.attempt or p.attempt
    if attempt == 0:
        raise VibechatError(f"phase {args.phase} of run {run.run_id} has not started yet ({p.state})")
    if not 1 <= attempt <= p.attempt:
        raise VibechatError(f"phase {args.phase} of run {run.run_id} has attempts 1..{p.attempt}, not {attempt}")
    job = phase_job(run, store, args.phase, attempt)
    if p.state == pl.RUNNING and attempt == p.attempt:  # the store's copy lags behind: ask the backend
        text = make_backend(run, store).logs(job)
    else:
        try:
            text = store.get_text(log_key(run.run_id, args.phase, attempt))
        except FileNotFoundError:  # its controller died before copying it: the backend may still have it
            text = make_backend(run, store).logs(job)
    sys.stdout.write(text)
    return 0


def cmd_serve(args) -> int:
    store = open_store(args.store)
    owner = owner_id()
    drivers: dict[str, Driver] = {}
    beat = health.Health(stale_s=max(10 * args.interval, 120))
    health.serve_http(args.http_port, beat)
    if args.leader_elect:
        from jobs.backends.kubernetes import hold_leadership

        lock = hold_leadership(owner, args.namespace)

        def shut_down(signum, frame):
            # the kubelet's SIGTERM: let go of the runs and the Lease, so the other replica leads at its next try
            for driver in drivers.values():
                driver.let_go()
            lock.release()
            print(f"controller {owner}: terminated; released its runs and the leader Lease", flush=True)
            os._exit(0)  # at once: nothing may act as leader after the release

        signal.signal(signal.SIGTERM, shut_down)
    print(f"controller {owner} driving the {args.backend} runs of store {store.uri()} (a pass at least every "
          f"{args.interval}s)", flush=True)
    changed = threading.Event()
    if args.backend == "kubernetes":  # PyTorchJob changes wake the loop; passes without them only resync
        from jobs.backends.kubernetes import job_changes

        changed = job_changes(args.namespace)
    while True:
        serve_pass(store, args.backend, owner, drivers)
        beat.passed()
        changed.wait(args.interval)
        changed.clear()


def serve_pass(store: Store, backend: str, owner: str, drivers: dict[str, "Driver"]) -> None:
    """One step of every unfinished run of `backend` in the store whose lease is free or ours."""
    runs = []
    for run_id in list_run_ids(store):
        try:
            run, _ = read_run(store, run_id)
            runs.append(run)
            if pl.run_status(run) in OVER or run.backend != backend:
                drivers.pop(run_id, None)
                continue
            if run_id not in drivers:
                drivers[run_id] = Driver(store, run_id, make_backend(run, store), owner, Console(f"{run_id} "),
                                         follow=False)
            drivers[run_id].step()
        except LeaseHeld:
            continue  # another controller drives it
        except VibechatError as e:  # one broken run must not stop the others
            print(f"run {run_id}: {e}", flush=True)
    health.observe(runs, time.time())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.controller", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    store_help = "store root: file:///path, s3://bucket/prefix or a path (default $VIBECHAT_STORE or ~/.cache/vibechat)"

    def command(name, func, help):
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("--store", default=get_store_url(), help=store_help)
        c.set_defaults(func=func)
        return c

    c = command("start", cmd_start, "start a new run and drive it to the end")
    c.add_argument("--preset", default="tiny", help=f"how big the run is: {', '.join(preset_names())} (default tiny)")
    c.add_argument("--config", help="a YAML file merged over the preset (same keys; see jobs/presets/)")
    c.add_argument("--backend", choices=["auto", "local", "kubernetes"], default="auto",
                   help="where phases run; auto: Kubernetes when a cluster with PyTorchJobs answers, else here")
    c.add_argument("--run-id", help="name of the run (default run-YYMMDD-HHMMSS)")
    how = c.add_mutually_exclusive_group()
    how.add_argument("--detach", action="store_true", help="drive the run from a background process and return")
    how.add_argument("--no-drive", action="store_true",
                     help="only write the run to the store, for the controller that serves it (in a cluster: the leader)")
    c = command("status", cmd_status, "show every phase of a run")
    c.add_argument("run_id", nargs="?", metavar="RUN", help="the run (default: the newest)")
    command("list", cmd_list, "list the runs in the store")
    c = command("resume", cmd_resume, "go on with a run that failed, was stopped, or lost its controller")
    c.add_argument("run_id", metavar="RUN")
    c.add_argument("--from", dest="from_phase", metavar="PHASE",
                   help=f"redo this phase and all after it ({', '.join(pl.PHASES)})")
    c = command("stop", cmd_stop, "cancel a run and stop its running job")
    c.add_argument("run_id", metavar="RUN")
    c = command("logs", cmd_logs, "print the output of a phase")
    c.add_argument("run_id", metavar="RUN")
    c.add_argument("phase", metavar="PHASE", help=", ".join(pl.PHASES))
    c.add_argument("--attempt", type=int, help="which attempt (default: the latest)")
    c = command("serve", cmd_serve, "drive every unfinished run in the store (the in-cluster controller)")
    c.add_argument("--interval", type=float, default=10.0,
                   help="most seconds between passes over the runs (a PyTorchJob change starts one at once)")
    c.add_argument("--http-port", type=int, default=8080, help="port of /healthz and /metrics (default 8080)")
    c.add_argument("--backend", choices=["kubernetes", "local"], default="kubernetes",
                   help="drive the runs of this backend only (default kubernetes: local runs belong to their machine)")
    c.add_argument("--leader-elect", action="store_true", help="serve only while holding the controller Lease")
    c.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "vibechat"),
                   help="namespace of the leader Lease (default $POD_NAMESPACE or vibechat)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    run_main(main)
