"""What the dashboard reads from the store: runs, metrics, reports and checkpoints, all through vibechat.storage.

Reads are cached for a few seconds, so a page that refreshes while a run is active rereads the store at
most that often; every function takes the store's URL, which is what the caches key on.
"""

import json
import re
import time

import numpy as np
import pandas as pd
import streamlit as st

from jobs import pipeline
from jobs.driver import phase_log as driver_phase_log
from jobs.runstore import list_run_ids, read_run
from vibechat.common import VibechatError, format_duration
from vibechat.layout import (CHECKPOINTS_DIR, METRICS_DIR, REPORT_FILE, STAGES, checkpoint_dir, checkpoint_meta, in_run,
                             metrics_key, metrics_phase, run_dir)
from vibechat.metrics import read_metrics_frame
from vibechat.storage import Store, open_store

REFRESH_SECONDS = 5  # how often pages of an active run reread the store
MAX_POINTS = 1000  # most points drawn per line: a low and a high per pixel pair of a half-width chart; drawing
# 2,000 points a line instead doubles the time to the first chart (python -m dashboard.bench)
STATE_ICONS = {pipeline.SUCCEEDED: "✅", pipeline.FAILED: "❌", pipeline.RUNNING: "⏳", pipeline.PENDING: "⏸️", pipeline.SKIPPED: "⏭️",
               pipeline.CANCELLED: "⛔"}
NOT_METRICS = {"step", "tokens", "time", "dt"}  # axes and bookkeeping, not charts (tokens/s tells what dt does)


@st.cache_resource(show_spinner=False)
def store(url: str) -> Store:
    return open_store(url, patience=5)  # a page says at once that the store is down; phases ride outages out


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
                     "status": state_label(status), "current phase": pipeline.next_phase(run) or "—",
                     "created": clock(run.created_at)})
    return pd.DataFrame(rows)


def phase_table(run: pipeline.RunState, now: float) -> pd.DataFrame:
    """One row per phase: state, latest attempt, start and end (local time), duration (so far, while it runs), error."""
    rows = []
    for name in pipeline.PHASES:
        p = run.phases[name]
        took = (p.ended_at or now) - p.started_at if p.started_at else None
        rows.append({"phase": name, "state": state_label(p.state), "attempt": p.attempt,
                     "started": clock(p.started_at), "ended": clock(p.ended_at),
                     "duration": format_duration(took) if took is not None else "", "error": p.error or ""})
    return pd.DataFrame(rows)


def phase_spans(run: pipeline.RunState, now: float) -> pd.DataFrame:
    """The phases that started, as bars for a timeline: phase, state, start and end (now while running)."""
    rows = [{"phase": name, "state": state_label(p.state), "attempt": p.attempt,
             "started": pd.Timestamp.fromtimestamp(p.started_at), "ended": pd.Timestamp.fromtimestamp(p.ended_at or now),
             "duration": format_duration((p.ended_at or now) - p.started_at)}
            for name, p in run.phases.items() if p.started_at]
    return pd.DataFrame(rows, columns=["phase", "state", "attempt", "started", "ended", "duration"])


def state_label(state: str) -> str:
    return f"{STATE_ICONS[state]} {state}"


def clock(t: float | None) -> str:
    """A local date and time to the second, or nothing: a table cell, never "None"."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def load_metrics(url: str, run_id: str, phase: str) -> tuple[pd.DataFrame, int]:
    """metrics/<phase>.jsonl of a run as a frame, and how many corrupt lines were skipped."""
    return read_metrics_frame(store(url), in_run(run_id, metrics_key(phase)))


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def chart_points(url: str, run_id: str, phase: str, x: str, smoothing: float) -> tuple[dict[str, pd.DataFrame], int]:
    """What the charts of a phase draw: metric -> its (x, metric) points smoothed then downsampled; and the number
    of corrupt lines skipped. Cached apart from load_metrics, so a redraw moves a few thousand points, not the file."""
    frame, bad = load_metrics(url, run_id, phase)
    if x not in frame.columns:
        return {}, bad
    points = {}
    for metric in metric_columns(frame):
        series = frame[[x, metric]].dropna()
        if len(series):
            points[metric] = downsample(series.assign(**{metric: smooth(series[metric], smoothing)}), x, metric)
    return points, bad


def metric_phases(url: str, run_id: str, evaluations: bool = False) -> list[str]:
    """The phases of a run with training metrics, in pipeline order; with evaluations, also the evaluation
    phases' files (<stage>_eval: scores, not curves)."""
    run = store(url).child(run_dir(run_id))
    names = {name for key in run.list(METRICS_DIR + "/")
             if (name := metrics_phase(key)) and (evaluations or not name.endswith("_eval"))}
    order = {name: i for i, name in enumerate(pipeline.PHASES)}
    return sorted(names, key=lambda n: (order.get(n.removesuffix("_eval"), len(order)), n))


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


def smooth(values: pd.Series, weight: float) -> pd.Series:
    """TensorBoard's smoothing: an exponential moving average of weight (0 = none, 0.99 = heavy), debiased so the
    first points are not pulled towards 0."""
    if weight <= 0:
        return values
    return values.ewm(alpha=1 - weight, adjust=True).mean()


def config_diff(runs: list[pipeline.RunState]) -> pd.DataFrame:
    """The settings (dotted keys of each run's frozen config, and its preset and backend) that differ between
    the runs: one row per setting, one column per run, "—" where a run lacks it."""
    flat = {run.run_id: {"preset": run.preset, "backend": run.backend, **_flatten(run.config)} for run in runs}
    keys = sorted({k for values in flat.values() for k in values})
    rows = {k: [_cell(flat[r].get(k, "—")) for r in flat] for k in keys}
    differ = {k: v for k, v in rows.items() if len(set(v)) > 1}
    return pd.DataFrame.from_dict(differ, orient="index", columns=list(flat))


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _cell(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


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


def phase_log(url: str, run: pipeline.RunState, phase: str, attempt: int) -> str:
    """The output of one attempt of a phase, as `python -m jobs.controller logs` prints it."""
    return driver_phase_log(store(url), run, phase, attempt)


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


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def checkpoint_table(url: str, run_id: str) -> pd.DataFrame:
    """One row per committed checkpoint: stage, model, step, size of its files (model, optimizer shards, meta) and
    when its meta was written (the commit); stages in pipeline order, the newest step first."""
    run = store(url).child(run_dir(run_id))
    keys = run.list(CHECKPOINTS_DIR + "/")
    rows = []
    for stage, tags in checkpoints(url, run_id).items():
        for tag, steps in tags.items():
            folder = checkpoint_dir(stage, tag) + "/"
            for step in steps:
                files = [k for k in keys if k.startswith(folder) and re.search(rf"_{step:06d}(_rank\d+)?\.\w+$", k)]
                rows.append({"stage": stage, "model": tag, "step": step,
                             "size (MB)": round(sum(run.stat(k)[0] for k in files) / 1e6, 2),
                             "written": clock(run.stat(f"{folder}meta_{step:06d}.json")[1]), "files": len(files)})
    return pd.DataFrame(rows, columns=["stage", "model", "step", "size (MB)", "written", "files"])


def _tag_size(tag: str) -> tuple[int, str]:
    """Sort key putting the deepest model first: d20 before d4, other tags after those, by name."""
    m = re.fullmatch(r"d(\d+)", tag)
    return (-int(m.group(1)), "") if m else (1, tag)
