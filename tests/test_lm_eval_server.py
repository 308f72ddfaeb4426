"""lm-evaluation-harness through python -m jobs.chat_server (local-chat-completions): the generative multiple-choice
stand-in of tasks/lm_eval/ scores as vibechat's own chat_eval scores it, on the replies the Engine gives."""

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from tasks.standins import StandinMultipleChoiceGenerative
from tests.model_fixtures import write_chat_checkpoint
from tests.phase_fixtures import phase_env, run_phase
from tests.serve_fixtures import REPO, start_server, stop_server
from vibechat.checkpoint_manager import load_model, save_checkpoint
from vibechat.engine import Engine
from vibechat.metrics import read_metrics
from vibechat.storage import open_store

PROBLEMS = 20
MAX_NEW_TOKENS = 16  # the task's max_gen_toks
CONTEXT = 1024
TASK = "vibechat_multiple_choice_standin_generative"


@dataclass
class Evaluated:
    base: str
    score: float  # lm-eval's exact_match
    replies: list[str]  # the replies lm-eval got, in the order of the test split


def evaluate_through_server(base: Path, out: Path) -> Evaluated:
    """Serve base's sft model on loopback and evaluate it with lm-eval on the first PROBLEMS questions."""
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


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Evaluated:
    """A tiny random sft model: its replies are gibberish, different for every question."""
    base = tmp_path_factory.mktemp("random")
    write_chat_checkpoint(base, sequence_len=CONTEXT)
    return evaluate_through_server(base, tmp_path_factory.mktemp("lm_eval"))


@pytest.fixture(scope="module")
def answers_b(tmp_path_factory) -> Evaluated:
    """A tiny sft model that replies "B" to every question: its score is the share of questions whose answer is B."""
    base = tmp_path_factory.mktemp("answers_b")
    model, tokenizer = write_chat_checkpoint(base, sequence_len=CONTEXT)
    model.init_weights()  # zero output projections: every block is the identity, the next token follows the last
    wte, special = model.transformer.wte.weight, tokenizer.encode_special
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.encode("B")[0]] = wte[special("<|assistant_start|>")]  # B after the prompt
        model.lm_head.weight[special("<|assistant_end|>")] = wte[tokenizer.encode("B")[0]]  # then the end of turn
    save_checkpoint(str(base / "checkpoints" / "sft" / "d2"), 0, model.state_dict(), None,
                    {"step": 0, "model_config": asdict(model.config)})
    return evaluate_through_server(base, tmp_path_factory.mktemp("lm_eval"))


def chat_eval_score(base: str) -> float:
    result = run_phase("jobs.chat_eval", ["--source=sft", "-a", "multiple-choice-standin-generative",
                                          f"--max-problems={PROBLEMS}", f"--max-new-tokens={MAX_NEW_TOKENS}"],
                       {"VIBECHAT_BASE_DIR": base})
    assert result.returncode == 0, result.stderr
    records, _ = read_metrics(open_store(base), "metrics/sft_eval.jsonl")
    return next(r["score"] for r in records if r["task"] == "MultipleChoice (stand-in, generative)")


def test_lm_eval_through_the_server_scores_as_chat_eval(answers_b):
    task = StandinMultipleChoiceGenerative(split="test")
    share_of_b = sum(task[i]["answer"] == "B" for i in range(PROBLEMS)) / PROBLEMS
    assert answers_b.replies == ["B"] * PROBLEMS
    assert answers_b.score == chat_eval_score(answers_b.base) == share_of_b > 0


def test_each_reply_lm_eval_got_is_the_engines_greedy_reply(random_model, monkeypatch):
    monkeypatch.setenv("VIBECHAT_BASE_DIR", random_model.base)
    model, tokenizer, _ = load_model("sft", "cpu", "eval")
    task, engine = StandinMultipleChoiceGenerative(split="test"), Engine(model, tokenizer)
    expected = []
    for i in range(PROBLEMS):
        prompt = tokenizer.render_for_completion(task[i])
        [reply], _ = engine.generate_batch(prompt, max_tokens=MAX_NEW_TOKENS, temperature=0)
        expected.append(tokenizer.decode(reply[len(prompt):]))
    assert random_model.replies == expected and len(set(expected)) > 1
