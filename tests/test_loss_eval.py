"""Bits per byte, checked against a model whose answer is known in closed form: the uniform distribution."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vibechat.common import VibechatError
from vibechat.loss_eval import evaluate_bpb

V = 16
SPECIAL = [0, 1]
# every ordinary token stands for 3 bytes, specials for none
TOKEN_BYTES = torch.tensor([0 if i in SPECIAL else 3 for i in range(V)], dtype=torch.int32)


class UniformModel(torch.nn.Module):
    """Predicts every token with probability 1/V, so its loss is ln V on every counted target."""

    def __init__(self, flat: bool = True, special_loss: float | None = None):
        super().__init__()
        self.flat, self.special_loss = flat, special_loss

    def forward(self, x, y, loss_reduction="mean"):
        logits = torch.zeros(*y.shape, V)
        loss = F.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=-1, reduction=loss_reduction)
        if self.special_loss is not None:  # a loss that must not count: on special and ignored targets
            loss = torch.where((y.view(-1) < len(SPECIAL)), self.special_loss, loss)
        return loss if self.flat else loss.view(y.shape)


def batches(seed: int, n: int = 4, B: int = 3, T: int = 10, low: int = 2):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        y = torch.randint(low, V, (B, T), generator=g)
        yield torch.randint(0, V, (B, T), generator=g), y


def test_bpb_of_a_uniform_model_is_log2_vocab_over_bytes_per_token():
    bpb = evaluate_bpb(UniformModel(), batches(0), steps=4, token_bytes=TOKEN_BYTES)
    assert bpb == pytest.approx(math.log2(V) / 3, rel=1e-6)


def test_per_token_losses_may_come_flat_or_shaped_like_the_batch():
    flat = evaluate_bpb(UniformModel(flat=True), batches(1), steps=4, token_bytes=TOKEN_BYTES)
    shaped = evaluate_bpb(UniformModel(flat=False), batches(1), steps=4, token_bytes=TOKEN_BYTES)
    assert flat == pytest.approx(shaped, rel=1e-6)


def test_special_and_ignored_targets_count_neither_loss_nor_bytes():
    def with_specials_and_ignored():
        for x, y in batches(2, low=0):  # targets include the special tokens 0 and 1
            y[:, :3] = -1
            yield x, y

    model = UniformModel(special_loss=1000.0)
    bpb = evaluate_bpb(model, with_specials_and_ignored(), steps=4, token_bytes=TOKEN_BYTES)
    assert bpb == pytest.approx(math.log2(V) / 3, rel=1e-6)


def test_only_steps_batches_are_read():
    consumed = []

    def counting():
        for i, batch in enumerate(batches(3, n=10)):
            consumed.append(i)
            yield batch

    evaluate_bpb(UniformModel(), counting(), steps=2, token_bytes=TOKEN_BYTES)
    assert consumed == [0, 1]


def test_zero_steps_is_an_error():
    with pytest.raises(VibechatError, match="at least one step"):
        evaluate_bpb(UniformModel(), batches(0), steps=0, token_bytes=TOKEN_BYTES)


def test_targets_with_no_bytes_are_an_error():
    only_specials = [(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))]
    with pytest.raises(VibechatError, match="stand for no bytes"):
        evaluate_bpb(UniformModel(), only_specials, steps=1, token_bytes=TOKEN_BYTES)


# ----------------------------------------------------------------------------------------------------------
# under torch.distributed every rank gets the figure of all ranks' data together


class HalfRightModel(torch.nn.Module):
    """Loss depends on the target, so ranks with different data have different bpb on their own."""

    def forward(self, x, y, loss_reduction="mean"):
        return (y.float() / V).view(-1)


def distributed_worker(rank: int, world_size: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        bpb = evaluate_bpb(HalfRightModel(), batches(seed=10 + rank), steps=4, token_bytes=TOKEN_BYTES)
        results[rank] = bpb
    finally:
        dist.destroy_process_group()


def test_sums_are_all_reduced_across_ranks(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        # fork: the workers need no fresh interpreter (CPU tensors and gloo only), and start in a blink
        args = (2, str(tmp_path / "init"), results)
        mp.start_processes(distributed_worker, args=args, nprocs=2, start_method="fork")
        results = dict(results)

    def both():
        yield from batches(seed=10)
        yield from batches(seed=11)

    together = evaluate_bpb(HalfRightModel(), both(), steps=8, token_bytes=TOKEN_BYTES)
    alone = evaluate_bpb(HalfRightModel(), batches(seed=10), steps=4, token_bytes=TOKEN_BYTES)
    assert results[0] == pytest.approx(together, rel=1e-6)
    assert results[1] == pytest.approx(together, rel=1e-6)
    assert alone != pytest.approx(together, rel=1e-3)
