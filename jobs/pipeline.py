"""The phase graph and the state of a run: pure logic, no I/O.

A run is a row of phases done in order, each one program (`python -m <module>`). The controller
asks next_action(run, now) what to do, does it through a backend, records the outcome with
mark_running / mark_succeeded / mark_failed, and stores to_dict(run) as runs/<run_id>/run.json.

Every phase that makes something is followed by the phase that measures it: the tokenizer
(jobs.tok_train) by tokenizer_eval (jobs.tok_eval, compression beside GPT-2's and GPT-4's), and
base, mid, sft and rl by their evaluations. The optional export phase (jobs.export) writes the last
stage's model in the transformers format; the report phase gathers what they wrote.
"""

import math
from dataclasses import asdict, dataclass, field

from vibechat.common import VibechatError

PHASES = ["data", "tokenizer", "tokenizer_eval", "base", "base_eval", "mid", "mid_eval", "sft", "sft_eval",
          "rl", "rl_eval", "export", "report"]
ADDED_PHASES = ["export"]  # a run.json written before these phases existed has none: they are skipped in it

# phase -> (program, flags the phase always passes); a config may name another module, and its
# args are merged over these flags
PHASE_PROGRAMS: dict[str, tuple[str, dict]] = {
    "data": ("jobs.data", {}),
    "tokenizer": ("jobs.tok_train", {}),
    "tokenizer_eval": ("jobs.tok_eval", {}),
    "base": ("jobs.base_train", {}),
    "base_eval": ("jobs.base_eval", {}),
    "mid": ("jobs.mid_train", {}),
    "mid_eval": ("jobs.chat_eval", {"source": "mid"}),
    "sft": ("jobs.chat_sft", {}),
    "sft_eval": ("jobs.chat_eval", {"source": "sft"}),
    "rl": ("jobs.chat_rl", {}),
    "rl_eval": ("jobs.chat_eval", {"source": "rl"}),
    "export": ("jobs.export", {}),  # the last stage's model as a transformers folder, runs/<id>/export/hf/
    "report": ("jobs.report", {}),
}

PENDING, RUNNING, SUCCEEDED, FAILED = "pending", "running", "succeeded", "failed"
SKIPPED, CANCELLED = "skipped", "cancelled"
STATES = (PENDING, RUNNING, SUCCEEDED, FAILED, SKIPPED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, SKIPPED, CANCELLED)  # only resume() moves a phase out of these
DONE = (SUCCEEDED, SKIPPED)  # the next phase may start


class RunFileError(VibechatError):
    """run.json does not describe a run: the message names the file and the field."""


class InvalidTransition(ValueError):
    """A caller asked for a state change the state machine does not allow (a bug, not bad input)."""


@dataclass
class PhaseState:
    state: str = PENDING
    attempt: int = 0  # number of the latest attempt, 1-based; only grows, so job names never repeat
    failures: int = 0  # failed attempts since the run started or was last resumed
    started_at: float | None = None
    ended_at: float | None = None
    error: str = ""
    job_name: str = ""
    job_seen: bool = False  # the backend showed this attempt's job: once it is gone, it ended (never "not started")


@dataclass
class Lease:
    """Who drives the run, until when. A controller renews it while it drives."""

    owner: str
    expires_at: float


@dataclass
class RunState:
    run_id: str
    preset: str
    config: dict  # the complete config (jobs.config.load_config), frozen at start
    backend: str  # "local" | "kubernetes"
    created_at: float
    phases: dict[str, PhaseState] = field(default_factory=dict)
    lease: Lease | None = None


@dataclass(frozen=True)
class Action:
    """What the controller should do next.

    submit: start attempt `attempt` of `phase`; watch: ask the backend how attempt `attempt` is doing;
    wait: retry `phase` no earlier than `until`; done / failed / cancelled: the run is over.
    """

    kind: str
    phase: str | None = None
    attempt: int = 0
    until: float = 0.0


def new_run(run_id: str, preset: str, config: dict, backend: str, now: float) -> RunState:
    """A run with every phase pending, or skipped where the config says so."""
    phases = {name: PhaseState(SKIPPED if config["phases"][name]["skip"] else PENDING) for name in PHASES}
    return RunState(run_id, preset, config, backend, now, phases)


def phase_argv(phase: str, args: dict) -> list[str]:
    """The phase's command-line flags: its fixed flags, then args merged over them.

    {"num_iterations": 20} -> ["--num-iterations=20"]; True -> a bare flag; False / None -> left out;
    a list -> comma-separated.
    """
    merged = {**PHASE_PROGRAMS[phase][1], **args}
    argv = []
    for key, value in merged.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv.append(f"{flag}={','.join(str(v) for v in value)}")
        else:
            argv.append(f"{flag}={value}")
    return argv


def retry_delay(failures: int, retries: dict) -> float:
    """Seconds to wait before the next attempt after `failures` failed ones: doubling, capped."""
    return min(retries["backoff_s"] * 2 ** (failures - 1), retries["backoff_max_s"])


def next_phase(run: RunState) -> str | None:
    """The first phase not yet succeeded or skipped; None when every phase is done."""
    return next((name for name in PHASES if run.phases[name].state not in DONE), None)


def next_action(run: RunState, now: float) -> Action:
    name = next_phase(run)
    if name is None:
        return Action("done")
    p = run.phases[name]
    if p.state == FAILED:
        return Action("failed", name, p.attempt)
    if p.state == CANCELLED:
        return Action("cancelled", name, p.attempt)
    if p.state == RUNNING:
        return Action("watch", name, p.attempt)
    if p.failures:
        until = p.ended_at + retry_delay(p.failures, run.config["retries"])
        if now < until:
            return Action("wait", name, p.attempt + 1, until)
    return Action("submit", name, p.attempt + 1)


def run_status(run: RunState) -> str:
    """succeeded | failed | cancelled (the run is over), running, or pending (nothing started yet)."""
    states = [p.state for p in run.phases.values()]
    if all(s in DONE for s in states):
        return SUCCEEDED
    for s in (FAILED, CANCELLED):
        if s in states:
            return s
    if any(p.attempt or p.state == SUCCEEDED for p in run.phases.values()):
        return RUNNING
    return PENDING


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidTransition(message)


def mark_running(run: RunState, phase: str, attempt: int, job_name: str, now: float) -> None:
    """Record that attempt `attempt` of `phase` is being submitted (before the backend is asked to)."""
    action = next_action(run, now)
    _require(action == Action("submit", phase, attempt), f"cannot submit {phase} attempt {attempt}: next is {action}")
    p = run.phases[phase]
    p.state, p.attempt, p.started_at, p.ended_at, p.error, p.job_name = RUNNING, attempt, now, None, "", job_name
    p.job_seen = False


def mark_seen(run: RunState, phase: str) -> None:
    """Record that the running attempt's job exists, before anything can delete it."""
    p = run.phases[phase]
    _require(p.state == RUNNING, f"{phase} is {p.state}, not running")
    p.job_seen = True


def mark_succeeded(run: RunState, phase: str, now: float) -> None:
    p = run.phases[phase]
    _require(p.state == RUNNING, f"{phase} is {p.state}, not running")
    p.state, p.ended_at, p.error = SUCCEEDED, now, ""


def mark_failed(run: RunState, phase: str, error: str, now: float) -> None:
    """An attempt failed: back to pending for a retry after backoff, or failed when attempts are spent."""
    p = run.phases[phase]
    _require(p.state == RUNNING, f"{phase} is {p.state}, not running")
    p.failures += 1
    p.state = FAILED if p.failures >= run.config["retries"]["max_attempts"] else PENDING
    p.ended_at, p.error = now, error


def cancel(run: RunState, now: float) -> list[str]:
    """Cancel every phase not yet over; returns the phases that were running (their jobs must be stopped)."""
    was_running = []
    for name in PHASES:
        p = run.phases[name]
        if p.state in TERMINAL:
            continue
        if p.state == RUNNING:
            was_running.append(name)
            p.ended_at = now
        p.state = CANCELLED
    return was_running


def resume(run: RunState, from_phase: str | None = None) -> list[str]:
    """Make a stopped run go on: failed and cancelled phases become pending with a fresh retry budget.

    With from_phase, that phase and every one after it (but skipped ones) go back to pending too,
    succeeded ones included. Returns the phases that were running and are reset (their jobs must
    be stopped). A running phase not reset stays running: its job is adopted.
    """
    if from_phase is not None:
        if from_phase not in PHASES:
            raise VibechatError(f"unknown phase {from_phase!r}: valid phases are {', '.join(PHASES)}")
        if run.phases[from_phase].state == SKIPPED:
            raise VibechatError(f"phase {from_phase!r} is skipped in run {run.run_id}'s config: resume from another")
    start = PHASES.index(from_phase) if from_phase is not None else len(PHASES)
    was_running = []
    for i, name in enumerate(PHASES):
        p = run.phases[name]
        if p.state in (FAILED, CANCELLED) or (i >= start and p.state != SKIPPED):
            if p.state == RUNNING:
                was_running.append(name)
            p.state, p.failures, p.error, p.started_at, p.ended_at = PENDING, 0, "", None, None
    return was_running


def lease_holder(run: RunState, now: float) -> str | None:
    """The owner of the run's lease while it has not expired."""
    return run.lease.owner if run.lease is not None and run.lease.expires_at > now else None


def take_lease(run: RunState, owner: str, now: float, seconds: float) -> None:
    holder = lease_holder(run, now)
    _require(holder in (None, owner), f"run {run.run_id} is leased to {holder}")
    run.lease = Lease(owner, now + seconds)


def release_lease(run: RunState, owner: str) -> None:
    if run.lease is not None and run.lease.owner == owner:
        run.lease = None


# ---------------------------------------------------------------------------------------------
# run.json

def to_dict(run: RunState) -> dict:
    return {
        "run_id": run.run_id,
        "preset": run.preset,
        "backend": run.backend,
        "created_at": run.created_at,
        "lease": None if run.lease is None else {"owner": run.lease.owner, "expires_at": run.lease.expires_at},
        "phases": {name: vars(run.phases[name]).copy() for name in PHASES},
        "config": run.config,
    }


_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))
_RUN_FIELDS = {"run_id": str, "preset": str, "backend": str, "created_at": _NUMBER, "lease": (dict, type(None)),
               "phases": dict, "config": dict}
_PHASE_FIELDS = {"state": str, "attempt": int, "failures": int, "started_at": _OPTIONAL_NUMBER,
                 "ended_at": _OPTIONAL_NUMBER, "error": str, "job_name": str, "job_seen": bool}
_LEASE_FIELDS = {"owner": str, "expires_at": _NUMBER}


def _check_fields(d, fields: dict, where: str) -> None:
    if not isinstance(d, dict):
        raise RunFileError(f"{where} should be an object, not {type(d).__name__}")
    missing = sorted(set(fields) - set(d))
    unknown = sorted(set(d) - set(fields))
    if missing or unknown:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(unknown)}"]
                                                                             if unknown else [])
        raise RunFileError(f"{where}: {'; '.join(problems)}")
    for key, types in fields.items():
        value = d[key]
        # bool is an int to Python, never to run.json; NaN and infinity are no times
        not_finite = isinstance(value, float) and not math.isfinite(value)
        if isinstance(value, bool) and types is not bool or not isinstance(value, types) or not_finite:
            raise RunFileError(f"{where}.{key} has the wrong type or value: {value!r}")


def from_dict(d: dict, where: str = "run.json") -> RunState:
    """Parse and validate a run.json object; any defect raises RunFileError naming the field."""
    try:
        _check_fields(d, _RUN_FIELDS, where)
        if isinstance(d["phases"], dict):
            d = {**d, "phases": {**{name: asdict(PhaseState(SKIPPED)) for name in ADDED_PHASES}, **d["phases"]}}
        _check_fields(d["phases"], {name: dict for name in PHASES}, f"{where}: phases")
        phases = {}
        for name in PHASES:
            pd = {"job_seen": False, **d["phases"][name]}  # run.json files from before job_seen lack it
            _check_fields(pd, _PHASE_FIELDS, f"{where}: phases.{name}")
            if pd["state"] not in STATES:
                raise RunFileError(f"{where}: phases.{name}.state is {pd['state']!r}, not one of {', '.join(STATES)}")
            if pd["attempt"] < 0 or pd["failures"] < 0:
                raise RunFileError(f"{where}: phases.{name} has a negative attempt or failure count")
            phases[name] = PhaseState(**pd)
        lease = None
        if d["lease"] is not None:
            _check_fields(d["lease"], _LEASE_FIELDS, f"{where}: lease")
            lease = Lease(**d["lease"])
        run = RunState(d["run_id"], d["preset"], d["config"], d["backend"], d["created_at"], phases, lease)
    except RunFileError as e:
        raise RunFileError(f"{e} — run.json is the controller's record of the run; restore it or start a new "
                           "run") from None
    # the order invariant: nothing ran past a phase that is not done
    for i, name in enumerate(PHASES):
        if phases[name].state in (RUNNING, SUCCEEDED):
            before = next((b for b in PHASES[:i] if phases[b].state not in DONE), None)
            if before is not None:
                raise RunFileError(f"{where}: phase {name} is {phases[name].state} but {before} before it is "
                                   f"{phases[before].state}; the file was edited or corrupted")
    return run
