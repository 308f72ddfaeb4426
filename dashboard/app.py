"""The vibechat dashboard: runs, metrics, logs, artifacts, reports, and a chat with any checkpoint of a run.

    VIBECHAT_STORE=s3://bucket/vibechat streamlit run dashboard/app.py

Everything is read from the store: $VIBECHAT_STORE (default ~/.cache/vibechat), or the URL typed in the
sidebar; S3 credentials come from the usual AWS_* variables of the dashboard's environment. This file
checks the store and picks the run; each page is a script of its own beside it, at its own URL (/runs,
/metrics, ...), the run and the view in the URL's query.
"""

import os

import streamlit as st

from dashboard import data, view
from vibechat.common import VibechatError, get_store_url
from vibechat.storage import LocalStore

st.set_page_config(page_title="vibechat", page_icon="💬", layout="wide")
view.keep()

url = st.sidebar.text_input("Store", value=get_store_url(), key="store_url",
                            help="a local folder, file:///path or s3://bucket/prefix (S3 credentials: AWS_* variables)")
try:
    runs, problems = data.list_runs(url)
    store = data.store(url)
except VibechatError as e:
    st.error(f"Cannot read the store: {e}")
    st.stop()
except Exception as e:  # whatever else the store's client raises: one message, not a traceback
    st.error(f"Cannot read the store {url}: {type(e).__name__}: {e}")
    st.stop()

for problem in problems:
    st.warning(problem)


@st.fragment(run_every=data.REFRESH_SECONDS)
def wait_for_a_run() -> None:
    """Until the store holds a run: say why there is none, and redraw the whole app once one appears."""
    if data.list_runs(url)[0]:
        st.rerun()
    if isinstance(store, LocalStore) and not os.path.isdir(store.root):
        st.warning(f"The store folder {store.root} does not exist: check the Store URL in the sidebar, or start a "
                   "run with `python -m jobs.controller start --preset tiny`, which creates it.")
    else:
        st.info(f"No runs yet in {url} — start one with `python -m jobs.controller start --preset tiny`")


if not runs:
    wait_for_a_run()
    st.stop()

run_ids = [run.run_id for run in runs]
view.init("run_id", run_ids[0], run_ids, param="run")
st.sidebar.selectbox("Run", run_ids, key="run_id", help="newest first")
view.share(run=st.session_state.run_id)
st.navigation([
    st.Page("runs_page.py", title="Runs", icon="🏃", default=True),
    st.Page("metrics_page.py", title="Metrics", icon="📈", url_path="metrics"),
    st.Page("logs_page.py", title="Logs", icon="📜", url_path="logs"),
    st.Page("artifacts_page.py", title="Artifacts", icon="📦", url_path="artifacts"),
    st.Page("report_page.py", title="Report", icon="📄", url_path="report"),
    st.Page("chat_page.py", title="Chat", icon="💬", url_path="chat"),
    # the default page is served at "/" only: /runs opens it too
    st.Page("runs_page.py", title="Runs", icon="🏃", url_path="runs", visibility="hidden"),
]).run()
