"""What the phase programs share: the progress line, the eval/save cadence, resuming only with the same rank count."""

import pytest
import torch

import jobs.chat_rl
import jobs.chat_sft
import jobs.mid_train
from jobs.phase import eval_due, progress_line, resume, save_due
from tests.phase_fixtures import make_run
from vibechat.checkpoint_manager import save_checkpoint
from vibechat.common import VibechatError
from vibechat.gpt import GPT, config_for_depth


def test_progress_line_shows_the_records_metrics_in_its_order_and_leaves_out_the_others():
    record = dict(loss=3.21, raw_loss=3.3, reward=0.5, answer_tokens=12.34, lr=0.5, dt=0.25, tok_per_sec=12345.6,
                  tokens=1024, mfu=0.4567)
    assert progress_line(12, 100, record) == ("step 12/100 | loss 3.2100 | reward 0.5000 | answer tokens 12.3 | "
                                              "lr 0.500 | dt 250ms | tok/s 12,346 | mfu 45.7%")
    assert progress_line(0, 10, {"val_bpb": 1.5, "tokens": 0}) == "step 0/10 | val bpb 1.5000"


def test_a_fresh_run_evaluates_from_step_0_and_saves_every_n_steps_and_at_the_end():
    assert [s for s in range(8) if eval_due(s, 3, 0, 7)] == [0, 3, 6, 7]
    assert [s for s in range(8) if save_due(s, 3, 0, 7)] == [3, 6, 7]


def test_a_resumed_run_neither_evaluates_nor_saves_the_step_it_resumed_from():
    assert [s for s in range(3, 8) if eval_due(s, 3, 3, 7)] == [6, 7]
    assert [s for s in range(3, 8) if save_due(s, 3, 3, 7)] == [6, 7]


def test_evaluation_every_0_steps_is_none_and_saving_every_0_steps_is_only_at_the_end():
    assert not any(eval_due(s, 0, 0, 4) for s in range(5))
    assert [s for s in range(5) if save_due(s, 0, 0, 4)] == [4]


def save_two_rank_checkpoint(checkpoint_dir: str) -> None:
    """A step-2 checkpoint as a two-rank run commits it (the optimizer shards are not read before the check)."""
    config = config_for_depth(1, 300, 64)
    meta = {"step": 2, "model_config": config.__dict__, "world_size": 2, "source_step": 1}
    save_checkpoint(checkpoint_dir, 2, GPT(config).state_dict(), None, meta)


def test_resuming_a_checkpoint_of_another_rank_count_names_both_counts(tmp_path):
    save_two_rank_checkpoint(str(tmp_path))
    with pytest.raises(VibechatError, match="written by 2 ranks but this run has 1: resume with 2 ranks"):
        resume(str(tmp_path), torch.device("cpu"), world_size=1)


@pytest.mark.parametrize("phase, main, argv", [
    ("mid", jobs.mid_train.main, ["--tasks=identity"]),
    ("sft", jobs.chat_sft.main, ["--tasks=identity", "--source=base"]),
    ("rl", jobs.chat_rl.main, []),
])
def test_post_training_phases_refuse_to_resume_with_another_rank_count(base_dir, phase, main, argv):
    make_run(base_dir)
    save_two_rank_checkpoint(f"{base_dir}/checkpoints/{phase}/d1")
    with pytest.raises(VibechatError, match="written by 2 ranks but this run has 1"):
        main(["--device=cpu", *argv])
