"""Run the vibechat pipeline: one phase job after another, on this machine or on Kubernetes.

    python -m jobs.controller start --preset tiny      # the whole pipeline here, with progress
    python -m jobs.controller status [RUN]             # every phase of a run (default: the newest)
    python -m jobs.controller list                     # all runs in the store
    python -m jobs.controller resume RUN [--from sft]  # go on after a failure, a stop or a crash
    python -m jobs.controller stop RUN                 # cancel a run and stop its job
    python -m jobs.controller logs RUN PHASE           # a phase's output
    python -m jobs.controller serve                    # in-cluster: drive every unfinished run

The controller keeps no state of its own. A run's truth is its run.json in the store, changed only
by compare-and-swap, plus what the backend says about the run's jobs. A controller drives a run only
while it holds the run's lease, so two controllers never both move one run; job names are
deterministic, so a controller that restarts adopts the job already running instead of starting a
second copy. This file is the command line; the parts are jobs/runstore.py (run.json and leases),
jobs/driver.py (backends and the Driver) and jobs/console.py (what the user sees of a phase).
"""

import argparse
import os
import signal
import sys
import threading
import time

from jobs import health, pipeline
from jobs.config import check_phase_args, load_config, preset_names
from jobs.console import Console
from jobs.driver import (OVER, Driver, drive_in_background, make_backend, phase_job, phase_log, pick_backend, stop_run,
                         store_flag, store_root)
from jobs.runstore import LeaseHeld, check_run_id, claim, create_run, list_run_ids, read_run, write_run
from vibechat.common import VibechatError, format_duration, get_store_url, positive_float, positive_int, run_main
from vibechat.layout import REPORT_FILE, checkpoint_dir, in_run
from vibechat.liveness import owner_id
from vibechat.storage import PreconditionFailed, Store, open_store


def report_summary(run: pipeline.RunState, store: Store) -> None:
    key = in_run(run.run_id, REPORT_FILE)
    print(f"\nreport:    {store.uri(key)}" + ("" if store.exists(key) else " (not written)"))
    print(f"dashboard: VIBECHAT_STORE={store_root(store)} streamlit run dashboard/app.py")


def cmd_start(args) -> int:
    store = open_store(args.store)
    config = load_config(args.preset, args.config)
    check_phase_args(config, f"preset {args.preset}" + (f" with {args.config}" if args.config else ""))
    if args.run_id is not None:  # "" too: an empty --run-id is a mistake, not a request for a generated one
        check_run_id(args.run_id)
    backend, why = pick_backend(args.backend, store)
    owner = None if args.detach or args.no_drive else owner_id()
    run = create_run(store, args.preset, config, backend, args.run_id, owner)
    print(f"run {run.run_id}: preset {args.preset}, store {store.uri()}")
    print(f"backend {backend}: {why}")
    skipped = [n for n, p in run.phases.items() if p.state == pipeline.SKIPPED]
    print("phases: " + " -> ".join(n for n in pipeline.PHASES if n not in skipped)
          + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
    if args.no_drive:
        print(f"run {run.run_id} is in the store for a controller to drive (`serve`: the in-cluster leader picks it "
              f"up within its --interval)\n  status: python -m jobs.controller status {run.run_id}{store_flag(store)}")
        return 0
    if args.detach:
        return detach(store, run.run_id)
    return finish(Driver(store, run.run_id, make_backend(run, store), owner, Console(), follow=True).drive(), store)


def detach(store: Store, run_id: str) -> int:
    log_path = drive_in_background(store, run_id)
    flag = store_flag(store)
    print(f"driving run {run_id} in the background (its output: {log_path})")
    print(f"  status: python -m jobs.controller status {run_id}{flag}")
    print(f"  stop:   python -m jobs.controller stop {run_id}{flag}")
    return 0


def finish(run: pipeline.RunState, store: Store) -> int:
    status = pipeline.run_status(run)
    name = pipeline.next_phase(run)
    if status == pipeline.SUCCEEDED:
        print(f"\nrun {run.run_id} succeeded")
    elif status == pipeline.FAILED:
        print(f"\nrun {run.run_id} failed at phase {name}: {run.phases[name].error}\n"
              f"  its output: python -m jobs.controller logs {run.run_id} {name}{store_flag(store)}\n"
              f"  go on:      python -m jobs.controller resume {run.run_id}{store_flag(store)}")
    else:
        print(f"\nrun {run.run_id} was cancelled at phase {name}")
    report_summary(run, store)
    return 0 if status == pipeline.SUCCEEDED else 1


def cmd_resume(args) -> int:
    store = open_store(args.store)
    owner = owner_id()
    while True:
        run, version = read_run(store, args.run_id)
        if pipeline.run_status(run) == pipeline.SUCCEEDED and not args.from_phase:
            print(f"run {run.run_id} has succeeded already; `resume {run.run_id} --from PHASE` runs a phase "
                  "and those after it again")
            return 0
        claim(run, owner, time.time())  # before anything changes: a live driver keeps its run
        backend = make_backend(run, store)
        to_stop = pipeline.resume(run, args.from_phase)
        if args.from_phase:
            kept = [n for n in pipeline.PHASES[pipeline.PHASES.index(args.from_phase):]
                    if store.list(in_run(run.run_id, checkpoint_dir(n)) + "/")]
            if kept:
                print(f"note: checkpoints of {', '.join(kept)} are kept; those phases continue from them "
                      f"(delete {in_run(run.run_id, checkpoint_dir('<phase>'))}/ to redo one from scratch)")
        try:
            write_run(store, run, version)
            break
        except PreconditionFailed:
            continue  # changed under us: decide again on the new state
    for name in to_stop:
        backend.stop(phase_job(run, store, name, run.phases[name].attempt))
    print(f"resuming run {run.run_id} at phase {pipeline.next_phase(run)} (backend {run.backend})")
    return finish(Driver(store, run.run_id, backend, owner, Console(), follow=True).drive(), store)


def cmd_stop(args) -> int:
    store = open_store(args.store)
    stopped = stop_run(store, args.run_id)
    if stopped is None:
        print(f"run {args.run_id} is already {pipeline.run_status(read_run(store, args.run_id)[0])}")
        return 0
    for job_name in stopped:
        print(f"stopping {job_name}")
    print(f"run {args.run_id} cancelled; `python -m jobs.controller resume {args.run_id}{store_flag(store)}` goes on "
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
    holder = pipeline.lease_holder(run, now)
    print(f"run {run.run_id}: {pipeline.run_status(run)} | preset {run.preset} | backend {run.backend} | "
          f"created {_clock(run.created_at)}" + (f" | driven by {holder}" if holder else ""))
    w = max(map(len, pipeline.PHASES))
    print(f"{'phase':<{w}} {'state':<10} {'attempt':>7}  {'started':<15} {'took':>8}  job / error")
    for name in pipeline.PHASES:
        p = run.phases[name]
        took = format_duration((p.ended_at or now) - p.started_at) if p.started_at else "-"
        detail = p.error if p.error else (p.job_name if p.state == pipeline.RUNNING else "")
        print(f"{name:<{w}} {p.state:<10} {p.attempt:>7}  {_clock(p.started_at):<15} {took:>8}  {detail}".rstrip())
    report_summary(run, store)
    return 0


def cmd_list(args) -> int:
    store = open_store(args.store)
    ids = list_run_ids(store)
    if not ids:
        print(f"no runs in store {store.uri()}")
        return 0
    w = max(map(len, pipeline.PHASES))
    print(f"{'run':<20} {'preset':<8} {'status':<10} {'phase':<{w}} created")
    for run_id in ids:
        try:
            run, _ = read_run(store, run_id)
        except VibechatError as e:
            print(f"{run_id:<20} unreadable: {e}")
            continue
        print(f"{run_id:<20} {run.preset:<8} {pipeline.run_status(run):<10} {pipeline.next_phase(run) or '-':<{w}} "
              f"{_clock(run.created_at)}")
    return 0


def cmd_logs(args) -> int:
    store = open_store(args.store)
    if args.phase not in pipeline.PHASES:
        raise VibechatError(f"unknown phase {args.phase!r}: valid phases are {', '.join(pipeline.PHASES)}")
    run, _ = read_run(store, args.run_id)
    p = run.phases[args.phase]
    attempt = args.attempt or p.attempt
    if attempt == 0:
        raise VibechatError(f"phase {args.phase} of run {run.run_id} has not started yet ({p.state})")
    if not 1 <= attempt <= p.attempt:
        raise VibechatError(f"phase {args.phase} of run {run.run_id} has attempts 1..{p.attempt}, not {attempt}")
    text = phase_log(store, run, args.phase, attempt)
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


def serve_pass(store: Store, backend: str, owner: str, drivers: dict[str, Driver]) -> None:
    """One step of every unfinished run of `backend` in the store whose lease is free or ours."""
    runs = []
    for run_id in list_run_ids(store):
        try:
            run, _ = read_run(store, run_id)
            runs.append(run)
            if pipeline.run_status(run) in OVER or run.backend != backend:
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
                   help="run this phase and every one after it again; a training phase that has checkpoints "
                        "continues from its newest (delete runs/RUN/checkpoints/<phase>/ to train it from scratch); "
                        f"phases: {', '.join(pipeline.PHASES)}")
    c = command("stop", cmd_stop, "cancel a run and stop its running job")
    c.add_argument("run_id", metavar="RUN")
    c = command("logs", cmd_logs, "print the output of a phase")
    c.add_argument("run_id", metavar="RUN")
    c.add_argument("phase", metavar="PHASE", help=", ".join(pipeline.PHASES))
    c.add_argument("--attempt", type=positive_int, help="which attempt (default: the latest)")
    c = command("serve", cmd_serve, "drive every unfinished run in the store (the in-cluster controller)")
    c.add_argument("--interval", type=positive_float, default=10.0,
                   help="most seconds between passes over the runs (a PyTorchJob change starts one at once)")
    c.add_argument("--http-port", type=int, default=8080, help="port of /healthz and /metrics (default 8080)")
    c.add_argument("--backend", choices=["kubernetes", "local"], default="kubernetes",
                   help="drive the runs of this backend only (default kubernetes: local runs belong to their machine)")
    c.add_argument("--leader-elect", action="store_true", help="serve only while holding the controller Lease")
    c.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "vibechat"),
                   help="namespace of the leader Lease (default $POD_NAMESPACE or vibechat)")
    args = p.parse_args(argv)
    if args.command == "serve" and not 0 <= args.http_port <= 65535:
        p.error(f"--http-port {args.http_port} is not a port: use 0-65535")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    run_main(main)
