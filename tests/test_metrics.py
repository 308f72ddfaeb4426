"""Metrics files: one JSON line per log, readable at once, kept in bounded segments (an S3 append rewrites one)."""

import pytest
import torch

from vibechat import metrics
from vibechat.metrics import MetricsLogger, read_metrics, read_metrics_frame, segment_keys, system_metrics
from vibechat.storage import open_store


@pytest.fixture(params=["local", "s3"])
def url(request, store_url):
    return request.getfixturevalue("s3_url") if request.param == "s3" else store_url


def test_a_logged_line_is_readable_as_soon_as_log_returns(url):
    logger = MetricsLogger("base", base_dir=url)
    logger.log(step=1, loss=2.5)
    records, bad = read_metrics(open_store(url), "metrics/base.jsonl")
    assert [(r["step"], r["loss"], r["phase"]) for r in records] == [(1, 2.5, "base")] and bad == 0


def test_a_resumed_logger_drops_the_records_past_its_checkpoint_in_every_segment(url, monkeypatch):
    monkeypatch.setattr(metrics, "SEGMENT_BYTES", 300)
    logger = MetricsLogger("base", base_dir=url)
    for step in range(8):
        logger.log(step=step, loss=1.0)
    logger.log(gpu_temperature=60)  # no step: kept
    MetricsLogger("base", base_dir=url, resume_step=3).log(step=4, loss=0.5)
    records, _ = read_metrics(open_store(url), "metrics/base.jsonl")
    assert [r.get("step") for r in records] == [0, 1, 2, 3, None, 4]


def test_a_logger_starting_afresh_drops_every_stepped_record(url):
    MetricsLogger("base", base_dir=url).log(step=0, val_bpb=2.0)
    MetricsLogger("base", base_dir=url, resume_step=0).log(step=0, val_bpb=1.5)
    records, _ = read_metrics(open_store(url), "metrics/base.jsonl")
    assert [r["val_bpb"] for r in records] == [1.5]


def test_a_long_run_rolls_over_into_bounded_segments_read_back_in_order(url, monkeypatch):
    monkeypatch.setattr(metrics, "SEGMENT_BYTES", 300)
    logger = MetricsLogger("base", base_dir=url)
    for step in range(12):
        logger.log(step=step, loss=1.0)
    store = open_store(url)
    keys = segment_keys(store, "metrics/base.jsonl")
    assert keys[:3] == ["metrics/base.jsonl", "metrics/base.jsonl.000001", "metrics/base.jsonl.000002"]
    assert all(len(store.get_bytes(k)) <= 300 for k in keys)
    assert [r["step"] for r in read_metrics(store, "metrics/base.jsonl")[0]] == list(range(12))


def test_a_resumed_phase_appends_after_the_last_segment(store_url, monkeypatch):
    monkeypatch.setattr(metrics, "SEGMENT_BYTES", 300)
    first = MetricsLogger("base", base_dir=store_url)
    for step in range(7):
        first.log(step=step)
    resumed = MetricsLogger("base", base_dir=store_url)  # a restarted process knows nothing of the first
    for step in range(7, 10):
        resumed.log(step=step)
    assert [r["step"] for r in read_metrics(open_store(store_url), "metrics/base.jsonl")[0]] == list(range(10))


def test_other_phases_files_are_not_taken_for_segments(store_url):
    MetricsLogger("base", base_dir=store_url).log(step=1)
    MetricsLogger("base_eval", base_dir=store_url).log(task="x", score=0.5)
    assert segment_keys(open_store(store_url), "metrics/base.jsonl") == ["metrics/base.jsonl"]
    assert read_metrics(open_store(store_url), "metrics/missing.jsonl") == ([], 0)


def test_the_frame_reader_gives_every_segments_records_as_columns(store_url, monkeypatch):
    monkeypatch.setattr(metrics, "SEGMENT_BYTES", 200)
    logger = MetricsLogger("base", base_dir=store_url)
    for step in range(1, 21):
        logger.log(step=step, loss=1.0 / step, **({"val_bpb": 0.5} if step % 10 == 0 else {}))
    frame, bad = read_metrics_frame(open_store(store_url), "metrics/base.jsonl")
    assert frame["step"].tolist() == list(range(1, 21)) and bad == 0
    assert frame["val_bpb"].notna().sum() == 2


def test_the_frame_reader_skips_and_counts_a_corrupt_line(store_url):
    open_store(store_url).put_text("metrics/base.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n[3]\n{"step": 4}\n')
    frame, bad = read_metrics_frame(open_store(store_url), "metrics/base.jsonl")
    assert frame["step"].tolist() == [1, 4] and bad == 2


def test_system_metrics_on_a_cpu_are_the_hosts_cpu_use():
    values = system_metrics(torch.device("cpu"))
    assert set(values) == {"cpu_percent"} and 0 <= values["cpu_percent"] <= 100
