"""The run's report card: each phase logs a section, the report phase assembles report.md.

<report_dir>/header.md       environment of the run: git commit, machine, versions, code size
<report_dir>/<section>.md    one per logged section, written by log()
<report_dir>/<section>.json  when and where that section's process ran, for the wall clock and the cost
<report_dir>/report.md       written by generate(): header, summary table, every section in pipeline order

The summary table's numbers come from the evaluation phases' metrics, <base>/metrics/<stage>_eval.jsonl,
one record per task: {"task": "ARC-Easy", "score": 0.41, ...}. "score" is the number the table shows
(an accuracy for a task, the centered mean for CORE and ChatCORE, whose records list their "tasks");
the last record of a task wins.
report_dir may be a local path or a store URL (s3://...).
"""

import json
import os
import platform
import re
import socket
import subprocess
import time
from datetime import datetime

import psutil
import torch

from vibechat.common import format_duration, get_base_dir, get_dist_info
from vibechat.layout import REPORT_DIR, REPORT_NAME, STAGES, eval_metrics_key, join
from vibechat.metrics import read_metrics
from vibechat.storage import open_store

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GPU_HOUR_COST = 3.0  # dollars per GPU-hour: about an on-demand H100 ($24/h for a node of 8)

# the sections the phases log, in pipeline order; any other section follows them in the order it was logged
SECTION_ORDER = [
    "Tokenizer training", "Tokenizer evaluation",
    "Base model training", "Base model loss", "Base model evaluation",
    "Midtraining", "Chat evaluation mid",
    "Chat SFT", "Chat evaluation sft",
    "Chat RL", "Chat evaluation rl",
]
SUMMARY_METRICS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]


def slug(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


# ----------------------------------------------------------------------------------------------------------
# the header: what ran the pipeline, and on what


def git_commit() -> str:
    """The checked-out commit, marked dirty if files differ from it; 'unknown' outside a git checkout."""
    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + (" (dirty)" if dirty else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_description() -> str:
    if not torch.cuda.is_available():
        return "none"
    count = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    return f"{count} x {props.name} ({props.total_memory / 2 ** 30:.0f} GiB each)"


def code_size(root: str = PROJECT_ROOT) -> tuple[int, int, int]:
    """(files, lines, chars) of the project's .py files, skipping hidden folders (.venv, .git) and caches."""
    files = lines = chars = 0
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                    text = f.read()
                files, lines, chars = files + 1, lines + text.count("\n"), chars + len(text)
    return files, lines, chars


def header_text() -> str:
    files, lines, chars = code_size()
    return "\n".join([
        "# vibechat report",
        "",
        f"Begun {datetime.now():%Y-%m-%d %H:%M:%S}",
        "",
        "## Environment",
        "",
        f"- git commit: {git_commit()}",
        f"- host: {socket.gethostname()} ({platform.system()} {platform.machine()})",
        f"- CPU: {psutil.cpu_count(logical=True)} cores, {cpu_model()}",
        f"- memory: {psutil.virtual_memory().total / 2 ** 30:.1f} GiB",
        f"- GPUs: {gpu_description()}",
        f"- python {platform.python_version()}, torch {torch.__version__}",
        f"- code: {files} .py files, {lines:,} lines, {chars:,} chars",
        "",
    ]) + "\n"


# ----------------------------------------------------------------------------------------------------------
# the summary: scores per stage, wall clock, cost


def stage_scores(base_store) -> dict[str, dict[str, dict]]:
    """stage -> task -> its record, from metrics/<stage>_eval.jsonl (the last record of a task wins)."""
    scores = {}
    for stage in STAGES:
        records, _ = read_metrics(base_store, eval_metrics_key(stage))
        scores[stage] = {r["task"]: r for r in records if "task" in r and isinstance(r.get("score"), (int, float))}
    return scores


def summary_table(scores: dict[str, dict[str, dict]]) -> str:
    """Markdown table, a column per stage: the headline metrics, then every other task a chat model was scored
    on (stand-ins among them) and every aggregate (a record listing its "tasks"), such as a stand-in CORE.
    The base model's per-task CORE scores and bpb stay in its own report section."""
    extra = [task for stage in STAGES for task, record in scores[stage].items()
             if task not in SUMMARY_METRICS and (stage != "base" or "tasks" in record)]
    rows = SUMMARY_METRICS + list(dict.fromkeys(extra))
    lines = ["| Metric | " + " | ".join(s.upper() for s in STAGES) + " |",
             "|---" * (len(STAGES) + 1) + "|"]
    for task in rows:
        cells = [f"{scores[s][task]['score']:.4f}" if task in scores[s] else "-" for s in STAGES]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def time_and_cost(timings: list[dict], gpu_hour_cost: float) -> list[str]:
    """Wall clock from the first phase's start to the last section; GPU-hours summed over the phases' processes."""
    if not timings:
        return ["- total wall clock time: unknown (no phase logged a section)"]
    processes = {}  # a process that logs several sections counts once, with its latest elapsed time
    for t in timings:
        key = (t["host"], t["process_start"])
        processes[key] = max(processes.get(key, (0.0, 0)), (t["seconds"], t["gpus"]))
    gpu_hours = sum(seconds * gpus for seconds, gpus in processes.values()) / 3600
    wall = max(t["logged_at"] for t in timings) - min(t["process_start"] for t in timings)
    return [f"- total wall clock time: {format_duration(wall)}",
            f"- GPU-hours: {gpu_hours:.2f}",
            f"- estimated cost: ${gpu_hours * gpu_hour_cost:,.2f} (at ${gpu_hour_cost:.2f} per GPU-hour)"]


# ----------------------------------------------------------------------------------------------------------


class Report:
    def __init__(self, report_dir: str):
        self.report_dir = report_dir
        self.store = open_store(report_dir)

    def _ensure_header(self) -> None:
        if not self.store.exists("header.md"):
            self.store.put_text("header.md", header_text())

    def log(self, section: str, data: list) -> str:
        """Write a section: dicts become bullet lists, strings lines. Returns the section file's URI."""
        self._ensure_header()
        now = time.time()
        process = psutil.Process()
        _, _, _, world_size = get_dist_info()
        timing = {"section": section, "host": socket.gethostname(), "process_start": process.create_time(),
                  "logged_at": now, "seconds": now - process.create_time(),
                  "gpus": world_size if torch.cuda.is_available() else 0}
        lines = [f"## {section}", f"timestamp: {datetime.fromtimestamp(now):%Y-%m-%d %H:%M:%S}, "
                 f"process time {format_duration(timing['seconds'])} on {timing['gpus']} GPU(s)", ""]
        for item in data:
            if isinstance(item, dict):  # a list of its own: blank lines around it keep string rows (tables) apart
                if lines[-1]:
                    lines.append("")
                lines += [f"- {k}: {format_value(v)}" for k, v in item.items()] + [""]
            elif item:
                lines.append(str(item))
        key = slug(section)
        self.store.put_text(f"{key}.json", json.dumps(timing))
        self.store.put_text(f"{key}.md", "\n".join(lines).rstrip("\n") + "\n\n")
        return self.store.uri(f"{key}.md")

    def sections(self) -> list[tuple[str, dict]]:
        """(section file key, timing) of every logged section, in pipeline order."""
        timings = [json.loads(self.store.get_text(k)) for k in self.store.list("") if k.endswith(".json")]
        order = {slug(s): i for i, s in enumerate(SECTION_ORDER)}
        timings.sort(key=lambda t: (order.get(slug(t["section"]), len(order)), t["logged_at"]))
        return [(f"{slug(t['section'])}.md", t) for t in timings]

    def generate(self, gpu_hour_cost: float = DEFAULT_GPU_HOUR_COST) -> str:
        """Assemble report.md; returns its URI. Scores come from <report_dir>/../metrics/."""
        self._ensure_header()
        sections = self.sections()
        base_store = open_store(self.report_dir.rstrip("/").rsplit("/", 1)[0])
        parts = [self.store.get_text("header.md"),
                 f"## Summary\n\n{summary_table(stage_scores(base_store))}\n",
                 "\n".join(time_and_cost([t for _, t in sections], gpu_hour_cost)) + "\n\n"]
        parts += [self.store.get_text(key) for key, _ in sections]
        parts.append(f"Generated {datetime.now():%Y-%m-%d %H:%M:%S}\n")
        self.store.put_text(REPORT_NAME, "".join(parts))
        return self.store.uri(REPORT_NAME)

    def reset(self) -> None:
        """Delete every section and the report, and write a fresh header."""
        for key in self.store.list(""):
            self.store.delete(key)
        self.store.put_text("header.md", header_text())


class DummyReport:
    """What ranks other than 0 get: logs nothing."""

    def log(self, *args, **kwargs) -> None:
        pass

    def generate(self, *args, **kwargs) -> None:
        pass

    def reset(self, *args, **kwargs) -> None:
        pass


def get_report() -> "Report | DummyReport":
    _, rank, _, _ = get_dist_info()
    if rank != 0:
        return DummyReport()
    return Report(join(get_base_dir(), REPORT_DIR))
