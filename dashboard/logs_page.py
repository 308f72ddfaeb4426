"""Logs: the output of each phase and attempt of the run; a running phase's is followed as it grows."""

import streamlit as st

from dashboard import data, view
from jobs import pipeline
from vibechat.common import VibechatError

MAX_LINES = 2000  # shown; the download holds every line

url, run_id = st.session_state.store_url, st.session_state.run_id
st.title(f"Logs · {run_id}")
run = next(run for run in data.list_runs(url)[0] if run.run_id == run_id)
started = [name for name in pipeline.PHASES if run.phases[name].attempt]
if not started:
    st.info(f"No phase of run {run_id} has started yet.")
    st.stop()
phase_column, attempt_column = st.columns([4, 1])
view.init("logs_phase", pipeline.next_phase(run) if pipeline.next_phase(run) in started else started[-1], started, param="phase")
phase = phase_column.segmented_control("Phase", started, key="logs_phase") or started[-1]
attempts = list(range(run.phases[phase].attempt, 0, -1))
view.init("logs_attempt", attempts[0], attempts)
attempt = attempt_column.selectbox("Attempt", attempts, key="logs_attempt", help="the latest first")
view.share(phase=phase)
following = run.phases[phase].state == pipeline.RUNNING and attempt == run.phases[phase].attempt


@st.fragment(run_every=data.REFRESH_SECONDS if following else None)
def show_log() -> None:
    try:
        text = data.phase_log(url, run, phase, attempt)
    except VibechatError as e:
        st.error(f"Cannot read the log of {phase} attempt {attempt}: {e}")
        return
    if not text:
        st.info(f"No output from {phase} attempt {attempt} yet." if following else
                f"The log of {phase} attempt {attempt} is not in the store.")
        return
    lines = text.splitlines()
    st.caption(f"{len(lines)} lines" + (f", the last {MAX_LINES} shown" if len(lines) > MAX_LINES else "")
               + (f"; following, every {data.REFRESH_SECONDS} s" if following else ""))
    st.download_button("Download the log", text, file_name=f"{run_id}-{phase}-{attempt}.log", mime="text/plain",
                       icon="⬇️")
    st.code("\n".join(lines[-MAX_LINES:]), language=None, height=600)


show_log()
