"""The report: sections in pipeline order, the header, a summary table equal to the eval metrics, cost."""

import random

import pytest

from jobs.report import main
from vibechat.common import VibechatError
from vibechat.metrics import MetricsLogger, read_metrics
from vibechat.report import SECTION_ORDER, DummyReport, Report, get_report, time_and_cost
from vibechat.storage import open_store

# what the evaluation phases write: metrics/<stage>_eval.jsonl, one {"task", "score"} record per task;
# aggregates (CORE, ChatCORE) list the tasks they average
AGGREGATES = {"CORE", "CORE (stand-in)", "ChatCORE"}
EVAL_SCORES = {
    "base": [("hellaswag", 0.26), ("val bpb", 1.1), ("CORE", 0.1234), ("CORE (stand-in)", 0.2)],
    "mid": [("ARC-Easy", 0.30), ("MMLU", 0.29), ("GSM8K", 0.02), ("MultipleChoice (stand-in)", 0.5),
            ("ChatCORE", 0.07)],
    "sft": [("ARC-Easy", 0.38), ("ARC-Challenge", 0.28), ("MMLU", 0.31), ("GSM8K", 0.04), ("HumanEval", 0.06),
            ("ChatCORE", 0.09), ("ARC-Easy", 0.39)],  # a re-run evaluation: the last record counts
    "rl": [("GSM8K", 0.08), ("Arithmetic (stand-in)", 0.61), ("ARC-Easy", 0.40)],
}


def log_a_run() -> None:
    """Every phase's section (in a scrambled order, as re-runs may leave them) and every stage's eval metrics."""
    sections = SECTION_ORDER + ["Chat with the model"]
    for section in random.Random(0).sample(sections, len(sections)):
        get_report().log(section=section, data=[{"argument": 1, "result": 0.5}, "| a | table |"])
    for stage, scores in EVAL_SCORES.items():
        metrics = MetricsLogger(f"{stage}_eval")
        for task, score in scores:
            extra = {"tasks": ["some", "tasks"]} if task in AGGREGATES else {"num_examples": 100}
            metrics.log(task=task, score=score, **extra)


def summary_table(report: str) -> dict[str, dict[str, str]]:
    """metric -> stage column -> cell of the report's summary table."""
    lines = report.split("## Summary", 1)[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def generate_report(capsys, *argv) -> str:
    main(list(argv))
    path = capsys.readouterr().out.strip().splitlines()[-1]
    return open_store(path.rsplit("/", 1)[0]).get_text("report.md")


def test_report_has_every_section_once_in_pipeline_order(base_dir, capsys):
    log_a_run()
    report = generate_report(capsys)
    positions = [report.index(f"## {section}\n") for section in SECTION_ORDER + ["Chat with the model"]]
    assert positions == sorted(positions)
    assert all(report.count(f"## {section}\n") == 1 for section in SECTION_ORDER)
    assert "- result: 0.5000" in report and "| a | table |" in report


def test_summary_table_numbers_are_the_eval_metrics_in_the_store(base_dir, capsys):
    log_a_run()
    table = summary_table(generate_report(capsys))
    store = open_store(base_dir)
    for stage in EVAL_SCORES:
        records, _ = read_metrics(store, f"metrics/{stage}_eval.jsonl")
        latest = {r["task"]: r["score"] for r in records}
        for task, cells in table.items():
            if task in latest:
                assert float(cells[stage.upper()]) == pytest.approx(latest[task], abs=5e-5)
            else:
                assert cells[stage.upper()] == "-"
    assert table["ARC-Easy"]["SFT"] == "0.3900"


def test_summary_table_has_the_headline_rows_then_stand_ins_and_aggregates_in_rows_of_their_own(base_dir, capsys):
    log_a_run()
    table = summary_table(generate_report(capsys))
    assert list(table) == ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE",
                           "CORE (stand-in)", "MultipleChoice (stand-in)", "Arithmetic (stand-in)"]
    assert table["Arithmetic (stand-in)"] == {"BASE": "-", "MID": "-", "SFT": "-", "RL": "0.6100"}
    assert table["GSM8K"]["RL"] == "0.0800"


def test_header_records_commit_machine_versions_and_code_size(base_dir, capsys):
    get_report().log(section="Base model training", data=[{"iterations": 10}])
    report = generate_report(capsys)
    for field in ["git commit:", "CPU:", "memory:", "GPUs: none", "python 3.", "torch ", ".py files"]:
        assert field in report.split("## Summary")[0], field


def test_report_phase_writes_a_header_when_no_phase_logged_anything(base_dir, capsys):
    report = generate_report(capsys)
    assert report.startswith("# vibechat report") and "## Summary" in report
    assert "no phase logged a section" in report


def test_cost_is_gpu_hours_times_the_rate_counting_each_process_once():
    timings = [  # an 8-GPU phase that logged two sections, a CPU phase, another GPU phase
        {"host": "a", "process_start": 0.0, "logged_at": 1800.0, "seconds": 1800.0, "gpus": 8},
        {"host": "a", "process_start": 0.0, "logged_at": 3600.0, "seconds": 3600.0, "gpus": 8},
        {"host": "b", "process_start": 3600.0, "logged_at": 5400.0, "seconds": 1800.0, "gpus": 0},
        {"host": "c", "process_start": 5400.0, "logged_at": 7200.0, "seconds": 1800.0, "gpus": 2},
    ]
    lines = time_and_cost(timings, gpu_hour_cost=2.5)
    assert lines == ["- total wall clock time: 2h00m00s", "- GPU-hours: 9.00",
                     "- estimated cost: $22.50 (at $2.50 per GPU-hour)"]


def test_report_lives_in_an_s3_store(s3_url, monkeypatch, capsys):
    monkeypatch.setenv("VIBECHAT_BASE_DIR", s3_url)
    log_a_run()
    report = generate_report(capsys, "--gpu-hour-cost=1.5")
    assert "## Chat RL" in report and summary_table(report)["CORE"]["BASE"] == "0.1234"
    assert "at $1.50 per GPU-hour" in report


def test_reset_clears_the_sections_and_writes_a_fresh_header(base_dir):
    log_a_run()
    report = Report(f"{base_dir}/report")
    report.reset()
    assert open_store(f"{base_dir}/report").list("") == ["header.md"]


def test_ranks_other_than_zero_get_a_report_that_writes_nothing(base_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report = get_report()
    assert isinstance(report, DummyReport)
    report.log(section="Chat SFT", data=[{"a": 1}])
    assert not open_store(base_dir).list("report")


def test_a_negative_gpu_hour_cost_is_an_error_naming_the_flag(base_dir):
    with pytest.raises(VibechatError, match="--gpu-hour-cost"):
        main(["--gpu-hour-cost=-1"])
