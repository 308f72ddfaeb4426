"""Runs: every run in the store and the timeline of its phases, refreshed while a run is active."""

import time

import altair as alt
import streamlit as st

from dashboard import data
from jobs import pipeline

url = st.session_state.store_url
STATE_COLORS = {pipeline.SUCCEEDED: "#2ca02c", pipeline.FAILED: "#d62728", pipeline.RUNNING: "#1f77b4",
                pipeline.PENDING: "#bbbbbb", pipeline.SKIPPED: "#dddddd", pipeline.CANCELLED: "#ff7f0e"}


def show_timeline(run: pipeline.RunState, now: float) -> None:
    for name in pipeline.PHASES:
        p = run.phases[name]
        if p.state == pipeline.FAILED:
            st.error(f"**{name}** failed on attempt {p.attempt}: {p.error}")
        elif p.error:  # an attempt failed and the controller will try again
            st.warning(f"**{name}** attempt {p.attempt} failed, to be retried: {p.error}")
    table = data.phase_table(run, now)
    started = table.dropna(subset=["started"]).assign(ended=lambda t: t["ended"].fillna(data.local_time(now)))
    if len(started):
        colors = alt.Scale(domain=[data.state_label(s) for s in STATE_COLORS], range=list(STATE_COLORS.values()))
        chart = alt.Chart(started).mark_bar().encode(
            x=alt.X("started:T", title=None), x2="ended:T", y=alt.Y("phase:N", sort=pipeline.PHASES, title=None),
            color=alt.Color("state:N", scale=colors, title=None), tooltip=["phase", "state", "attempt", "duration"])
        st.altair_chart(chart)
    st.dataframe(table, hide_index=True, column_config={
        "started": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
        "ended": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
        "error": st.column_config.TextColumn(width="large")})


def show_runs(was_active: bool) -> None:
    runs, _ = data.list_runs(url)
    if was_active and not any(data.is_active(run) for run in runs):
        st.rerun()  # the last active run ended: redraw the page, which then stops refreshing
    st.dataframe(data.runs_table(runs), hide_index=True,
                 column_config={"created": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss")})
    now = time.time()
    for run in runs:
        with st.expander(f"{run.run_id} · {run.preset} · {data.state_label(pipeline.run_status(run))}",
                         expanded=run.run_id == st.session_state.run_id):
            show_timeline(run, now)


st.title("Runs")
active = any(data.is_active(run) for run in data.list_runs(url)[0])
st.fragment(show_runs, run_every=data.REFRESH_SECONDS if active else None)(active)
