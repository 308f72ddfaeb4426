"""The pretraining data loader: batch shape, the token stream, sharding over ranks, exact resumption."""

import json
import os

import pytest
import torch

from vibechat.common import VibechatError
from vibechat.dataloader import tokenizing_distributed_data_loader, tokenizing_distributed_data_loader_with_state
from vibechat.dataset import write_shard
from vibechat.storage import open_store
from vibechat.tokenizer import RustBPETokenizer

NUM_SHARDS, DOCS_PER_SHARD, ROW_GROUP_SIZE = 4, 24, 4  # 6 row groups per shard; shard 3 is val


def document(shard: int, doc: int) -> str:
    return f"Document {shard}.{doc} says: " + " ".join(["the quick brown fox jumps"] * (1 + (shard * 7 + doc) % 5))


def documents_of(shards) -> list[str]:
    return [document(s, d) for s in shards for d in range(DOCS_PER_SHARD)]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("store"))
    store = open_store(root)
    for s in range(NUM_SHARDS):
        write_shard(store, "demo", s, documents_of([s]), row_group_size=ROW_GROUP_SIZE)
    return root


@pytest.fixture(scope="module")
def tokenizer() -> RustBPETokenizer:
    return RustBPETokenizer.train_from_iterator(documents_of(range(NUM_SHARDS)), 300)


@pytest.fixture(autouse=True)
def demo_store(store_root, monkeypatch):
    monkeypatch.setenv("VIBECHAT_STORE", store_root)
    monkeypatch.setenv("VIBECHAT_DATASET", "demo")


def loader(tokenizer, B=2, T=16, split="train", **kwargs):
    return tokenizing_distributed_data_loader_with_state(
        B, T, split, tokenizer_batch_size=3, device="cpu", tokenizer=tokenizer, **kwargs
    )


def stream_until_epoch(batches, epoch: int = 1) -> list[int]:
    """The token stream the batches carry (consecutive batches share one token), until the epoch starts."""
    tokens = []
    for inputs, targets, state in batches:
        tokens += inputs.flatten().tolist()
        last = targets.flatten()[-1].item()
        if state["epoch"] >= epoch:
            return tokens + [last]
    raise AssertionError("unreachable: the loader is infinite")


def split_documents(tokenizer, tokens: list[int]) -> list[str]:
    """The texts between BOS tokens (the first and last may be cut)."""
    bos = tokenizer.get_bos_token_id()
    docs, current = [], []
    for token in tokens:
        if token == bos:
            docs.append(current)
            current = []
        else:
            current.append(token)
    return [tokenizer.decode(d) for d in docs[1:] + [current]]


def test_batches_are_int64_with_targets_shifted_by_one(tokenizer):
    batches = loader(tokenizer, B=3, T=8)
    (x1, y1, _), (x2, y2, _) = next(batches), next(batches)
    for tensor in (x1, y1, x2, y2):
        assert tensor.shape == (3, 8) and tensor.dtype == torch.int64 and tensor.device.type == "cpu"
    assert torch.equal(x1.flatten()[1:], y1.flatten()[:-1])
    assert x2.flatten()[0] == y1.flatten()[-1]  # no token is dropped between batches


def test_the_stream_is_every_train_document_after_a_bos_in_order(tokenizer):
    tokens = stream_until_epoch(loader(tokenizer))
    assert tokens[0] == tokenizer.get_bos_token_id()
    expected = documents_of(range(NUM_SHARDS - 1))
    assert split_documents(tokenizer, tokens)[: len(expected)] == expected


def test_two_ranks_read_disjoint_row_groups_that_cover_the_split(tokenizer):
    train = set(documents_of(range(NUM_SHARDS - 1)))
    seen = []
    for rank in (0, 1):
        tokens = stream_until_epoch(loader(tokenizer, ddp_rank=rank, ddp_world_size=2))
        seen.append({d for d in split_documents(tokenizer, tokens) if d in train})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == train
    # rank 0 has row groups 0, 2, 4 of each shard: documents 0-3, 8-11, 16-19
    assert document(0, 0) in seen[0] and document(0, 4) in seen[1] and document(2, 19) in seen[0]


def test_val_is_the_last_shard_and_loops(tokenizer):
    tokens = stream_until_epoch(loader(tokenizer, split="val"), epoch=2)
    docs = split_documents(tokenizer, tokens)
    val = documents_of([NUM_SHARDS - 1])
    assert docs[: 2 * len(val)] == val + val


@pytest.mark.parametrize("resume_at", [0, 5, 17, 40])
def test_resuming_from_a_state_yields_exactly_the_batches_that_came_next(tokenizer, resume_at):
    original = loader(tokenizer, B=2, T=16, ddp_rank=1, ddp_world_size=2)
    batches = [next(original) for _ in range(50)]  # ~2 epochs of rank 1's share, so resumes cross epochs
    state = json.loads(json.dumps(batches[resume_at][2]))  # as stored in a checkpoint
    resumed = loader(tokenizer, B=2, T=16, resume_state=state, ddp_rank=1, ddp_world_size=2)
    for inputs, targets, expected_state in batches[resume_at + 1 :]:
        x, y, resumed_state = next(resumed)
        assert torch.equal(x, inputs) and torch.equal(y, targets) and resumed_state == expected_state
    assert batches[-1][2]["epoch"] >= 1


def test_the_plain_loader_reads_the_runs_tokenizer(tokenizer, base_dir):
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    inputs, targets = next(tokenizing_distributed_data_loader(2, 8, "train", device="cpu"))
    first, _, _ = next(loader(tokenizer, B=2, T=8))
    assert torch.equal(inputs, first)


def test_a_state_of_another_rank_is_refused(tokenizer):
    _, _, state = next(loader(tokenizer, ddp_rank=0, ddp_world_size=2))
    with pytest.raises(VibechatError, match="state is of rank 0 of 2, not rank 1 of 2"):
        next(loader(tokenizer, resume_state=state, ddp_rank=1, ddp_world_size=2))


def test_a_rank_without_row_groups_is_an_error(tokenizer):
    with pytest.raises(VibechatError, match="rank 30 of 40 gets no row groups"):
        next(loader(tokenizer, split="val", ddp_rank=30, ddp_world_size=40))


def test_an_unknown_split_is_an_error(tokenizer):
    with pytest.raises(VibechatError, match="unknown split 'test'"):
        next(loader(tokenizer, split="test"))


def test_a_dataset_without_shards_is_an_error_saying_what_to_run(tokenizer, monkeypatch):
    monkeypatch.setenv("VIBECHAT_DATASET", "nothing-here")
    with pytest.raises(VibechatError, match="python -m jobs.data --dataset nothing-here"):
        next(loader(tokenizer))


def test_prefetched_yields_the_same_items_in_order():
    from vibechat.dataloader import prefetched

    assert list(prefetched(iter(range(100)), depth=3)) == list(range(100))


def test_prefetched_raises_the_producers_error_where_it_happened():
    from vibechat.dataloader import DataError, prefetched

    def failing():
        yield 1
        yield 2
        raise DataError("shard 3 is corrupt")

    items = prefetched(failing())
    assert [next(items), next(items)] == [1, 2]
    with pytest.raises(DataError, match="shard 3 is corrupt"):
        next(items)
