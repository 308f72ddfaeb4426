"""Report: the run's report.md as the report phase wrote it, to read or download."""

import streamlit as st

from dashboard import data
from vibechat.layout import run_dir
from vibechat.report import stage_scores, summary_table

url, run_id = st.session_state.store_url, st.session_state.run_id
report = data.read_report(url, run_id)
if report is None:
    st.title(f"Report · {run_id}")
    st.info(f"No report yet for run {run_id}: the report phase writes it at the end of the run. The scores so far:")
    st.markdown(summary_table(stage_scores(data.store(url).child(run_dir(run_id)))))
else:
    st.download_button("Download report.md", report, file_name=f"{run_id}-report.md", mime="text/markdown",
                       icon="⬇️")
    st.markdown(report)
