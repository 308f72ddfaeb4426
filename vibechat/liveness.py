"""Liveness records: whether a phase attempt is alive, for every controller on every machine.

A backend knows its own jobs only (the local one keeps them per machine), so a controller on another machine, or
with another HOME, would take a running phase for one that never started and start it a second time. Instead, each
attempt has a record in the store, runs/<run>/live/<phase>-<attempt>.json:

    {"owner": "host:pid", "deadline": <unix time>, "exit_code": null}

The controller writes it before it submits the job (a deadline of TTL_SECONDS, time for the process to start);
the running phase itself renews it every TTL_SECONDS / 4 (rank 0, under vibechat.common.run_main, which reads
VIBECHAT_STORE, VIBECHAT_RUN, VIBECHAT_PHASE and VIBECHAT_ATTEMPT) and writes its exit code when it ends. A record
is alive while it has no exit code and its deadline has not passed; one whose deadline passed is a dead process.
"""

import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass

from vibechat.layout import in_run, liveness_key
from vibechat.storage import Store, open_store

TTL_SECONDS = 60.0  # a record not renewed for this long is a dead process (renewals come 4 times as often)


@dataclass
class Liveness:
    owner: str  # host:pid of the process (or of the controller that submitted it, until it starts)
    deadline: float  # unix time after which, unrenewed, the attempt is dead
    exit_code: int | None = None  # set when the process ended

    def alive(self, now: float) -> bool:
        return self.exit_code is None and now < self.deadline


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def write(store: Store, run_id: str, phase: str, attempt: int, record: Liveness) -> None:
    store.put_text(in_run(run_id, liveness_key(phase, attempt)), json.dumps(asdict(record)))


def read(store: Store, run_id: str, phase: str, attempt: int) -> Liveness | None:
    """The attempt's record; None if it has none (an unreadable one counts as none: the backend decides then)."""
    try:
        d = json.loads(store.get_bytes(in_run(run_id, liveness_key(phase, attempt))))
        return Liveness(str(d["owner"]), float(d["deadline"]), d["exit_code"])
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return None


class Heartbeat:
    """Renews an attempt's record from a thread while the block runs; writes its exit code at the end."""

    def __init__(self, store: Store, run_id: str, phase: str, attempt: int, ttl: float = TTL_SECONDS):
        self.store, self.run_id, self.phase, self.attempt, self.ttl = store, run_id, phase, attempt, ttl
        self.owner = owner_id()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="liveness", daemon=True)

    def _write(self, exit_code: int | None) -> None:
        record = Liveness(self.owner, time.time() + (self.ttl if exit_code is None else 0), exit_code)
        write(self.store, self.run_id, self.phase, self.attempt, record)

    def _renew(self) -> None:
        while not self._done.is_set():
            try:
                self._write(None)
            except Exception as e:  # the store is down past its patience: the phase's own writes will say so
                print(f"warning: could not renew the liveness record: {e}", file=sys.stderr, flush=True)
            self._done.wait(self.ttl / 4)

    def __enter__(self) -> "Heartbeat":
        self._write(None)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._done.set()
        self._thread.join()
        if exc is None:
            code = 0
        elif isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:
            code = 1
        try:
            self._write(code)
        except Exception as e:  # the phase's own outcome matters more; the record then expires
            print(f"warning: could not record the exit code in the liveness record: {e}", file=sys.stderr, flush=True)


def heartbeat_from_env() -> Heartbeat | None:
    """The Heartbeat of a phase the controller started (the variables it sets), on rank 0 only; else None."""
    names = ("VIBECHAT_STORE", "VIBECHAT_RUN", "VIBECHAT_PHASE", "VIBECHAT_ATTEMPT")
    if not all(os.environ.get(n) for n in names) or os.environ.get("RANK", "0") != "0":
        return None
    store, run_id, phase, attempt = (os.environ[n] for n in names)
    return Heartbeat(open_store(store), run_id, phase, int(attempt))
