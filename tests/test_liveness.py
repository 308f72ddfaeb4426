"""Liveness records: a phase renews its own while it runs and leaves its exit code; an unrenewed one is dead."""

import time

import pytest

from vibechat import liveness
from vibechat.common import VibechatError, run_main
from vibechat.liveness import Heartbeat, Liveness
from vibechat.storage import open_store


@pytest.fixture
def phase_env(store_url, monkeypatch):
    """The variables the controller gives a phase (attempt 3 of base of run r)."""
    for name, value in (("VIBECHAT_STORE", store_url), ("VIBECHAT_RUN", "r"), ("VIBECHAT_PHASE", "base"),
                        ("VIBECHAT_ATTEMPT", "3")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RANK", raising=False)
    return open_store(store_url)


def test_a_running_phase_renews_its_record_before_the_deadline(store_url):
    store = open_store(store_url)
    with Heartbeat(store, "r", "base", 1, ttl=0.4):
        first = liveness.read(store, "r", "base", 1)
        time.sleep(0.5)  # past the first deadline: only renewals keep it alive
        assert liveness.read(store, "r", "base", 1).alive(time.time())
    assert liveness.read(store, "r", "base", 1).deadline > first.deadline


def test_a_phase_that_ends_well_leaves_exit_code_0(phase_env):
    run_main(lambda: None)
    record = liveness.read(phase_env, "r", "base", 3)
    assert record.exit_code == 0 and not record.alive(time.time())


def test_a_phase_that_ends_with_an_error_leaves_exit_code_2(phase_env):
    def main():
        raise VibechatError("no data")

    with pytest.raises(SystemExit):
        run_main(main)
    assert liveness.read(phase_env, "r", "base", 3).exit_code == 2


def test_a_phase_that_crashes_leaves_exit_code_1(phase_env):
    with pytest.raises(ZeroDivisionError):
        run_main(lambda: 1 / 0)
    assert liveness.read(phase_env, "r", "base", 3).exit_code == 1


def test_only_rank_0_keeps_the_record(phase_env, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    run_main(lambda: None)
    assert liveness.read(phase_env, "r", "base", 3) is None


def test_a_record_past_its_deadline_is_dead():
    assert Liveness("h:1", deadline=100.0).alive(99.0) and not Liveness("h:1", deadline=100.0).alive(100.0)
    assert not Liveness("h:1", deadline=100.0, exit_code=0).alive(0.0)
