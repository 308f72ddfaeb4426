"""python -m jobs.chat_cli against a tiny checkpoint and tokenizer written into a base dir."""

import os
import subprocess
import sys

import pytest

from jobs.chat_cli import TOOL_MARKERS
from tests.model_fixtures import write_chat_checkpoint
from vibechat.engine import Engine
from vibechat.gpt import GPT
from vibechat.tokenizer import RustBPETokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A base dir holding a trained 300-token tokenizer and an sft checkpoint of a tiny random GPT."""
    base = tmp_path_factory.mktemp("run")
    model, tokenizer = write_chat_checkpoint(base, sequence_len=64)
    return base, model, tokenizer


def chat_cli(base, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIBECHAT_")}
    env["VIBECHAT_BASE_DIR"] = str(base)
    return subprocess.run([sys.executable, "-m", "jobs.chat_cli", "--device", "cpu", *args], cwd=REPO, env=env,
                          input=stdin, capture_output=True, text=True, timeout=300)


def greedy_reply(model: GPT, tokenizer: RustBPETokenizer, text: str, max_tokens: int) -> str:
    special = tokenizer.encode_special
    prompt = [tokenizer.get_bos_token_id(), special("<|user_start|>"), *tokenizer.encode(text),
              special("<|user_end|>"), special("<|assistant_start|>")]
    results, _ = Engine(model.eval(), tokenizer).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)
    text = tokenizer.decode(results[0][len(prompt):])
    for name, marker in TOOL_MARKERS.items():  # tool tokens print as markers
        text = text.replace(name, marker)
    return text


def test_one_shot_prompt_prints_the_models_reply_and_exits_zero(run_dir):
    base, model, tokenizer = run_dir
    result = chat_cli(base, "--source", "sft", "-p", "hello there", "-t", "0", "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    expected = greedy_reply(model, tokenizer, "hello there", max_tokens=12)
    assert expected.strip()
    assert result.stdout == expected + "\n"


def test_interactive_chat_survives_an_overlong_prompt_clears_and_ends_at_eof(run_dir):
    base, _, _ = run_dir
    too_long = "the sky is blue " * 40
    result = chat_cli(base, "--source", "sft", "--max-tokens", "8", stdin=f"{too_long}\nhello\nclear\nhi\n")
    assert result.returncode == 0, result.stderr
    assert "error: the prompt has" in result.stdout
    assert "(conversation cleared)" in result.stdout
    assert result.stdout.count("Assistant: ") == 3


def test_quit_ends_the_session(run_dir):
    base, _, _ = run_dir
    result = chat_cli(base, "--source", "sft", stdin="quit\nhello\n")
    assert result.returncode == 0, result.stderr
    assert "Assistant: " not in result.stdout


def test_a_missing_checkpoint_is_one_clear_line_and_a_nonzero_exit(tmp_path):
    result = chat_cli(tmp_path, "--source", "rl", "-p", "hello")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no 'rl' checkpoint") and "chat_rl" in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("option, value, message", [("-t", "-1", "--temperature -1.0"), ("-k", "0", "--top-k 0"),
                                                    ("--max-tokens", "0", "--max-tokens 0")])
def test_a_bad_sampling_option_is_one_clear_line_and_a_nonzero_exit(tmp_path, option, value, message):
    result = chat_cli(tmp_path, "-p", "hello", option, value)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message} is not allowed")


def test_a_model_tag_the_stage_lacks_names_the_tags_it_has(run_dir):
    base, _, _ = run_dir
    result = chat_cli(base, "--source", "sft", "--model-tag", "d9", "-p", "hello")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no model tag 'd9' in {base}/checkpoints/sft: it has d2"


def test_a_negative_step_is_a_usage_error(run_dir):
    base, _, _ = run_dir
    result = chat_cli(base, "--source", "sft", "--step", "-3", "-p", "hello")
    assert result.returncode == 2 and "--step: -3 must be at least 0" in result.stderr
