"""Chat evaluation: letters scored by their logits, generative tasks graded, ChatCORE named honestly, records."""

import re
import subprocess
import sys

import pytest
import torch

from jobs.chat_eval import TaskResult, chatcore, choose_letters, load_tasks, parse_args
from tests.phase_fixtures import REPO, make_store, phase_env, records, run_phase, save_tiny_model
from vibechat.common import VibechatError
from vibechat.report import stage_scores
from vibechat.storage import open_store

A, B, C, D = 65, 66, 67, 68  # the letters' token ids in the scripted vocabulary
PAD, OTHER = 0, 99


class ScriptedModel(torch.nn.Module):
    """Logits at a position are a row of `table`, chosen by the token there: the test decides every answer."""

    def __init__(self, table: dict[int, dict[int, float]], vocab_size: int = 128):
        super().__init__()
        logits = torch.zeros(vocab_size, vocab_size)
        for token, favourites in table.items():
            for favourite, value in favourites.items():
                logits[token, favourite] = value
        self.register_buffer("logits", logits)

    def get_device(self) -> torch.device:
        return self.logits.device

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits[idx]


def test_the_answer_is_the_choice_letter_with_the_highest_logit():
    # after token 7 the model likes OTHER best, then C: only the letters count, and C is the highest of them
    model = ScriptedModel({7: {OTHER: 9.0, C: 3.0, A: 1.0, D: -2.0}})
    assert choose_letters(model, [[1, 2, 7]], [[A, B, C, D]], PAD) == [2]


def test_only_the_offered_letters_compete():
    # a three-choice question: D is likelier than every offered letter but is not a choice
    model = ScriptedModel({7: {D: 9.0, B: 2.0}})
    assert choose_letters(model, [[7]], [[A, B, C]], PAD) == [1]


def test_each_prompt_of_a_padded_batch_is_read_at_its_own_last_token():
    # the padding favours A: reading a short prompt's logits at the batch's last column would answer A
    model = ScriptedModel({PAD: {A: 9.0}, 5: {D: 4.0}, 6: {B: 4.0}})
    prompts = [[1, 2, 3, 4, 5], [1, 6], [3, 3, 5]]
    assert choose_letters(model, prompts, [[A, B, C, D]] * 3, PAD) == [3, 1, 3]


def result(name: str, accuracy: float, baseline: float = 0.0) -> TaskResult:
    return TaskResult(name, "multiple_choice" if baseline else "generative", 10, accuracy, baseline, 0)


def test_chatcore_centers_each_task_on_guessing():
    # four choices: 0.25 is guessing (0), 0.625 half way to perfect; a generative task's baseline is 0
    label, score = chatcore([result("MMLU", 0.625, baseline=0.25), result("GSM8K", 0.1)])
    assert (label, score) == ("ChatCORE (partial)", pytest.approx((0.5 + 0.1) / 2))


def test_chatcore_is_so_named_only_over_the_full_real_set():
    real = [result("ARC-Easy", 0.5, 0.25), result("ARC-Challenge", 0.25, 0.25), result("MMLU", 1.0, 0.25),
            result("GSM8K", 0.3), result("HumanEval", 0.1), result("SpellingBee", 0.2)]
    label, score = chatcore(real + [result("Arithmetic (stand-in)", 1.0)])
    assert label == "ChatCORE"
    assert score == pytest.approx((1 / 3 + 0 + 1 + 0.3 + 0.1 + 0.2) / 6)  # the extra task is not in the mean


def test_a_set_with_standins_gives_a_standin_chatcore():
    label, _ = chatcore([result("MultipleChoice (stand-in)", 0.5, 0.25), result("HumanEval", 0.0)])
    assert label == "ChatCORE (stand-in)"


def test_tasks_are_named_in_any_case_and_evaluated_on_their_test_split():
    tasks = load_tasks("HumanEval, spellingbee,multiple-choice-standin")
    assert [t.name for t in tasks] == ["HumanEval", "SpellingBee", "MultipleChoice (stand-in)"]
    assert tasks[1].split == tasks[2].split == "test"


def test_training_only_tasks_are_refused():
    with pytest.raises(VibechatError, match="'smoltalk' is training data with no grading: evaluate one of arc-easy"):
        load_tasks("smoltalk")


@pytest.mark.parametrize("argv, message", [
    (["--max-problems=0"], "--max-problems 0: use a positive number"),
    (["--temperature=-1"], "--temperature -1.0: use 0 for greedy"),
    (["--num-samples=0"], "--num-samples 0: use a positive number"),
])
def test_bad_arguments_are_refused_with_what_to_use(argv, message):
    with pytest.raises(VibechatError, match=message):
        parse_args(argv)


def test_a_task_list_without_names_is_refused():
    with pytest.raises(VibechatError, match="-a ' , ' names no task"):
        load_tasks(" , ")


# --- the program --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("sft"))
    env = make_store(root)
    save_tiny_model(root, "sft")
    return root, env


def test_humaneval_runs_on_cpu_and_prints_a_real_score(sft_run):
    root, env = sft_run
    result = run_phase("jobs.chat_eval", ["--source=sft", "-a", "HumanEval", "--max-problems=4",
                                          "--max-new-tokens=16"], env)
    assert result.returncode == 0, result.stderr
    row = re.search(r"\| HumanEval \| generative \| 4 \| ([\d.]+) \|", result.stdout)
    assert row and 0.0 <= float(row.group(1)) <= 1.0
    tasks = {r["task"]: r for r in records(root, "sft")}
    assert tasks["HumanEval"]["problems"] == 4
    assert tasks["ChatCORE (partial)"]["score"] == tasks["HumanEval"]["score"]  # centered on a baseline of 0


def test_records_are_what_the_report_summary_reads(sft_run):
    root, env = sft_run
    argv = ["--source=sft", "-a", "multiple-choice-standin", "--max-problems=5"]
    assert run_phase("jobs.chat_eval", argv, env).returncode == 0
    scores = stage_scores(open_store(f"{root}/runs/r1"))["sft"]
    assert {"MultipleChoice (stand-in)", "ChatCORE (stand-in)"} <= set(scores)
    assert "ChatCORE" not in scores
    section = open(f"{root}/runs/r1/report/chat-evaluation-sft.md").read()
    assert section.startswith("## Chat evaluation sft")
    assert "| MultipleChoice (stand-in) | multiple_choice | 5 |" in section


def test_two_ranks_score_the_same_problems_as_one(sft_run):
    root, env = sft_run
    argv = ["--source=sft", "-a", "multiple-choice-standin,arithmetic-standin", "--max-problems=5",
            "--max-new-tokens=8", "--batch-size=2"]
    assert run_phase("jobs.chat_eval", argv, env).returncode == 0
    one = {r["task"]: r["score"] for r in records(root, "sft")[-3:]}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "jobs.chat_eval", *argv]
    two = subprocess.run(torchrun, env=phase_env(env), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert {r["task"]: r["score"] for r in records(root, "sft")[-3:]} == one


def test_unknown_task_is_one_error_listing_the_known_ones(sft_run):
    _, env = sft_run
    result = run_phase("jobs.chat_eval", ["--source=sft", "-a", "HumanEval,nope"], env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown task 'nope'; known tasks: arc-easy, arc-challenge")
    assert "Traceback" not in result.stderr
