"""Metrics: each phase's curves against step or tokens, and the evaluation scores, for the chosen run and any
others overlaid; refreshed while one of them is active."""

import pandas as pd
import streamlit as st

from dashboard import data
from vibechat.layout import metrics_key

url, run_id = st.session_state.store_url, st.session_state.run_id
# the usual metrics first, in this order, with their titles; any other numeric field follows under its own name
TITLES = {"loss": "train loss", "raw_loss": "train loss, not smoothed", "val_bpb": "validation bits per byte",
          "val_loss": "validation loss", "reward": "mean reward", "answer_tokens": "answer length (tokens)",
          "lr": "learning rate multiplier", "tok_per_sec": "tokens per second", "mfu": "MFU",
          "gpu_memory_gib": "peak GPU memory (GiB)"}


def show_charts(run_ids: list[str]) -> None:
    phases = list(dict.fromkeys(p for r in run_ids for p in data.metric_phases(url, r)))
    if not phases:
        st.info("No metrics yet: the training phases write them as they go.")
    else:
        left, right = st.columns(2)
        phase = left.segmented_control("Phase", phases, default=phases[0], key="metrics_phase") or phases[0]
        frames = {r: data.load_metrics(url, r, phase) for r in run_ids}
        for r, (_, bad) in frames.items():
            if bad:
                st.warning(f"Skipped {bad} corrupt line{'s' if bad > 1 else ''} in {r}'s {metrics_key(phase)}.")
        has_tokens = any("tokens" in frame.columns for frame, _ in frames.values())
        x = right.segmented_control("Against", ["step", "tokens"] if has_tokens else ["step"], default="step",
                                    key="metrics_x") or "step"
        columns = list(dict.fromkeys(c for frame, _ in frames.values() for c in data.metric_columns(frame)))
        columns.sort(key=lambda c: list(TITLES).index(c) if c in TITLES else len(TITLES))
        charts = []
        for metric in columns:
            lines = [data.downsample(frame, x, metric).assign(run=r) for r, (frame, _) in frames.items()
                     if {x, metric} <= set(frame.columns)]
            points = pd.concat(lines) if lines else pd.DataFrame()
            if len(points):
                charts.append((metric, points))
        for i in range(0, len(charts), 2):
            for column, (metric, points) in zip(st.columns(2), charts[i:i + 2]):
                with column:
                    st.markdown(f"**{TITLES.get(metric, metric)}**")
                    st.line_chart(points, x=x, y=metric, color="run", x_label=x, y_label=metric, height=260)
    scores, bad = data.eval_scores(url, run_ids)
    st.subheader("Evaluation")
    if bad:
        st.warning(f"Skipped {bad} corrupt line{'s' if bad > 1 else ''} in the evaluation metrics.")
    if len(scores):
        st.dataframe(scores, column_config={s: st.column_config.NumberColumn(format="%.4f") for s in scores.columns})
    else:
        st.caption("No scores yet: each training phase is followed by its evaluation.")


st.title("Metrics")
runs, _ = data.list_runs(url)
others = st.multiselect("Compare with", [run.run_id for run in runs if run.run_id != run_id], key="compare_with")
selected = [run_id, *others]
active = any(data.is_active(run) for run in runs if run.run_id in selected)
st.fragment(show_charts, run_every=data.REFRESH_SECONDS if active else None)(selected)
