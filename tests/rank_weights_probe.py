"""jobs.base_train for tests/test_distributed_training.py, where every rank, not only rank 0, also writes its
own weights at each checkpoint to $VIBECHAT_PROBE_DIR/rank<r>_step<s>.pt, so the test can see that the ranks
hold one model.

    torchrun ... -m tests.rank_weights_probe <base_train arguments>
"""

import os

import torch

import jobs.base_train as base_train
import jobs.phase as phase
from vibechat.common import get_dist_info, run_main

save_checkpoint = phase.save_checkpoint


def save_checkpoint_and_own_weights(checkpoint_dir: str, step: int, model_data: dict, optimizer_data: dict | None,
                                    meta_data: dict) -> None:
    rank = get_dist_info()[1]
    torch.save(model_data, os.path.join(os.environ["VIBECHAT_PROBE_DIR"], f"rank{rank}_step{step:06d}.pt"))
    save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data)


if __name__ == "__main__":
    phase.save_checkpoint = save_checkpoint_and_own_weights
    run_main(base_train.main)
