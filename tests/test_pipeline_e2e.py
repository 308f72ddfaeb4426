"""The main job, end to end: `python -m jobs.controller start --preset ci` runs every real phase on CPU."""

import json
import os
import subprocess
import sys

from tests.phase_fixtures import REPO
from vibechat.metrics import read_metrics
from vibechat.storage import open_store


def test_ci_preset_runs_every_real_phase_and_writes_the_report(tmp_path):
    store = str(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIBECHAT_")}
    config = tmp_path / "export.yaml"
    config.write_text("phases:\n  export: {skip: false}\n")  # the one phase the preset leaves off
    result = subprocess.run([sys.executable, "-m", "jobs.controller", "start", "--preset", "ci", "--run-id", "e2e",
                             "--store", store, "--config", str(config)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "run e2e succeeded" in result.stdout
    run = json.loads(open(f"{store}/runs/e2e/run.json").read())
    assert {p["state"] for p in run["phases"].values()} == {"succeeded"}
    report = open(f"{store}/runs/e2e/report/report.md").read()
    assert "## Summary" in report and "(stand-in)" in report
    assert "exported rl model d2 step" in open(f"{store}/runs/e2e/logs/export-1.log").read()  # the last stage
    assert json.load(open(f"{store}/runs/e2e/export/hf/config.json"))["model_type"] == "nanochat"
    records, bad = read_metrics(open_store(store), "runs/e2e/metrics/base.jsonl")
    assert bad == 0 and any("loss" in r for r in records)

    status = subprocess.run([sys.executable, "-m", "jobs.controller", "status", "e2e", "--store", store], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stdout.count("succeeded") >= 12
