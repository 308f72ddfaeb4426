"""Runs: every run in the store and the timeline of its phases, with Stop and Resume; rereads the store every few
seconds, so a run started or moved on elsewhere shows without a reload."""

import time

import altair as alt
import streamlit as st

from dashboard import data
from jobs import driver, pipeline
from vibechat.common import VibechatError

url = st.session_state.store_url
STATE_COLORS = {pipeline.SUCCEEDED: "#2ca02c", pipeline.FAILED: "#d62728", pipeline.RUNNING: "#1f77b4", pipeline.PENDING: "#bbbbbb",
                pipeline.SKIPPED: "#dddddd", pipeline.CANCELLED: "#ff7f0e"}
TIMES = {"created": st.column_config.TextColumn(width="medium"), "started": st.column_config.TextColumn(width="medium"),
         "ended": st.column_config.TextColumn(width="medium")}


def show_timeline(run: pipeline.RunState, now: float) -> None:
    for name in pipeline.PHASES:
        p = run.phases[name]
        if p.state == pipeline.FAILED:
            st.error(f"**{name}** failed on attempt {p.attempt}: {p.error}")
        elif p.error:  # an attempt failed and the controller will try again
            st.warning(f"**{name}** attempt {p.attempt} failed, to be retried: {p.error}")
    spans = data.phase_spans(run, now)
    if len(spans):
        colors = alt.Scale(domain=[data.state_label(s) for s in STATE_COLORS], range=list(STATE_COLORS.values()))
        chart = alt.Chart(spans).mark_bar().encode(
            x=alt.X("started:T", title="local time", axis=alt.Axis(format="%m-%d %H:%M:%S", labelOverlap=True)),
            x2="ended:T", y=alt.Y("phase:N", sort=pipeline.PHASES, title=None),
            color=alt.Color("state:N", scale=colors, title=None, legend=alt.Legend(orient="bottom", columns=6)),
            tooltip=["phase", "state", "attempt", "duration"])
        st.altair_chart(chart, width="stretch")
    table = data.phase_table(run, now)
    st.dataframe(table, hide_index=True, height=36 + 35 * len(table), width="stretch",
                 column_config={**TIMES, "error": st.column_config.TextColumn(width="large")})


def show_controls(run: pipeline.RunState) -> None:
    """Stop and Resume: what `python -m jobs.controller stop` and `resume --detach` do, through the same functions."""
    status = pipeline.run_status(run)
    stop_column, resume_column, _ = st.columns([1, 1, 6])
    if stop_column.button("Stop", key=f"stop_{run.run_id}", icon="⛔", disabled=status in driver.OVER,
                          help="cancel the running phase; Resume goes on from where it stopped"):
        try:
            driver.stop_run(data.store(url), run.run_id)
            st.toast(f"Run {run.run_id} cancelled")
        except VibechatError as e:
            st.error(f"Cannot stop run {run.run_id}: {e}")
    if resume_column.button("Resume", key=f"resume_{run.run_id}", icon="▶️", disabled=status == pipeline.SUCCEEDED,
                            help="drive the run on from its next phase, in a controller process of its own"):
        try:
            log_path = driver.drive_in_background(data.store(url), run.run_id)
            st.toast(f"Run {run.run_id} resumes in the background (its controller's output: {log_path})")
        except VibechatError as e:
            st.error(f"Cannot resume run {run.run_id}: {e}")


@st.fragment(run_every=data.REFRESH_SECONDS)
def show_runs() -> None:
    runs, _ = data.list_runs(url)
    st.dataframe(data.runs_table(runs), hide_index=True, height=36 + 35 * len(runs), width="stretch",
                 column_config=TIMES)
    now = time.time()
    for run in runs:
        with st.expander(f"{run.run_id} · {run.preset} · {data.state_label(pipeline.run_status(run))}",
                         expanded=run.run_id == st.session_state.run_id):
            show_controls(run)
            show_timeline(run, now)


st.title("Runs")
show_runs()
