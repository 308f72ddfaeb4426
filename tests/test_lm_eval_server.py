"""lm-evaluation-harness through python -m jobs.chat_server (local-chat-completions): the generative multiple-choice
stand-in of tasks/lm_eval/ scores as vibechat's own chat_eval scores it."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.model_fixtures import write_chat_checkpoint
from tests.phase_fixtures import phase_env, run_phase
from tests.serve_fixtures import REPO, start_server, stop_server
from vibechat.engine import Engine
from vibechat.metrics import read_metrics
from vibechat.storage import open_store

PROBLEMS = 20
MAX_NEW_TOKENS = 16  # the task's max_gen_toks
TASK = "vibechat_multiple_choice_standin_generative"


@dataclass
class Evaluated:
    base: str
    score: float  # lm-eval's exact_match
    replies: list[str]  # lm-eval's logged replies, in the order of the test split


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Evaluated:
    """A tiny random sft model served on loopback and evaluated by lm-eval on the first PROBLEMS questions."""
    base = tmp_path_factory.mktemp("run")
    write_chat_checkpoint(base, sequence_len=1024)
    out = tmp_path_factory.mktemp("lm_eval")
    proc, url = start_server(base)
    try:
        model_args = (f"model=default/sft/0,base_url={url}/v1/chat/completions,tokenizer_backend=None,"
                      "tokenized_requests=False")
        command = [sys.executable, "-m", "lm_eval", "--model", "local-chat-completions", "--model_args", model_args,
                   "--tasks", TASK, "--include_path", f"{REPO}/tasks/lm_eval", "--apply_chat_template",
                   "--limit", str(PROBLEMS), "--log_samples", "--output_path", str(out)]
        offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
        result = subprocess.run(command, env={**phase_env({}), **offline}, cwd=str(out), capture_output=True,
                                text=True, timeout=300)
    finally:
        stop_server(proc)
    assert result.returncode == 0, result.stderr[-3000:]
    files = [os.path.join(d, f) for d, _, names in os.walk(out) for f in names]
    [results_file] = [f for f in files if os.path.basename(f).startswith("results")]
    [samples_file] = [f for f in files if os.path.basename(f).startswith(f"samples_{TASK}")]
    samples = sorted((json.loads(line) for line in open(samples_file)), key=lambda s: s["doc_id"])
    score = json.load(open(results_file))["results"][TASK]["exact_match,none"]
    return Evaluated(str(base), score, [s["resps"][0][0] for s in samples])


def test_lm_eval_through_the_server_scores_as_chat_eval(evaluated):
    result = run_phase("jobs.chat_eval", ["--source=sft", "-a", "multiple-choice-standin-generative",
                                          f"--max-problems={PROBLEMS}", f"--max-new-tokens={MAX_NEW_TOKENS}"],
                       {"VIBECHAT_BASE_DIR": evaluated.base})
    assert result.returncode == 0, result.stderr
    records, _ = read_metrics(open_store(evaluated.base), "metrics/sft_eval.jsonl")
    ours = next(r["score"] for r in records if r["task"] == "MultipleChoice (stand-in, generative)")
    assert evaluated.score == ours


def test_each_reply_lm_eval_got_is_the_engines_greedy_reply(evaluated):
    from tasks.standins import StandinMultipleChoiceGenerative
    from vibechat.checkpoint_manager import load_model

    os.environ["VIBECHAT_BASE_DIR"] = evaluated.base
    model, tokenizer, _ = load_model("sft", "cpu", "eval")
    task, engine = StandinMultipleChoiceGenerative(split="test"), Engine(model, tokenizer)
    expected = []
    for i in range(PROBLEMS):
        prompt = tokenizer.render_for_completion(task[i])
        [reply], _ = engine.generate_batch(prompt, max_tokens=MAX_NEW_TOKENS, temperature=0)
        expected.append(tokenizer.decode(reply[len(prompt):]))
    assert evaluated.replies == expected
