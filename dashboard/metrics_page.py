"""Metrics: each phase's curves against step or tokens, smoothed or not, on a linear or log axis, zoomable; the
evaluation scores; and for runs compared, their curves overlaid and the settings where they differ. Refreshed while
one of the runs is active."""

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import data, view
from vibechat.layout import metrics_key

url, run_id = st.session_state.store_url, st.session_state.run_id
# the usual metrics first, in this order, with their titles and units; any other numeric field follows as it is
TITLES = {"loss": ("train loss", "nats/token"), "raw_loss": ("train loss, not smoothed", "nats/token"),
          "val_bpb": ("validation bits per byte", "bits/byte"), "val_loss": ("validation loss", "nats/token"),
          "reward": ("mean reward", "reward"), "answer_tokens": ("answer length", "tokens"),
          "lr": ("learning rate multiplier", "× peak"), "tok_per_sec": ("tokens per second", "tokens/s"),
          "mfu": ("MFU", "% of peak FLOP/s"), "gpu_memory_gib": ("peak GPU memory", "GiB"),
          "gpu_util": ("GPU utilisation", "%"), "cpu_percent": ("host CPU", "% of all cores")}
PERCENT = {"mfu"}  # fractions, drawn as percentages
X_TITLES = {"step": "step", "tokens": "tokens seen"}


def chart(points: pd.DataFrame, x: str, metric: str, log_y: bool, several: bool) -> alt.Chart:
    """One metric's lines, a run each; the mouse wheel zooms, dragging pans, a double click resets."""
    title, unit = TITLES.get(metric, (metric, ""))
    if log_y:
        points = points[points[metric] > 0]  # a log axis has no room for 0 or below
    y_axis = alt.Axis(format="%" if metric in PERCENT else "~g", title=f"{title} ({unit})" if unit else title)
    color = alt.Color("run:N", title=None, legend=alt.Legend(orient="bottom") if several else None)
    return alt.Chart(points, title=title, height=260).mark_line(clip=True).encode(
        x=alt.X(f"{x}:Q", title=X_TITLES[x], axis=alt.Axis(format="~s")),
        y=alt.Y(f"{metric}:Q", title=None, axis=y_axis, scale=alt.Scale(type="log" if log_y else "linear",
                                                                        zero=False)),
        color=color, tooltip=["run", x, alt.Tooltip(metric, format=".4~g")]).interactive()


def show_charts(run_ids: list[str]) -> None:
    phases = list(dict.fromkeys(p for r in run_ids for p in data.metric_phases(url, r)))
    if not phases:
        st.info("No metrics yet: the training phases write them as they go.")
    else:
        view.init("metrics_phase", phases[0], phases, param="phase")
        view.init("metrics_x", "step", ["step", "tokens"], param="x")
        view.init("smoothing", 0.0)
        view.init("log_y", False)
        phase_column, x_column, smooth_column, log_column = st.columns([3, 2, 2, 1])
        phase = phase_column.segmented_control("Phase", phases, key="metrics_phase") or phases[0]
        x = x_column.segmented_control("Against", ["step", "tokens"], key="metrics_x") or "step"
        smoothing = smooth_column.slider("Smoothing", 0.0, 0.99, step=0.01, key="smoothing",
                                         help="an exponential moving average, as in TensorBoard; 0 draws each point")
        log_y = log_column.toggle("Log y", key="log_y", help="a logarithmic y axis")
        view.share(phase=phase, x=x)
        charts = []
        for r in run_ids:
            points, bad = data.chart_points(url, r, phase, x, smoothing)
            if bad:
                st.warning(f"Skipped {bad} corrupt line{'s' if bad > 1 else ''} in {r}'s {metrics_key(phase)}.")
            charts.append((r, points))
        metrics = list(dict.fromkeys(m for _, points in charts for m in points))
        metrics.sort(key=lambda m: list(TITLES).index(m) if m in TITLES else len(TITLES))
        if not metrics:
            st.info(f"No {phase} metrics against {x}.")
        for i in range(0, len(metrics), 2):
            for column, metric in zip(st.columns(2), metrics[i:i + 2]):
                lines = pd.concat([points[metric].assign(run=r) for r, points in charts if metric in points])
                column.altair_chart(chart(lines, x, metric, log_y, len(run_ids) > 1), width="stretch")
    scores, bad = data.eval_scores(url, run_ids)
    st.subheader("Evaluation")
    if bad:
        st.warning(f"Skipped {bad} corrupt line{'s' if bad > 1 else ''} in the evaluation metrics.")
    if len(scores):
        shown = scores.map(lambda v: "" if pd.isna(v) else f"{v:.4f}")  # a stage that did not score a task: blank
        st.dataframe(shown, height=36 + 35 * len(shown))
    else:
        st.caption("No scores yet: each training phase is followed by its evaluation.")


st.title("Metrics")
runs, _ = data.list_runs(url)
view.init("compare_with", [], [run.run_id for run in runs if run.run_id != run_id], param="compare")
others = st.multiselect("Compare with", [run.run_id for run in runs if run.run_id != run_id], key="compare_with")
view.share(compare=others)
selected = [run_id, *others]
active = any(data.is_active(run) for run in runs if run.run_id in selected)
st.fragment(show_charts, run_every=data.REFRESH_SECONDS if active else None)(selected)
if others:
    st.subheader("Config diff")
    diff = data.config_diff([run for run in runs if run.run_id in selected])
    if len(diff):
        st.dataframe(diff, width="stretch", height=36 + 35 * len(diff))
    else:
        st.caption("The runs have the same config.")
