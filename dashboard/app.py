"""The vibechat dashboard: runs, metrics, reports, and a chat with any checkpoint of a run.

    VIBECHAT_STORE=s3://bucket/vibechat streamlit run dashboard/app.py

Everything is read from the store: $VIBECHAT_STORE (default ~/.cache/vibechat), or the URL typed in the
sidebar; S3 credentials come from the usual AWS_* variables of the dashboard's environment. This file
checks the store and picks the run; each page is a script of its own beside it.
"""

import streamlit as st

from dashboard import data
from vibechat.common import VibechatError, get_store_url

st.set_page_config(page_title="vibechat", page_icon="💬", layout="wide")

url = st.sidebar.text_input("Store", value=get_store_url(), key="store_url",
                            help="a local folder, file:///path or s3://bucket/prefix (S3 credentials: AWS_* variables)")
try:
    runs, problems = data.list_runs(url)
except VibechatError as e:
    st.error(f"Cannot read the store: {e}")
    st.stop()
except Exception as e:  # whatever else the store's client raises: one message, not a traceback
    st.error(f"Cannot read the store {url}: {type(e).__name__}: {e}")
    st.stop()

for problem in problems:
    st.warning(problem)
if not runs:
    st.info(f"No runs yet in {url} — start one with `python -m jobs.controller start --preset tiny`")
    st.stop()

st.sidebar.selectbox("Run", [run.run_id for run in runs], key="run_id", help="newest first")
page = st.navigation([
    st.Page("runs_page.py", title="Runs", icon="🏃", url_path="runs", default=True),
    st.Page("metrics_page.py", title="Metrics", icon="📈", url_path="metrics"),
    st.Page("report_page.py", title="Report", icon="📄", url_path="report"),
    st.Page("chat_page.py", title="Chat", icon="💬", url_path="chat"),
])
page.run()
