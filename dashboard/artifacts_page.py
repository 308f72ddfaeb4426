"""Artifacts: the run's checkpoints (phase, model, step, size, when written), and its metrics (CSV) and report to
download."""

import streamlit as st

from dashboard import data
from vibechat.layout import CHECKPOINTS_DIR, in_run

url, run_id = st.session_state.store_url, st.session_state.run_id
st.title(f"Artifacts · {run_id}")

st.subheader("Checkpoints")
table = data.checkpoint_table(url, run_id)
if len(table):
    st.dataframe(table, hide_index=True, width="stretch", height=36 + 35 * len(table))
    st.caption(f"In {data.store(url).uri(in_run(run_id, CHECKPOINTS_DIR))}/")
else:
    st.info(f"Run {run_id} has no checkpoint yet: the base, mid, sft and rl phases write them as they train.")

st.subheader("Metrics")
phases = data.metric_phases(url, run_id, evaluations=True)
if not phases:
    st.info(f"Run {run_id} has no metrics yet.")
for column, phase in zip(st.columns(max(len(phases), 1)), phases):
    frame, _ = data.load_metrics(url, run_id, phase)
    column.download_button(f"{phase}.csv", frame.to_csv(index=False), file_name=f"{run_id}-{phase}.csv",
                           mime="text/csv", icon="⬇️", key=f"csv_{phase}", help=f"{len(frame)} rows")

st.subheader("Report")
report = data.read_report(url, run_id)
if report is None:
    st.info(f"No report yet for run {run_id}: the report phase writes it at the end of the run.")
else:
    st.download_button("report.md", report, file_name=f"{run_id}-report.md", mime="text/markdown", icon="⬇️")
