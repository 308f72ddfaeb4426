"""Midtraining: conversations packed into rows, the mixture spec, resuming after a kill, the missing-base error."""

import itertools

import pytest
import torch

from jobs.mid_train import conversation_batches, estimate_iterations, main
from jobs.training import task_mixture
from tasks.standins import StandinConversations
from tests.phase_fixtures import assert_resume_continues_exactly, make_run
from vibechat.common import VibechatError
from vibechat.metrics import read_metrics
from vibechat.storage import open_store



def run_mid_train(_rank: int, argv: list[str]) -> None:
    main(argv)


def test_packed_rows_are_the_conversations_back_to_back_with_targets_shifted_by_one(base_dir):
    tokenizer = make_run(base_dir)
    dataset = StandinConversations(size=20)
    stream = [t for i in range(20) for t in tokenizer.render_conversation(dataset[i])[0]]
    batches = conversation_batches(dataset, tokenizer, B=2, T=16, rank=0, world_size=1)
    inputs, targets = zip(*[(x, y) for x, y, _ in itertools.islice(batches, 3)])
    flat_inputs = torch.cat([x.reshape(-1) for x in inputs]).tolist()
    flat_targets = torch.cat([y.reshape(-1) for y in targets]).tolist()
    assert flat_inputs == stream[:96]
    assert flat_targets == stream[1:97]


def test_ranks_take_alternate_conversations(base_dir):
    tokenizer = make_run(base_dir)
    dataset = StandinConversations(size=20)
    x, _, _ = next(conversation_batches(dataset, tokenizer, B=1, T=8, rank=1, world_size=2))
    assert x[0].tolist() == tokenizer.render_conversation(dataset[1])[0][:8]


def test_batches_from_a_saved_state_continue_the_stream_exactly(base_dir):
    tokenizer = make_run(base_dir)
    dataset = StandinConversations(size=20)
    straight = list(itertools.islice(conversation_batches(dataset, tokenizer, 2, 16, 0, 1), 5))
    _, _, state = straight[1]
    resumed = list(itertools.islice(conversation_batches(dataset, tokenizer, 2, 16, 0, 1, state=state), 3))
    for (x, y, s), (rx, ry, rs) in zip(straight[2:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry) and s == rs


def test_one_pass_is_the_mixtures_tokens_over_the_batch_size(base_dir):
    tokenizer = make_run(base_dir)
    dataset = task_mixture("identity", "train")
    tokens = sum(len(tokenizer.render_conversation(dataset[i])[0]) for i in range(len(dataset)))
    assert estimate_iterations(dataset, tokenizer, total_batch_size=256) == round(tokens / 256)


ARGS = ["--device=cpu", "--tasks=conversations-standin:200,arithmetic-standin:100,identity", "--max-seq-len=64",
        "--device-batch-size=2", "--total-batch-size=256", "--num-iterations=6", "--save-every=3",
        "--eval-every=3", "--eval-tokens=256", "--matrix-lr=0.05"]


def test_midtraining_resumed_after_a_kill_ends_where_an_uninterrupted_run_ends(base_dir, capfd):
    make_run(base_dir)
    assert_resume_continues_exactly(base_dir, "mid", run_mid_train, ARGS, last=6, kept=3, capfd=capfd)


def test_midtraining_lowers_the_loss_and_logs_metrics_and_a_report_section(base_dir):
    make_run(base_dir)
    main(ARGS)
    records, bad = read_metrics(open_store(base_dir), "metrics/mid.jsonl")
    losses = [r["raw_loss"] for r in records if "raw_loss" in r]
    assert bad == 0 and len(losses) == 6 and losses[-1] < losses[0]
    assert [r["step"] for r in records if "val_bpb" in r] == [0, 3, 6]
    assert "## Midtraining" in open_store(base_dir).get_text("report/midtraining.md")


def test_midtraining_without_a_base_model_says_to_run_base_training_first(base_dir):
    make_run(base_dir, phase="other")
    with pytest.raises(VibechatError, match=r"python -m jobs\.base_train"):
        main(ARGS)
