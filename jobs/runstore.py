"""Runs in the store: reading, writing (compare-and-swap) and listing run.json, and the lease that says which
controller drives a run.

A run's truth is its run.json, changed only by compare-and-swap: every writer passes the version it read, so a
change made meanwhile (a stop, a resume, another controller) is never overwritten. A controller drives a run only
while it holds the lease written in run.json, renewed as it goes, so two controllers never both move one run.
"""

import json
import os
import re
import socket
import time

from jobs import pipeline
from jobs.config import ConfigError, complete, validate
from vibechat.common import VibechatError
from vibechat.layout import RUN_FILE, RUNS_DIR, in_run, run_dir, run_ids
from vibechat.liveness import owner_id  # noqa: F401 (controllers and phases name themselves alike)
from vibechat.storage import PreconditionFailed, Store

LEASE_SECONDS = 60  # a controller that stops renewing loses its run after this long
# DNS-1035 and at most 20 characters: vibechat-<run>-tokenizer-eval-<attempt>-worker-<n> must fit in 63
RUN_ID = re.compile(r"^[a-z]([-a-z0-9]{0,18}[a-z0-9])?$")


class LeaseHeld(VibechatError):
    """Another live controller drives the run."""


class RunNotFound(VibechatError):
    """The store has no run.json for the run id."""


def check_run_id(run_id: str) -> None:
    if not RUN_ID.match(run_id):
        raise VibechatError(f"run id {run_id!r} is not usable: use 1-20 lowercase letters, digits and '-', "
                            "starting with a letter and not ending with '-' (it becomes part of job names)")


def new_run_id(now: float) -> str:
    return time.strftime("run-%y%m%d-%H%M%S", time.localtime(now))


def read_run(store: Store, run_id: str) -> tuple[pipeline.RunState, str]:
    """The run and the version of its run.json (for put_if_version)."""
    check_run_id(run_id)
    key = in_run(run_id, RUN_FILE)
    got = store.get_versioned(key)
    if got is None:
        raise RunNotFound(f"no run {run_id!r} in store {store.uri()} (its folder {run_dir(run_id)}/ is missing or "
                          "was deleted): `python -m jobs.controller list` shows the runs there")
    data, version = got
    where = store.uri(key)
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise pipeline.RunFileError(f"{where} is not valid JSON ({e}); it is the controller's record of the run: "
                                    "restore it or start a new run") from None
    run = pipeline.from_dict(d, where)
    try:
        validate(run.config, f"{where}: config")
        run.config = complete(run.config, f"{where}: config")
    except ConfigError as e:
        raise pipeline.RunFileError(str(e)) from None
    return run, version


def write_run(store: Store, run: pipeline.RunState, version: str | None) -> str:
    """Write run.json only if it is still at `version` (None: only if it does not exist); the new version."""
    data = json.dumps(pipeline.to_dict(run), indent=1).encode()
    return store.put_if_version(in_run(run.run_id, RUN_FILE), data, version)


def list_run_ids(store: Store) -> list[str]:
    return run_ids(store.list(RUNS_DIR + "/"))


def create_run(store: Store, preset: str, config: dict, backend: str, run_id: str | None,
               owner: str | None) -> pipeline.RunState:
    """Write the run.json of a new run, leased to `owner` if given."""
    now = time.time()
    run_id = new_run_id(now) if run_id is None else run_id
    check_run_id(run_id)
    run = pipeline.new_run(run_id, preset, config, backend, now)
    if owner:
        pipeline.take_lease(run, owner, now, LEASE_SECONDS)
    try:
        write_run(store, run, None)
    except PreconditionFailed:
        raise VibechatError(f"run {run_id!r} already exists in {store.uri()}: resume it with "
                            f"`python -m jobs.controller resume {run_id}` or pick another --run-id") from None
    return run


# --- leases -------------------------------------------------------------------------------------

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


def claim(run: pipeline.RunState, owner: str, now: float) -> None:
    """Take or renew the run's lease, or raise LeaseHeld naming the controller that holds it."""
    holder = pipeline.lease_holder(run, now)
    if holder not in (None, owner):
        if owner_alive(holder):
            until = time.strftime("%H:%M:%S", time.localtime(run.lease.expires_at))
            raise LeaseHeld(f"run {run.run_id} is being driven by controller {holder} (lease renewed until {until}); "
                            f"watch it with `python -m jobs.controller status {run.run_id}` or stop it first")
        run.lease = None  # its owner died on this machine: no need to wait for the expiry
    pipeline.take_lease(run, owner, now, LEASE_SECONDS)
