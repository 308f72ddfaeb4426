"""A stand-in phase for tests/test_operator_env.py: joins the process group the way the phases do, checks
it works with one all-reduce, and records in the store who it was told it is.

    torchrun ... -m tests.operator_probe
"""

import json
import os

import torch
import torch.distributed as dist

from vibechat.common import compute_cleanup, compute_init, get_base_dir, run_main
from vibechat.storage import open_store


def main() -> None:
    ddp, rank, local_rank, world_size, _ = compute_init("cpu")
    rank_sum = torch.tensor([rank])
    if ddp:
        dist.all_reduce(rank_sum)
    record = {
        "rank": rank, "local_rank": local_rank, "world_size": world_size,
        "node_rank": int(os.environ["GROUP_RANK"]),  # torchrun's name for the node's rank
        "rank_sum": int(rank_sum.item()),
    }
    open_store(get_base_dir()).put_text(f"probe/rank_{rank}.json", json.dumps(record))
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
