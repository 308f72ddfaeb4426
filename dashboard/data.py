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

from jobs import pipeline as pl
from jobs.controller import list_run_ids, log_key, make_backend, phase_job, read_run
from vibechat.checkpoint_manager import PHASE_PROGRAMS
from vibechat.common import VibechatError
from vibechat.metrics import read_metrics_frame
from vibechat.report import STAGES, format_duration
from vibechat.storage import Store, open_store

REFRESH_SECONDS = 5  # how often pages of an active run reread the store
MAX_POINTS = 1000  # most points drawn per line: a low and a high per pixel pair of a half-width chart; drawing
# 2,000 points a line instead doubles the time to the first chart (python -m dashboard.bench)
STATE_ICONS = {pl.SUCCEEDED: "✅", pl.FAILED: "❌", pl.RUNNING: "⏳", pl.PENDING: "⏸️", pl.SKIPPED: "⏭️",
               pl.CANCELLED: "⛔"}
NOT_METRICS = {"step", "tokens", "time", "dt"}  # axes and bookkeeping, not charts (tokens/s tells what dt does)


@st.cache_resource(show_spinner=False)
def store(url: str) -> Store:
    return open_store(url)


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def list_runs(url: str) -> tuple[list[pl.RunState], list[str]]:
    """The store's runs, newest first, and one line for each run.json that cannot be read."""
    runs, problems = [], []
    for run_id in list_run_ids(store(url)):
        try:
            runs.append(read_run(store(url), run_id)[0])
        except VibechatError as e:
            problems.append(f"run {run_id}: {e}")
    return sorted(runs, key=lambda r: r.created_at, reverse=True), problems


def is_active(run: pl.RunState) -> bool:
    return pl.run_status(run) == pl.RUNNING


def runs_table(runs: list[pl.RunState]) -> pd.DataFrame:
    rows = []
    for run in runs:
        status = pl.run_status(run)
        rows.append({"run": run.run_id, "preset": run.preset, "backend": run.backend,
                     "status": state_label(status), "current phase": pl.next_phase(run) or "—",
                     "created": clock(run.created_at)})
    return pd.DataFrame(rows)


def phase_table(run: pl.RunState, now: float) -> pd.DataFrame:
    """One row per phase: state, latest attempt, start and end (local time), duration (so far, while it runs), error."""
    rows = []
    for name in pl.PHASES:
        p = run.phases[name]
        took = (p.ended_at or now) - p.started_at if p.started_at else None
        rows.append({"phase": name, "state": state_label(p.state), "attempt": p.attempt,
                     "started": clock(p.started_at), "ended": clock(p.ended_at),
                     "duration": format_duration(took) if took is not None else "", "error": p.error or ""})
    return pd.DataFrame(rows)


def phase_spans(run: pl.RunState, now: float) -> pd.DataFrame:
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
    return read_metrics_frame(store(url), f"runs/{run_id}/metrics/{phase}.jsonl")


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
    names = {m.group(1) for key in store(url).list(f"runs/{run_id}/metrics/")
             if (m := re.fullmatch(r".*/metrics/([^/]+)\.jsonl", key)) and (evaluations or not m.group(1).endswith("_eval"))}
    return sorted(names, key=lambda n: (pl.PHASES.index(n.removesuffix("_eval")) if n.removesuffix("_eval") in pl.PHASES
                                        else len(pl.PHASES), n))


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


def config_diff(runs: list[pl.RunState]) -> pd.DataFrame:
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


def phase_log(url: str, run: pl.RunState, phase: str, attempt: int) -> str:
    """The output of one attempt of a phase, as `python -m jobs.controller logs` prints it: from the backend while
    it runs (the store's copy lags behind) or when the store has none, else the copy in the store."""
    p = run.phases[phase]
    job = phase_job(run, store(url), phase, attempt)
    if p.state == pl.RUNNING and attempt == p.attempt:
        return make_backend(run, store(url)).logs(job)
    try:
        return store(url).get_text(log_key(run.run_id, phase, attempt))
    except FileNotFoundError:
        return make_backend(run, store(url)).logs(job)


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def read_report(url: str, run_id: str) -> str | None:
    try:
        return store(url).get_text(f"runs/{run_id}/report/report.md")
    except FileNotFoundError:
        return None


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def checkpoints(url: str, run_id: str) -> dict[str, dict[str, list[int]]]:
    """source -> model tag (deepest first) -> committed steps (newest first); a step counts once its meta is written."""
    found: dict[str, dict[str, list[int]]] = {}
    for key in store(url).list(f"runs/{run_id}/checkpoints/"):
        m = re.fullmatch(r".*/checkpoints/([^/]+)/([^/]+)/meta_(\d+)\.json", key)
        if m:
            found.setdefault(m.group(1), {}).setdefault(m.group(2), []).append(int(m.group(3)))
    order = list(PHASE_PROGRAMS)  # base, mid, sft, rl
    return {source: {tag: sorted(found[source][tag], reverse=True) for tag in sorted(found[source], key=_tag_size)}
            for source in sorted(found, key=lambda s: order.index(s) if s in order else len(order))}


@st.cache_data(ttl=REFRESH_SECONDS, show_spinner=False)
def checkpoint_table(url: str, run_id: str) -> pd.DataFrame:
    """One row per committed checkpoint: phase, model, step, size of its files (model, optimizer shards, meta) and
    when its meta was written (the commit), phases in pipeline order, the newest step first."""
    found = checkpoints(url, run_id)
    keys = store(url).list(f"runs/{run_id}/checkpoints/")
    rows = []
    for source, tags in found.items():
        for tag, steps in tags.items():
            folder = f"runs/{run_id}/checkpoints/{source}/{tag}/"
            for step in steps:
                files = [k for k in keys if k.startswith(folder) and re.search(rf"_{step:06d}(_rank\d+)?\.\w+$", k)]
                size = sum(store(url).stat(k)[0] for k in files)
                written = store(url).stat(f"{folder}meta_{step:06d}.json")[1]
                rows.append({"phase": source, "model": tag, "step": step, "size (MB)": round(size / 1e6, 2),
                             "written": clock(written), "files": len(files)})
    return pd.DataFrame(rows, columns=["phase", "model", "step", "size (MB)", "written", "files"])


def _tag_size(tag: str) -> tuple[int, str]:
    """Sort key putting the deepest model first: d20 before d4, other tags after those, by name."""
    m = re.fullmatch(r"d(\d+)", tag)
    return (-int(m.group(1)), "") if m else (1, tag)
