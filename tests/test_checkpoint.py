"""Checkpoints through the store: round trips, the meta commit mark, clear errors on bad files."""

import json
import os

import pytest
import torch

from tests.model_fixtures import tiny_model
from vibechat.checkpoint_manager import (build_model, find_largest_model, find_last_step, load_checkpoint,
                                         prune_checkpoints, save_checkpoint)
from vibechat.common import VibechatError
from vibechat.storage import open_store


def _save(checkpoint_dir, step, model, optimizers):
    meta = {"step": step, "model_config": model.config.__dict__}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), {"optimizers": [o.state_dict() for o in optimizers]}, meta)


def _trained():
    model = tiny_model()
    optimizers = model.setup_optimizers()
    idx = torch.randint(0, 64, (2, 9))
    model(idx[:, :-1], idx[:, 1:]).backward()
    for opt in optimizers:
        opt.step()
    return model, optimizers


@pytest.fixture(params=["file", "s3"])
def checkpoint_dir(request, tmp_path):
    if request.param == "file":
        return "file://" + str(tmp_path / "ckpt" / "d2")
    return request.getfixturevalue("s3_url") + "/checkpoints/base/d2"


def test_round_trip_restores_weights_optimizer_and_meta(checkpoint_dir):
    model, optimizers = _trained()
    _save(checkpoint_dir, 5, model, optimizers)
    model_data, optim_data, meta = load_checkpoint(checkpoint_dir, 5, "cpu", load_optimizer=True)
    restored = build_model(model_data, meta, "cpu", "eval")
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value)
    fresh = tiny_model(seed=1).setup_optimizers()
    for opt, state in zip(fresh, optim_data["optimizers"]):
        opt.load_state_dict(state)
    assert meta["step"] == 5


def test_find_last_step_picks_the_newest_committed_step(checkpoint_dir):
    model, optimizers = _trained()
    for step in (1, 10, 3):
        _save(checkpoint_dir, step, model, optimizers)
    assert find_last_step(checkpoint_dir) == 10


def test_checkpoint_without_meta_file_is_invisible(checkpoint_dir):
    model, optimizers = _trained()
    _save(checkpoint_dir, 1, model, optimizers)
    store = open_store(checkpoint_dir)
    # a save killed before its commit mark: weights and optimizer written, meta not
    store.put_bytes("model_000002.pt", b"half a file")
    store.put_bytes("optim_000002_rank0.pt", b"half")
    assert find_last_step(checkpoint_dir) == 1


def test_no_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        find_last_step(str(tmp_path / "empty"))


def test_truncated_model_file_error_names_the_file(tmp_path):
    model, optimizers = _trained()
    _save(str(tmp_path), 1, model, optimizers)
    path = tmp_path / "model_000001.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(VibechatError, match="model_000001.pt is truncated or corrupt"):
        load_checkpoint(str(tmp_path), 1, "cpu")


def test_corrupt_meta_file_error_names_the_file(tmp_path):
    model, optimizers = _trained()
    _save(str(tmp_path), 1, model, optimizers)
    (tmp_path / "meta_000001.json").write_text("{not json")
    with pytest.raises(VibechatError, match="meta_000001.json is corrupt"):
        load_checkpoint(str(tmp_path), 1, "cpu")


@pytest.mark.parametrize("name", ["model_000001.pt", "optim_000001_rank0.pt"])
def test_a_flipped_byte_in_a_committed_checkpoint_is_an_error_naming_the_file(checkpoint_dir, name):
    model, optimizers = _trained()
    _save(checkpoint_dir, 1, model, optimizers)
    store = open_store(checkpoint_dir)
    data = bytearray(store.get_bytes(name))
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: torch.load alone would not notice
    store.put_bytes(name, bytes(data))
    with pytest.raises(VibechatError, match=f"{name} is truncated or corrupt: its SHA-256 differs from the one recorded in meta_000001.json"):
        load_checkpoint(checkpoint_dir, 1, "cpu", load_optimizer=True)


@pytest.mark.parametrize("content, problem", [
    (b"\xff\xfe{}", "is corrupt"),
    (b"{}", "has step None"),
    (b"[1, 2]", "holds a JSON list"),
    (b'{"step": 1}', "has model_config None"),
    (b'{"step": 1, "model_config": {"n_layer": "2"}}', "has model_config"),
    (b'{"step": 1, "model_config": {"n_layer": 0}}', "has model_config"),
    (b'{"step": "1", "model_config": {}}', "has step '1'"),
    (b'{"step": 1, "model_config": {}, "files": [1]}', "has files"),
])
def test_a_meta_file_of_any_broken_shape_is_one_error_naming_it(tmp_path, content, problem):
    model, optimizers = _trained()
    _save(str(tmp_path), 1, model, optimizers)
    (tmp_path / "meta_000001.json").write_bytes(content)
    with pytest.raises(VibechatError, match=f"meta_000001.json {problem}"):
        load_checkpoint(str(tmp_path), 1, "cpu")


def test_pruning_keeps_the_newest_committed_steps_and_removes_older_leftovers(tmp_path):
    model, optimizers = _trained()
    for step in (1, 2, 3):
        _save(str(tmp_path), step, model, optimizers)
    (tmp_path / "model_000000.pt").write_bytes(b"a save killed before its meta")
    (tmp_path / "model_000004.pt").write_bytes(b"a save in progress")
    assert prune_checkpoints(str(tmp_path), keep_last=2) == [1]
    assert sorted(os.listdir(tmp_path)) == ["meta_000002.json", "meta_000003.json", "model_000002.pt",
                                            "model_000003.pt", "model_000004.pt", "optim_000002_rank0.pt",
                                            "optim_000003_rank0.pt"]
    assert prune_checkpoints(str(tmp_path), keep_last=0) == []


def test_checkpoint_from_another_architecture_is_a_clear_error(tmp_path):
    model, optimizers = _trained()
    _save(str(tmp_path), 1, model, optimizers)
    meta = json.loads((tmp_path / "meta_000001.json").read_text())
    model_data, _, _ = load_checkpoint(str(tmp_path), 1, "cpu")
    meta["model_config"]["n_layer"] = 3
    with pytest.raises(VibechatError, match="another architecture"):
        build_model(model_data, meta, "cpu", "eval")


def test_find_largest_model_prefers_the_deepest_tag(tmp_path):
    for tag in ("d4", "d12", "d8"):
        open_store(str(tmp_path)).put_text(f"{tag}/meta_000001.json", "{}")
    assert find_largest_model(str(tmp_path)) == "d12"
