"""SFT: padded batches trained on the assistant's tokens, the loss normalized over the whole step, resuming."""

import pytest
import torch
import torch.multiprocessing as mp

from jobs.chat_sft import main, sft_backward
from tests.conftest import free_port
from tests.model_fixtures import random_model
from tests.phase_fixtures import assert_resume_continues_exactly, make_run
from vibechat.common import VibechatError


def step_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows whose supervised token counts differ a lot (12, 1, 6, 3): where per-batch means go wrong."""
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 64, (4, 12), generator=g)
    targets = torch.randint(0, 64, (4, 12), generator=g)
    for row, kept in enumerate([12, 1, 6, 3]):
        targets[row, kept:] = -1
    return inputs, targets


def loss_and_grads(micro_batches) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = random_model()
    loss = sft_backward(model, micro_batches)
    return loss, {name: p.grad for name, p in model.named_parameters()}


def _rank_worker(rank: int, world: int, port: int, out_path: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    x, y = step_batch()
    rows = [slice(0, 1), slice(1, 4)][rank]  # unequal shares: 12 supervised tokens on rank 0, 10 on rank 1
    loss, grads = loss_and_grads([(x[rows], y[rows])])
    for grad in grads.values():  # what DistAdamW and DistMuon do with gradients: average them over ranks
        torch.distributed.all_reduce(grad)
        grad /= world
    if rank == 0:
        torch.save((loss, grads), out_path)
    torch.distributed.destroy_process_group()


def test_step_loss_is_the_mean_over_all_supervised_tokens_however_the_batch_is_split(tmp_path):
    x, y = step_batch()
    one_loss, one_grads = loss_and_grads([(x, y)])
    accum_loss, accum_grads = loss_and_grads([(x[:1], y[:1]), (x[1:2], y[1:2]), (x[2:], y[2:])])
    out = str(tmp_path / "ranks.pt")
    mp.spawn(_rank_worker, args=(2, free_port(), out), nprocs=2, join=True)
    ranks_loss, ranks_grads = torch.load(out)

    per_token = random_model()(x, y, loss_reduction="none")
    torch.testing.assert_close(one_loss, per_token.sum() / (y >= 0).sum())
    for loss, grads in [(accum_loss, accum_grads), (ranks_loss, ranks_grads)]:
        torch.testing.assert_close(loss, one_loss)
        for name, grad in one_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # the trap this guards against: averaging the micro-batch means gives another loss
    model = random_model()
    naive = sum(model(x[s], y[s]) for s in (slice(0, 1), slice(1, 2), slice(2, 4))) / 3
    assert abs(naive.item() - one_loss.item()) > 0.01


def run_chat_sft(_rank: int, argv: list[str]) -> None:
    main(argv)


ARGS = ["--device=cpu", "--tasks=conversations-standin:100,arithmetic-standin:50,identity", "--max-seq-len=64",
        "--device-batch-size=2", "--target-examples-per-step=4", "--num-iterations=6", "--save-every=3",
        "--eval-every=3", "--eval-steps=2", "--init-lr-frac=1.0"]


def test_sft_resumed_after_a_kill_ends_where_an_uninterrupted_run_ends(base_dir, capfd):
    make_run(base_dir, phase="base")
    argv = ARGS + ["--source=base"]
    assert_resume_continues_exactly(base_dir, "sft", run_chat_sft, argv, last=6, kept=3, capfd=capfd)


def test_sft_before_midtraining_says_to_run_midtraining_first(base_dir):
    make_run(base_dir, phase="base")
    with pytest.raises(VibechatError, match=r"no 'mid' checkpoint.*python -m jobs\.mid_train"):
        main(ARGS)
