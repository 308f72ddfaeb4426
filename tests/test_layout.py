"""The store's layout: what one part writes, another finds again by the same module's keys."""

from vibechat.layout import RUN_FILE, checkpoint_dir, checkpoint_meta, in_run, metrics_key, metrics_phase, run_ids


def test_run_ids_are_the_folders_that_hold_a_run_file():
    keys = [in_run("b", RUN_FILE), in_run("a", RUN_FILE), in_run("c", "metrics/base.jsonl"), "runs/run.json"]
    assert run_ids(keys) == ["a", "b"]


def test_a_checkpoint_meta_key_gives_back_its_stage_tag_and_step():
    assert checkpoint_meta(f"{checkpoint_dir('sft', 'd20')}/meta_000120.json") == ("sft", "d20", 120)


def test_checkpoint_files_other_than_the_meta_are_no_commit_mark():
    assert checkpoint_meta(f"{checkpoint_dir('sft', 'd20')}/model_000120.pt") is None


def test_a_metrics_key_gives_back_its_phase():
    assert metrics_phase(metrics_key("base_eval")) == "base_eval"


def test_a_later_segment_of_a_metrics_file_is_no_phase_of_its_own():
    assert metrics_phase(metrics_key("base") + ".000001") is None
