"""The training phases' shared parts: padded conversation batches, the task mixture spec."""

import pytest

from jobs.training import collate, task_mixture
from vibechat.common import VibechatError


def test_collate_pads_and_keeps_targets_only_where_the_assistant_writes():
    rows = [([1, 2, 3, 4, 5], [0, 0, 1, 1, 0]), ([6, 7, 8], [0, 1, 1])]
    inputs, targets = collate(rows, pad_id=9)
    assert inputs.tolist() == [[1, 2, 3, 4], [6, 7, 9, 9]]
    # target i is token i+1, kept where mask[i+1] is 1
    assert targets.tolist() == [[-1, 3, 4, -1], [7, 8, -1, -1]]


def test_test_mixture_leaves_out_tasks_without_a_test_split():
    train = task_mixture("conversations-standin:5,identity:3", "train")
    test = task_mixture("conversations-standin:5,identity:3", "test")
    assert len(train) == 8
    assert len(test) == 5


def test_a_test_mixture_of_tasks_without_a_test_split_is_none():
    assert task_mixture("identity", "test") is None


def test_a_malformed_task_count_is_an_error_naming_the_task():
    with pytest.raises(VibechatError, match="'gsm8k:lots'.*positive number"):
        task_mixture("gsm8k:lots", "train")
