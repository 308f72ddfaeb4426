"""What the dashboard reads from the store: runs, metrics, reports and checkpoints, all through vibechat.storage.

Reads are cached for a few seconds, so a page that refreshes while a run is active rereads the store at
most that often; every function takes the store's URL, which is what the caches key on.
"""

import re

import numpy as np
import pandas as pd
import streamlit as st

from jobs import pipeline
from jobs.runstore import list_run_ids, read_run
from vibechat.common import VibechatError, format_duration
from vibechat.layout import (CHECKPOINTS_DIR, METRICS_DIR, REPORT_FILE, STAGES, checkpoint_meta, in_run, metrics_key,
                             metrics_phase, run_dir)
from vibechat.metrics import read_metrics
from vibechat.storage import Store, open_store

REFRESH_SECONDS = 5  # how often pages of an active run reread the store
MAX_POINTS = 2000  # most points drawn per line: a browser chart slows down well before 100k
STATE_ICONS = {pipeline.SUCCEEDED: "✅", pipeline.FAILED: "❌", pipeline.RUNNING: "⏳", pipeline.PENDING: "⏸️",
               pipeline.SKIPPED: "⏭️", pipeline.CANCELLED: "⛔"}
NOT_METRICS = {"step", "tokens", "time", "dt"}  # axes and bookkeeping, not charts (tokens/s tells what dt does)


@st.cache_resource(show_spinner=False)
def store(url: str) -> Store:
    return open_store(url)


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def list_runs(url: str) -> tuple[list[pipeline.RunState], list[str]]:
    """The store's runs, newest first, and one line for each run.json that cannot be read."""
    runs, problems = [], []
    for run_id in list_run_ids(store(url)):
        try:
            runs.append(read_run(store(url), run_id)[0])
        except VibechatError as e:
            problems.append(f"run {run_id}: {e}")
    return sorted(runs, key=lambda r: r.created_at, reverse=True), problems


def is_active(run: pipeline.RunState) -> bool:
    return pipeline.run_status(run) == pipeline.RUNNING


def runs_table(runs: list[pipeline.RunState]) -> pd.DataFrame:
    rows = []
    for run in runs:
        status = pipeline.run_status(run)
        rows.append({"run": run.run_id, "preset": run.preset, "backend": run.backend,
                     "status": state_label(status), "current phase": pipeline.next_phase(run) or "-",
                     "created": local_time(run.created_at)})
    return pd.DataFrame(rows)


def phase_table(run: pipeline.RunState, now: float) -> pd.DataFrame:
    """One row per phase: state, latest attempt, start and end (local time), duration (so far, while it runs), error."""
    rows = []
    for name in pipeline.PHASES:
        p = run.phases[name]
        took = (p.ended_at or now) - p.started_at if p.started_at else None
        rows.append({"phase": name, "state": state_label(p.state), "attempt": p.attempt,
                     "started": local_time(p.started_at), "ended": local_time(p.ended_at),
                     "duration": format_duration(took) if took is not None else "", "error": p.error})
    return pd.DataFrame(rows)


def state_label(state: str) -> str:
    return f"{STATE_ICONS[state]} {state}"


def local_time(t: float | None) -> pd.Timestamp:
    return pd.Timestamp.fromtimestamp(t) if t else pd.NaT


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def load_metrics(url: str, run_id: str, phase: str) -> tuple[pd.DataFrame, int]:
    """metrics/<phase>.jsonl of a run as a frame, and how many corrupt lines were skipped."""
    records, bad = read_metrics(store(url), in_run(run_id, metrics_key(phase)))
    return pd.DataFrame.from_records(records), bad


def metric_phases(url: str, run_id: str) -> list[str]:
    """The phases of a run with training metrics (evaluation files hold scores, not curves), in pipeline order."""
    run = store(url).child(run_dir(run_id))
    names = {name for key in run.list(METRICS_DIR + "/")
             if (name := metrics_phase(key)) and not name.endswith("_eval")}
    return sorted(names, key=lambda n: (pipeline.PHASES.index(n) if n in pipeline.PHASES else len(pipeline.PHASES), n))


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The columns worth a chart: numeric ones that are not an axis."""
    return [c for c in frame.columns if c not in NOT_METRICS and pd.api.types.is_numeric_dtype(frame[c])]


def downsample(frame: pd.DataFrame, x: str, y: str, max_points: int = MAX_POINTS) -> pd.DataFrame:
    """The rows of frame[[x, y]] where both are set, at most max_points of them, in order.

    The rows are cut into max_points / 2 runs of equal length and each run keeps its lowest and highest y,
    so a spike or a dip stays on the chart where striding would skip it.
    """
    series = frame[[x, y]].dropna()
    if len(series) <= max_points:
        return series
    buckets = np.arange(len(series)) * (max_points // 2) // len(series)
    by_bucket = series[y].groupby(buckets)
    keep = np.union1d(by_bucket.idxmin().to_numpy(), by_bucket.idxmax().to_numpy())
    return series.loc[keep]


def eval_scores(url: str, run_ids: list[str]) -> tuple[pd.DataFrame, int]:
    """Scores of the evaluation phases (metrics/<stage>_eval.jsonl) as rows (run, task) and a column per stage,
    the last record of a task winning; and the number of corrupt lines skipped."""
    rows, bad_total = [], 0
    for run_id in run_ids:
        for stage in STAGES:
            frame, bad = load_metrics(url, run_id, f"{stage}_eval")
            bad_total += bad
            if {"task", "score"} <= set(frame.columns):
                for record in frame.dropna(subset=["task", "score"]).drop_duplicates("task", keep="last").itertuples():
                    rows.append({"run": run_id, "task": record.task, "stage": stage, "score": record.score})
    if not rows:
        return pd.DataFrame(), bad_total
    table = pd.DataFrame(rows).pivot(index=["run", "task"], columns="stage", values="score")
    return table[[s for s in STAGES if s in table.columns]], bad_total


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def read_report(url: str, run_id: str) -> str | None:
    try:
        return store(url).get_text(in_run(run_id, REPORT_FILE))
    except FileNotFoundError:
        return None


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def checkpoints(url: str, run_id: str) -> dict[str, dict[str, list[int]]]:
    """stage -> model tag (deepest first) -> committed steps (newest first); a step counts once its meta is written."""
    found: dict[str, dict[str, list[int]]] = {}
    run = store(url).child(run_dir(run_id))
    for key in run.list(CHECKPOINTS_DIR + "/"):
        if (meta := checkpoint_meta(key)) is not None:
            stage, tag, step = meta
            found.setdefault(stage, {}).setdefault(tag, []).append(step)
    order = list(STAGES)
    return {stage: {tag: sorted(found[stage][tag], reverse=True) for tag in sorted(found[stage], key=_tag_size)}
            for stage in sorted(found, key=lambda s: order.index(s) if s in order else len(order))}


def _tag_size(tag: str) -> tuple[int, str]:
    """Sort key putting the deepest model first: d20 before d4, other tags after those, by name."""
    m = re.fullmatch(r"d(\d+)", tag)
    return (-int(m.group(1)), "") if m else (1, tag)
