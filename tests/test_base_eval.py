"""Base model evaluation: CORE (real bundle or stand-ins, named honestly), bits per byte, samples, records."""

import json

import pytest

from jobs.base_eval import parse_args
from tests.conftest import free_port
from tests.core_fixtures import CORE_YAML, MC_DATA, META_CSV
from tests.phase_fixtures import make_store, records, run_phase, save_tiny_model
from vibechat.common import VibechatError
from vibechat.report import stage_scores
from vibechat.storage import open_store

FAST = ["--max-per-task=4", "--bpb-tokens=128", "--device-batch-size=2", "--samples=2"]


@pytest.fixture
def base_run(tmp_path) -> tuple[str, dict]:
    root = str(tmp_path)
    env = make_store(root)
    save_tiny_model(root, "base")
    return root, env


@pytest.fixture(scope="module")
def standin_run(tmp_path_factory):
    """(root, completed process) of one base_eval with the stand-in CORE tasks, shared by the tests that read it."""
    root = str(tmp_path_factory.mktemp("standin"))
    env = make_store(root)
    save_tiny_model(root, "base")
    result = run_phase("jobs.base_eval", ["--core=standin", *FAST], env)
    assert result.returncode == 0, result.stderr
    return root, result


def test_standin_core_is_recorded_under_standin_names_never_as_core(standin_run):
    root, result = standin_run
    tasks = {r["task"]: r for r in records(root, "base") if "task" in r}
    assert "CORE" not in tasks
    assert {"bigger_number (stand-in)", "addition (stand-in)", "comparison (stand-in)", "sequence (stand-in)",
            "CORE (stand-in)"} <= set(tasks)
    standins = [r for name, r in tasks.items() if name.endswith("(stand-in)") and name != "CORE (stand-in)"]
    assert tasks["CORE (stand-in)"]["score"] == pytest.approx(sum(r["centered"] for r in standins) / len(standins))
    assert "step 1/3 | CORE (stand-in)" in result.stdout


def test_bits_per_byte_of_both_splits_and_samples_are_recorded(standin_run):
    root, _ = standin_run
    rows = records(root, "base")
    bpb = {r["task"]: r["score"] for r in rows if r.get("task", "").endswith("bpb")}
    assert set(bpb) == {"train bpb", "val bpb"} and all(0 < v < 20 for v in bpb.values())
    samples = next(r["samples"] for r in rows if "samples" in r)
    assert len(samples) == 2 and samples[0].startswith("The capital of Italy is")


def test_records_are_what_the_report_summary_reads(standin_run):
    root, _ = standin_run
    scores = stage_scores(open_store(f"{root}/runs/r1"))["base"]
    assert {"CORE (stand-in)", "train bpb", "val bpb", "sequence (stand-in)"} <= set(scores)
    report = f"{root}/runs/r1/report"
    assert open(f"{report}/base-model-evaluation.md").read().startswith("## Base model evaluation")
    assert "val bpb" in open(f"{report}/base-model-loss.md").read()


def test_real_core_reads_the_bundle_from_the_store_and_records_core(base_run):
    root, env = base_run
    store = open_store(f"{root}/data/eval_bundle")
    store.put_text("eval_meta_data.csv", META_CSV)
    store.put_text("eval_data/world_knowledge/tiny_mc.jsonl", "\n".join(json.dumps(d) for d in MC_DATA))
    store.put_text("eval_data/language_modeling/tiny_lm.jsonl", json.dumps({"context": "abc", "continuation": "de"}))
    store.put_text("core.yaml", CORE_YAML)  # last: it marks the bundle complete
    result = run_phase("jobs.base_eval", ["--core=real", *FAST], env)
    assert result.returncode == 0, result.stderr
    tasks = {r["task"] for r in records(root, "base") if "task" in r}
    assert {"tiny_mc", "tiny_lm", "CORE"} <= tasks and "CORE (stand-in)" not in tasks


def test_offline_real_core_is_one_error_that_names_core_standin(base_run):
    _, env = base_run
    unreachable = f"http://127.0.0.1:{free_port()}/eval_bundle.zip"
    result = run_phase("jobs.base_eval", ["--core=real", f"--eval-bundle-url={unreachable}"], env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: could not download the CORE eval bundle")
    assert "--core standin" in result.stderr and "Traceback" not in result.stderr


def test_without_a_base_checkpoint_the_error_names_the_phase_to_run(tmp_path):
    result = run_phase("jobs.base_eval", ["--core=standin"], make_store(str(tmp_path)))
    assert result.returncode == 2
    assert "run the base phase first (python -m jobs.base_train)" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--samples=99"], "--samples 99: there are 8 sample prompts"),
    (["--max-per-task=0"], "--max-per-task 0: use a positive number of examples, or -1 for all"),
    (["--bpb-tokens=0"], "--bpb-tokens 0: use a positive number"),
])
def test_bad_arguments_are_refused_with_what_to_use(argv, message):
    with pytest.raises(VibechatError, match=message):
        parse_args(argv)
