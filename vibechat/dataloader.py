"""The pretraining data loader: streams documents out of the store's parquet shards, tokenizes them on the
fly (BOS before each), packs the tokens into (B, T) batches, and can resume exactly where it left off.

Ranks share the work by row group: rank r of W reads row groups r, r + W, r + 2W, ... of every shard.
The train split loops over its shards forever (epochs); so does val.
"""

import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from vibechat.common import autodetect_device_type, get_dist_info
from vibechat.dataset import DataError, data_store, dataset_name, open_shard, split_shards
from vibechat.storage import Store
from vibechat.tokenizer import get_tokenizer


@dataclass(frozen=True)
class Cursor:
    """Where a document sits in one rank's stream: pass `epoch` over the split, shard, row group, document."""

    epoch: int = 0
    shard: int = 0
    row_group: int = 0
    doc: int = 0


def documents(
    store: Store, shards: list[str], rank: int, world_size: int, start: Cursor, batch_size: int
) -> Iterator[tuple[Cursor, list[str]]]:
    """(cursor of the first, texts) for up to batch_size documents at a time, from `start` on, forever."""
    epoch = start.epoch
    while True:
        seen_any = False
        for s in range(len(shards)):
            if (epoch, s) < (start.epoch, start.shard):
                continue
            shard = open_shard(store, shards[s])
            for row_group in range(rank, shard.num_row_groups, world_size):
                seen_any = True
                if (epoch, s, row_group) < (start.epoch, start.shard, start.row_group):
                    continue
                texts = shard.texts(row_group)
                first = start.doc if (epoch, s, row_group) == (start.epoch, start.shard, start.row_group) else 0
                for d in range(first, len(texts), batch_size):
                    yield Cursor(epoch, s, row_group, d), texts[d : d + batch_size]
        if not seen_any:
            raise DataError(
                f"rank {rank} of {world_size} gets no row groups of {len(shards)} shard(s) starting {shards[0]}: "
                "use fewer ranks, or shards with more row groups"
            )
        epoch += 1


def tokenizing_distributed_data_loader_with_state(
    B: int,
    T: int,
    split: str,
    tokenizer_threads: int = 4,
    tokenizer_batch_size: int = 128,
    device: str | torch.device | None = None,
    dataset: str | None = None,
    resume_state: dict | None = None,
    ddp_rank: int | None = None,
    ddp_world_size: int | None = None,
    tokenizer=None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Yields (inputs, targets, state): (B, T) int64 on the device, targets are inputs shifted by one token.

    state (a small JSON-able dict) says where this rank's stream stands after the batch; a new loader given it
    as resume_state yields exactly the batches this one would have yielded next. It is per rank: a checkpoint keeps
    each rank's in that rank's own optimizer file, and each rank gets its own back.
    Rank and world size default to torchrun's; the tokenizer defaults to the run's (get_tokenizer()).
    """
    if split not in ("train", "val"):
        raise DataError(f"unknown split {split!r}: use 'train' or 'val'")
    if B < 1 or T < 1:
        raise DataError(f"batch shape B={B}, T={T}: both must be at least 1")
    _, env_rank, _, env_world_size = get_dist_info()
    rank = env_rank if ddp_rank is None else ddp_rank
    world_size = env_world_size if ddp_world_size is None else ddp_world_size
    device = torch.device(device or autodetect_device_type())
    tokenizer = tokenizer or get_tokenizer()
    bos = tokenizer.get_bos_token_id()
    store = data_store()
    shards = split_shards(store, dataset_name(dataset), split)

    start, skip = Cursor(), 0
    if resume_state is not None:
        if (resume_state.get("rank"), resume_state.get("world_size")) != (rank, world_size):
            raise DataError(
                f"the data loader state is of rank {resume_state.get('rank')} of {resume_state.get('world_size')}, "
                f"not rank {rank} of {world_size}: give each rank its own state, and resume with the same world size"
            )
        start = Cursor(*(int(resume_state[k]) for k in ("epoch", "shard", "row_group", "doc")))
        skip = int(resume_state["skip"])

    stream = documents(store, shards, rank, world_size, start, tokenizer_batch_size)
    buffer: list[int] = []  # tokens not yet yielded
    pending = deque()  # (cursor, token count) of each document with tokens in buffer, oldest first
    consumed = skip  # tokens of pending[0] already yielded (or skipped on resume)
    needed = B * T + 1  # the last token is only a target, and comes back as the next batch's first input
    while True:
        while len(buffer) < needed:
            cursor, texts = next(stream)
            for i, ids in enumerate(tokenizer.encode(texts, prepend=bos, num_threads=tokenizer_threads)):
                pending.append((Cursor(cursor.epoch, cursor.shard, cursor.row_group, cursor.doc + i), len(ids)))
                buffer.extend(ids)
            if skip:  # resuming: drop what the interrupted loader had already yielded of its first document
                del buffer[:skip]
                skip = 0
        chunk = torch.tensor(buffer[:needed], dtype=torch.long, pin_memory=device.type == "cuda")
        del buffer[: B * T]
        consumed += B * T
        while consumed >= pending[0][1]:
            consumed -= pending.popleft()[1]
        state = {**asdict(pending[0][0]), "skip": consumed, "rank": rank, "world_size": world_size}
        inputs = chunk[:-1].view(B, T).to(device, non_blocking=True)
        targets = chunk[1:].view(B, T).to(device, non_blocking=True)
        yield inputs, targets, state


def tokenizing_distributed_data_loader(
    B: int, T: int, split: str, tokenizer_threads: int = 4, tokenizer_batch_size: int = 128, **kwargs
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (inputs, targets) of shape (B, T); see tokenizing_distributed_data_loader_with_state."""
    for inputs, targets, _ in tokenizing_distributed_data_loader_with_state(
        B, T, split, tokenizer_threads, tokenizer_batch_size, **kwargs
    ):
        yield inputs, targets


def prefetched(batches: Iterator, depth: int = 2) -> Iterator:
    """The items of `batches`, produced by a background thread up to `depth` ahead: the next batch is tokenized
    and copied while the device runs the current step, instead of after the step's host sync. Order, and so
    any state an item carries, is unchanged; an error in the producer is raised at the item it would have been."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in batches:
                items.put((item, None))
        except BaseException as error:  # handed to the consumer, raised there
            items.put((done, error))
            return
        items.put((done, None))

    threading.Thread(target=produce, daemon=True, name="vibechat-prefetch").start()
    while True:
        item, error = items.get()
        if error is not None:
            raise error
        if item is done:
            return
        yield item
