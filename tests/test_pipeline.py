"""The phase graph and run state machine (jobs.pipeline): examples, then properties over random histories."""

import importlib.util
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jobs import pipeline
from jobs.pipeline import PHASES, Action
from vibechat.common import VibechatError


def config(skip=(), max_attempts=3, backoff_s=10.0, backoff_max_s=100.0) -> dict:
    """The part of a run's config the state machine reads."""
    return {
        "retries": {"max_attempts": max_attempts, "backoff_s": backoff_s, "backoff_max_s": backoff_max_s},
        "phases": {name: {"skip": name in skip} for name in PHASES},
    }


def run_of(**kwargs) -> pipeline.RunState:
    return pipeline.new_run("r1", "tiny", config(**kwargs), "local", now=0.0)


def submit(run, now=0.0) -> Action:
    action = pipeline.next_action(run, now)
    assert action.kind == "submit", action
    pipeline.mark_running(run, action.phase, action.attempt, f"job-{action.phase}-{action.attempt}", now)
    return action


def finish_phase(run, now=0.0) -> str:
    action = submit(run, now)
    pipeline.mark_succeeded(run, action.phase, now)
    return action.phase


# --- the graph --------------------------------------------------------------------------------

def test_every_phase_a_run_starts_has_a_program_that_exists():
    run = run_of()
    started = [finish_phase(run) for _ in PHASES]
    assert [name for name in started if importlib.util.find_spec(pipeline.PHASE_PROGRAMS[name][0])] == PHASES


def test_a_run_starts_with_data_and_ends_with_the_report():
    run = run_of()
    started = [finish_phase(run) for _ in PHASES]
    assert started[0] == "data" and started[-1] == "report"


def test_a_run_evaluates_each_training_phase_right_after_it():
    run = run_of()
    started = [finish_phase(run) for _ in PHASES]
    for train in ("tokenizer", "base", "mid", "sft", "rl"):
        assert started[started.index(train) + 1] == f"{train}_eval"


def test_phase_argv_turns_args_into_dashed_flags():
    argv = pipeline.phase_argv("base", {"num_iterations": 20, "model_tag": "d4", "compile": True, "dry_run": False,
                                  "seed": None, "tasks": ["arc", "gsm8k"]})
    assert argv == ["--num-iterations=20", "--model-tag=d4", "--compile", "--tasks=arc,gsm8k"]


def test_chat_eval_phases_name_their_source_and_config_args_win():
    assert pipeline.phase_argv("sft_eval", {}) == ["--source=sft"]
    argv = pipeline.phase_argv("mid_eval", {"source": "base", "max_problems": 8})
    assert argv == ["--source=base", "--max-problems=8"]


# --- running forward --------------------------------------------------------------------------

def test_new_run_is_pending_except_skipped_phases():
    run = run_of(skip=("rl", "rl_eval"))
    not_pending = {n: p.state for n, p in run.phases.items() if p.state != "pending"}
    assert not_pending == {"rl": "skipped", "rl_eval": "skipped"}
    assert pipeline.run_status(run) == "pending"


def test_first_action_submits_attempt_one_of_the_first_phase():
    assert pipeline.next_action(run_of(), now=0.0) == Action("submit", "data", 1)


def test_phases_run_one_after_another_until_done():
    run = run_of(skip=("mid", "mid_eval"))
    order = []
    while pipeline.next_action(run, 0.0).kind != "done":
        order.append(finish_phase(run))
    assert order == [p for p in PHASES if p not in ("mid", "mid_eval")]
    assert pipeline.run_status(run) == "succeeded"


def test_a_running_phase_is_watched_not_resubmitted():
    run = run_of()
    submit(run)
    assert pipeline.next_action(run, 5.0) == Action("watch", "data", 1)
    assert pipeline.run_status(run) == "running"


def test_mark_running_refuses_anything_but_the_next_action():
    run = run_of()
    with pytest.raises(pipeline.InvalidTransition):
        pipeline.mark_running(run, "base", 1, "j", 0.0)  # predecessors not done
    with pytest.raises(pipeline.InvalidTransition):
        pipeline.mark_running(run, "data", 2, "j", 0.0)  # skips attempt 1
    submit(run)
    with pytest.raises(pipeline.InvalidTransition):
        pipeline.mark_running(run, "data", 1, "j", 0.0)  # already running


def test_only_a_running_phase_can_succeed_or_fail():
    run = run_of()
    with pytest.raises(pipeline.InvalidTransition):
        pipeline.mark_succeeded(run, "data", 0.0)
    with pytest.raises(pipeline.InvalidTransition):
        pipeline.mark_failed(run, "data", "boom", 0.0)


# --- retries ------------------------------------------------------------------------------------

def test_failed_attempts_retry_with_doubling_backoff_then_fail_the_run():
    run = run_of(max_attempts=3, backoff_s=10)
    submit(run, now=0)
    pipeline.mark_failed(run, "data", "exit code 1", now=100)
    assert pipeline.next_action(run, 105) == Action("wait", "data", 2, until=110)
    submit(run, now=110)
    pipeline.mark_failed(run, "data", "exit code 1", now=200)
    assert pipeline.next_action(run, 210) == Action("wait", "data", 3, until=220)
    submit(run, now=220)
    pipeline.mark_failed(run, "data", "exit code 1", now=300)
    assert pipeline.next_action(run, 10_000) == Action("failed", "data", 3)
    assert pipeline.run_status(run) == "failed" and run.phases["data"].error == "exit code 1"


def test_backoff_is_capped():
    retries = {"backoff_s": 10, "backoff_max_s": 60}
    assert [pipeline.retry_delay(n, retries) for n in range(1, 6)] == [10, 20, 40, 60, 60]


# --- resume and cancel --------------------------------------------------------------------------

def failed_at_base(max_attempts=1) -> pipeline.RunState:
    run = run_of(max_attempts=max_attempts)
    while pipeline.next_phase(run) != "base":
        finish_phase(run)
    submit(run)
    pipeline.mark_failed(run, "base", "oom", now=1.0)
    return run


def test_resume_restarts_the_failed_phase_with_a_new_attempt_number_and_fresh_budget():
    run = failed_at_base()
    assert pipeline.resume(run) == []
    assert all(run.phases[p].state == "succeeded" for p in PHASES[:PHASES.index("base")])
    assert run.phases["base"].failures == 0 and run.phases["base"].error == ""
    assert pipeline.next_action(run, 2.0) == Action("submit", "base", 2)


def test_resume_from_a_phase_resets_it_and_everything_after_but_not_before():
    run = failed_at_base()
    pipeline.resume(run, from_phase="tokenizer")
    assert run.phases["data"].state == "succeeded"
    assert all(run.phases[p].state == "pending" for p in PHASES[1:])
    assert pipeline.next_action(run, 2.0) == Action("submit", "tokenizer", 2)


def test_resume_from_keeps_skipped_phases_skipped():
    run = run_of(skip=("mid_eval",))
    finish_phase(run)
    pipeline.resume(run, from_phase="data")
    assert run.phases["mid_eval"].state == "skipped"


def test_resume_keeps_a_running_phase_running_so_its_job_is_adopted():
    run = run_of()
    submit(run)
    assert pipeline.resume(run) == []
    assert pipeline.next_action(run, 1.0) == Action("watch", "data", 1)


def test_resume_from_before_a_running_phase_reports_it_for_stopping():
    run = run_of()
    finish_phase(run)
    submit(run)
    assert pipeline.resume(run, from_phase="data") == ["tokenizer"]
    assert pipeline.next_action(run, 1.0) == Action("submit", "data", 2)


def test_resume_from_an_unknown_or_skipped_phase_is_a_clear_error():
    with pytest.raises(VibechatError, match="unknown phase 'bse'.*base"):
        pipeline.resume(run_of(), from_phase="bse")
    with pytest.raises(VibechatError, match="skipped"):
        pipeline.resume(run_of(skip=("rl",)), from_phase="rl")


def test_cancel_ends_every_phase_not_over_and_reports_the_running_one():
    run = run_of(skip=("report",))
    finish_phase(run)
    submit(run)
    assert pipeline.cancel(run, now=3.0) == ["tokenizer"]
    assert run.phases["data"].state == "succeeded" and run.phases["report"].state == "skipped"
    assert all(run.phases[p].state == "cancelled" for p in PHASES[1:-1])
    assert pipeline.next_action(run, 4.0) == Action("cancelled", "tokenizer", 1)
    assert pipeline.run_status(run) == "cancelled"


# --- the lease ----------------------------------------------------------------------------------

def test_a_lease_belongs_to_its_owner_until_it_expires():
    run = run_of()
    pipeline.take_lease(run, "a", now=0.0, seconds=60)
    assert pipeline.lease_holder(run, 59.0) == "a"
    with pytest.raises(pipeline.InvalidTransition):
        pipeline.take_lease(run, "b", now=30.0, seconds=60)
    pipeline.take_lease(run, "a", now=30.0, seconds=60)  # renewal
    assert pipeline.lease_holder(run, 89.0) == "a" and pipeline.lease_holder(run, 90.0) is None
    pipeline.take_lease(run, "b", now=90.0, seconds=60)
    pipeline.release_lease(run, "a")  # not a's any more: no effect
    assert pipeline.lease_holder(run, 91.0) == "b"
    pipeline.release_lease(run, "b")
    assert run.lease is None


# --- run.json -----------------------------------------------------------------------------------

def test_run_round_trips_through_json():
    run = failed_at_base(max_attempts=2)
    pipeline.take_lease(run, "host:1", 5.0, 60)
    again = pipeline.from_dict(json.loads(json.dumps(pipeline.to_dict(run))))
    assert again == run


def test_a_run_file_from_before_the_export_phase_reads_with_it_skipped():
    d = pipeline.to_dict(run_of())
    del d["phases"]["export"]
    assert pipeline.from_dict(d).phases["export"].state == "skipped"


def _corrupt(edit):
    d = pipeline.to_dict(run_of())
    edit(d)
    return d


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("phases"), "missing phases"),
    (lambda d: d.update(colour="red"), "unknown colour"),
    (lambda d: d.update(created_at="yesterday"), "created_at has the wrong type"),
    (lambda d: d["phases"].pop("sft"), "phases: missing sft"),
    (lambda d: d["phases"].update(pretrain={}), "phases: unknown pretrain"),
    (lambda d: d["phases"]["base"].update(state="exploded"), "phases.base.state is 'exploded'"),
    (lambda d: d["phases"]["base"].update(attempt=True), "phases.base.attempt has the wrong type"),
    (lambda d: d["phases"]["base"].update(attempt=-1), "negative"),
    (lambda d: d["phases"]["base"].update(started_at=float("nan")), "started_at has the wrong type"),
    (lambda d: d.update(lease={"owner": "x"}), "lease: missing expires_at"),
    (lambda d: d["phases"]["sft"].update(state="succeeded"), "sft is succeeded but data before it is pending"),
])
def test_a_malformed_run_file_names_what_is_wrong(edit, message):
    with pytest.raises(pipeline.RunFileError, match=message):
        pipeline.from_dict(_corrupt(edit), where="runs/r1/run.json")


def test_a_run_file_that_is_not_an_object_is_a_clear_error():
    with pytest.raises(pipeline.RunFileError, match="should be an object, not list"):
        pipeline.from_dict([], where="run.json")


# --- properties over random histories -----------------------------------------------------------

class RunHistory(RuleBasedStateMachine):
    """A driver that follows next_action, with failures, waits, cancels and resumes thrown in at random."""

    @initialize(skip=st.sets(st.sampled_from(PHASES)), max_attempts=st.integers(1, 4))
    def start(self, skip, max_attempts):
        self.max_attempts = max_attempts
        self.run = pipeline.new_run("r", "ci", config(skip=skip, max_attempts=max_attempts), "local", now=0.0)
        self.now = 0.0
        self.submitted = set()  # (phase, attempt): a job name may never be used twice
        self.submits_since_resume = {p: 0 for p in PHASES}

    def action(self) -> Action:
        return pipeline.next_action(self.run, self.now)

    def states(self) -> dict:
        return {n: p.state for n, p in self.run.phases.items()}

    def check_terminal_states_kept(self, before: dict) -> None:
        for name, state in before.items():
            if state in pipeline.TERMINAL:
                assert self.run.phases[name].state == state, f"{name} left terminal state {state}"

    @precondition(lambda self: self.action().kind == "submit")
    @rule()
    def submit(self):
        a = self.action()
        assert (a.phase, a.attempt) not in self.submitted
        self.submitted.add((a.phase, a.attempt))
        self.submits_since_resume[a.phase] += 1
        before = self.states()
        pipeline.mark_running(self.run, a.phase, a.attempt, f"j-{a.phase}-{a.attempt}", self.now)
        self.check_terminal_states_kept(before)

    @precondition(lambda self: self.action().kind == "watch")
    @rule(ok=st.booleans())
    def job_ends(self, ok):
        a = self.action()
        before = self.states()
        if ok:
            pipeline.mark_succeeded(self.run, a.phase, self.now)
        else:
            pipeline.mark_failed(self.run, a.phase, "boom", self.now)
        self.check_terminal_states_kept(before)

    @rule(dt=st.floats(0, 500))
    def time_passes(self, dt):
        self.now += dt

    @rule()
    def cancel(self):
        before = self.states()
        was_running = pipeline.cancel(self.run, self.now)
        assert was_running == [n for n, s in before.items() if s == "running"]
        self.check_terminal_states_kept(before)

    @rule(from_phase=st.one_of(st.none(), st.sampled_from(PHASES)))
    def resume(self, from_phase):
        before = self.states()
        try:
            pipeline.resume(self.run, from_phase)
        except VibechatError:
            assert before[from_phase] == "skipped"
            return
        cut = PHASES.index(from_phase) if from_phase else len(PHASES)
        for i, name in enumerate(PHASES):
            if i < cut and before[name] in ("succeeded", "skipped", "running", "pending"):
                assert self.run.phases[name].state == before[name], f"resume touched {name} before {from_phase}"
            if before[name] == "skipped":
                assert self.run.phases[name].state == "skipped"
        self.submits_since_resume = {p: 0 for p in PHASES}

    @invariant()
    def no_phase_runs_or_succeeds_before_its_predecessors_are_done(self):
        for i, name in enumerate(PHASES):
            if self.run.phases[name].state in ("running", "succeeded"):
                assert all(self.run.phases[b].state in pipeline.DONE for b in PHASES[:i])

    @invariant()
    def at_most_one_phase_runs(self):
        assert sum(p.state == "running" for p in self.run.phases.values()) <= 1

    @invariant()
    def attempts_never_exceed_the_limit(self):
        for name, p in self.run.phases.items():
            assert p.failures <= self.max_attempts
            assert self.submits_since_resume[name] <= self.max_attempts

    @invariant()
    def the_run_survives_a_trip_through_run_json(self):
        assert pipeline.from_dict(json.loads(json.dumps(pipeline.to_dict(self.run)))) == self.run


TestRunHistory = RunHistory.TestCase
TestRunHistory.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_a_run_always_reaches_done_when_every_attempt_succeeds(data):
    run = pipeline.new_run("r", "ci", config(skip=data.draw(st.sets(st.sampled_from(PHASES)))), "local", now=0.0)
    for _ in range(len(PHASES)):
        if pipeline.next_action(run, 0.0).kind == "done":
            break
        finish_phase(run)
    assert pipeline.next_action(run, 0.0) == Action("done")


@given(st.integers(1, 5), st.floats(0.1, 100), st.floats(0.1, 1000))
@settings(deadline=None)
def test_the_wait_before_a_retry_never_shrinks_and_never_passes_the_cap(failures, base, cap):
    retries = {"backoff_s": base, "backoff_max_s": cap}
    assert pipeline.retry_delay(failures, retries) <= max(cap, 0)
    assert pipeline.retry_delay(failures + 1, retries) >= pipeline.retry_delay(failures, retries)

