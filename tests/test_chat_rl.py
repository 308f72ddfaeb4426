"""RL: advantages, which tokens the policy gradient trains, the step normalization, resuming, pass@k."""

import io

import pytest
import torch

from jobs.chat_rl import advantages, main, rl_backward, rl_loss, rollout_batch
from tasks.common import Task
from tasks.registry import TASKS
from tests.model_fixtures import random_model
from tests.phase_fixtures import assert_resume_continues_exactly, make_run
from vibechat.common import VibechatError
from vibechat.metrics import read_metrics
from vibechat.storage import open_store

PROMPT = [1, 2, 3]
# four answers to one question, as the Engine returns them: prompt + answer, mask 1 on sampled tokens;
# the second one called the calculator, whose output (22, 23) was forced into it
ROLLOUT = [
    (PROMPT + [10, 11, 12], [0, 0, 0, 1, 1, 1], 1.0),
    (PROMPT + [20, 21, 22, 23, 24], [0, 0, 0, 1, 1, 0, 0, 1], 0.0),
    (PROMPT + [30], [0, 0, 0, 1], 0.0),
    (PROMPT + [40, 41], [0, 0, 0, 1, 1], 1.0),
]
# which targets (next tokens) were sampled: position i predicts token i + 1
SAMPLED = torch.tensor([
    [0, 0, 1, 1, 1, 0, 0],
    [0, 0, 1, 1, 0, 0, 1],
    [0, 0, 1, 0, 0, 0, 0],
    [0, 0, 1, 1, 0, 0, 0],
], dtype=torch.bool)


def scripted_batch(rewards=None):
    sequences, masks, scripted_rewards = zip(*ROLLOUT)
    return rollout_batch(list(sequences), list(masks), list(rewards or scripted_rewards), pad_id=63)


def test_advantage_is_the_reward_minus_the_mean_over_the_questions_samples():
    assert advantages(torch.tensor([1.0, 0.0, 0.0, 1.0])).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert advantages(torch.tensor([1.0, 1.0, 1.0])).tolist() == [0.0, 0.0, 0.0]


def test_only_sampled_tokens_are_targets_never_the_prompt_tool_output_or_padding():
    inputs, targets, _ = scripted_batch()
    assert torch.equal(targets >= 0, SAMPLED)
    assert targets[1].tolist() == [-1, -1, 20, 21, -1, -1, 24]
    assert inputs[2].tolist() == [1, 2, 3, 63, 63, 63, 63]  # the last token is only a target


def test_policy_gradient_reaches_exactly_the_sampled_tokens_weighted_by_advantage():
    _, targets, adv = scripted_batch()
    logp = torch.randn(4, 7, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss = rl_loss(logp, adv, targets >= 0)
    loss.backward()
    num_sampled = 9
    expected = -adv[:, None] * SAMPLED / num_sampled
    torch.testing.assert_close(logp.grad, expected)
    torch.testing.assert_close(loss, -(logp * adv[:, None] * SAMPLED).sum() / num_sampled)


def test_answers_all_rewarded_alike_teach_nothing():
    _, targets, adv = scripted_batch(rewards=[1.0, 1.0, 1.0, 1.0])
    logp = torch.randn(4, 7).requires_grad_()
    rl_loss(logp, adv, targets >= 0).backward()
    assert not logp.grad.any()


def test_step_loss_is_normalized_over_the_whole_step_not_per_micro_batch():
    x, y, adv = scripted_batch()
    one = random_model()
    one_loss = rl_backward(one, [(x, y, adv)])
    split = random_model()
    split_loss = rl_backward(split, [(x[:1], y[:1], adv[:1]), (x[1:], y[1:], adv[1:])])
    torch.testing.assert_close(split_loss, one_loss)
    for (name, p), q in zip(one.named_parameters(), split.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    logp = -random_model()(x, y, loss_reduction="none").view_as(y)
    torch.testing.assert_close(one_loss, rl_loss(logp, adv, y >= 0))


class EvenLengthTask(Task):
    """Any reply of an even number of characters is right: an untrained model gets about half right, so the
    rewards of a question's answers differ and RL has something to learn."""

    def __init__(self, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        self.split = split

    @property
    def eval_type(self) -> str:
        return "generative"

    def num_examples(self) -> int:
        return 20

    def get_example(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"Say something, {self.split} {index}."},
                             {"role": "assistant", "content": "Something."}]}

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        return int(len(assistant_response) % 2 == 0)


def run_chat_rl(_rank: int, argv: list[str]) -> None:
    TASKS["even-length"] = (EvenLengthTask, {})
    main(argv)


ARGS = ["--device=cpu", "--task=even-length", "--device-batch-size=2", "--examples-per-step=2", "--num-samples=4",
        "--max-new-tokens=6", "--num-iterations=4", "--save-every=2", "--eval-every=2", "--eval-examples=2",
        "--eval-samples=3", "--init-lr-frac=1.0", "--matrix-lr=0.05"]


@pytest.fixture
def rl_run(base_dir, monkeypatch):
    monkeypatch.setitem(TASKS, "even-length", (EvenLengthTask, {}))
    make_run(base_dir, phase="sft")
    return base_dir


def test_rl_resumed_after_a_kill_ends_where_an_uninterrupted_run_ends(rl_run, capfd):
    argv = ARGS + ["--eval-every=0", "--num-iterations=3"]
    assert_resume_continues_exactly(rl_run, "rl", run_chat_rl, argv, last=3, kept=2, capfd=capfd)
    store = open_store(rl_run)
    start = torch.load(io.BytesIO(store.get_bytes("checkpoints/sft/d1/model_000001.pt")))
    end = torch.load(io.BytesIO(store.get_bytes("checkpoints/rl/d1/model_000003.pt")))
    assert any(not torch.equal(start[name], end[name]) for name in start)  # RL did change the model


def test_rl_logs_rewards_and_held_out_pass_at_k(rl_run):
    main(ARGS)
    records, _ = read_metrics(open_store(rl_run), "metrics/rl.jsonl")
    evals = [r for r in records if "pass@1" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert 0 <= r["pass@1"] <= r["pass@2"] <= r["pass@3"] <= 1
    assert all(0 <= r["reward"] <= 1 for r in records if "reward" in r)
    assert "held-out pass@3" in open_store(rl_run).get_text("report/chat-rl.md")


def test_rl_before_sft_says_to_run_sft_first(base_dir):
    make_run(base_dir, phase="mid")
    with pytest.raises(VibechatError, match=r"no 'sft' checkpoint.*python -m jobs\.chat_sft"):
        main(["--device=cpu"])
