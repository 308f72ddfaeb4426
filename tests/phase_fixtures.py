"""What tests of the phase programs build on: a small store (a few parquet shards and a trained tokenizer, built
in seconds), a run folder with a fresh checkpoint, running a phase, and checking that a resumed phase continues
exactly."""

import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from tasks.standins import StandinConversations
from vibechat.checkpoint_manager import save_checkpoint
from vibechat.dataset import write_shard
from vibechat.gpt import GPT, config_for_depth
from vibechat.metrics import read_metrics
from vibechat.storage import open_store
from vibechat.tokenizer import RustBPETokenizer, save_token_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 300  # make_run's tokenizer


def sample_texts(n: int, seed: int) -> list[str]:
    words = "the model reads text and learns to predict the next token of every document it sees".split()
    return [" ".join(words[(seed + i * 7 + j) % len(words)] for j in range(40 + i % 30)) + f" {i}." for i in range(n)]


def make_store(root: str, run_id: str = "r1", vocab_size: int = 300) -> dict:
    """Shards under data/tiny-test/, the run's tokenizer; returns the env a phase program needs."""
    store = open_store(root)
    for index in range(3):  # the last shard is the val split
        write_shard(store, "tiny-test", index, sample_texts(60, seed=index), row_group_size=16)
    tokenizer = RustBPETokenizer.train_from_iterator(iter(sample_texts(200, seed=9)), vocab_size)
    tokenizer_dir = f"{root}/runs/{run_id}/tokenizer"
    tokenizer.save(tokenizer_dir)
    save_token_bytes(tokenizer, tokenizer_dir)
    return {"VIBECHAT_STORE": root, "VIBECHAT_RUN": run_id, "VIBECHAT_DATASET": "tiny-test"}


def phase_env(env: dict) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("VIBECHAT_")}
    return {**full, **env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "VIBECHAT_DEVICE": "cpu"}


def run_phase(module: str, args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=phase_env(env), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def make_run(base_dir: str, phase: str = "base", depth: int = 1, seq_len: int = 64) -> RustBPETokenizer:
    """A run folder holding a small tokenizer and a freshly initialized checkpoint of `phase` (tag d<depth>)."""
    texts = [m["content"] for i in range(300) for m in StandinConversations(size=300)[i]["messages"]]
    tokenizer = RustBPETokenizer.train_from_iterator(texts, VOCAB_SIZE)
    tokenizer.save(f"{base_dir}/tokenizer")
    save_token_bytes(tokenizer, f"{base_dir}/tokenizer")
    torch.manual_seed(0)
    config = config_for_depth(depth, VOCAB_SIZE, seq_len)
    model = GPT(config)
    model.init_weights()
    save_checkpoint(f"{base_dir}/checkpoints/{phase}/d{depth}", 1, model.state_dict(), None,
                    {"step": 1, "model_config": config.__dict__})
    return tokenizer


def load_torch(store, key: str):
    return torch.load(io.BytesIO(store.get_bytes(key)), weights_only=False)


def assert_resume_continues_exactly(base_dir: str, phase: str, run, argv: list[str], last: int, kept: int,
                                    capfd) -> None:
    """Run a phase (run(rank, argv), a module-level function) to step `last`, then undo every checkpoint after
    `kept` (as if killed before committing them), resume in a fresh process, and check that it reaches the same
    weights, optimizer state and data position at `last`, and a metrics file with that step's loss once."""
    def losses_at_last() -> list[float]:
        records, _ = read_metrics(open_store(base_dir), f"metrics/{phase}.jsonl")
        return [r["loss"] for r in records if r["step"] == last and "loss" in r]

    run(0, argv)
    [straight_loss] = losses_at_last()
    store = open_store(f"{base_dir}/checkpoints/{phase}/d1")
    model_key, optim_key = f"model_{last:06d}.pt", f"optim_{last:06d}_rank0.pt"
    straight_model, straight_optim = load_torch(store, model_key), load_torch(store, optim_key)
    for step in range(kept + 1, last + 1):
        if store.exists(f"meta_{step:06d}.json"):
            store.delete(f"meta_{step:06d}.json")
    capfd.readouterr()
    mp.spawn(run, args=(argv,), nprocs=1, join=True)
    assert f"resuming from step {kept} " in capfd.readouterr().out
    resumed_model, resumed_optim = load_torch(store, model_key), load_torch(store, optim_key)
    for name, value in straight_model.items():
        torch.testing.assert_close(resumed_model[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for straight, resumed in zip(straight_optim["optimizers"], resumed_optim["optimizers"]):
        for key, state in straight["state"].items():
            for name, value in state.items():
                torch.testing.assert_close(resumed["state"][key][name], value, rtol=1e-5, atol=1e-6)
    assert straight_optim["loader_state"] == resumed_optim["loader_state"]
    [resumed_loss] = losses_at_last()
    assert resumed_loss == pytest.approx(straight_loss, rel=1e-5)


def save_tiny_model(root: str, phase: str, seq_len: int = 64) -> None:
    """A depth-1 GPT with a random lm_head (a fresh one gives every token the same logit), as <phase>/d1 step 3."""
    torch.manual_seed(0)
    model = GPT(config_for_depth(1, 300, seq_len))  # make_store's tokenizer has 300 tokens
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    save_checkpoint(f"{root}/runs/r1/checkpoints/{phase}/d1", 3, model.state_dict(), None,
                    {"step": 3, "model_config": model.config.__dict__})


def records(root: str, stage: str) -> list[dict]:
    lines = open(f"{root}/runs/r1/metrics/{stage}_eval.jsonl").read().splitlines()
    return [json.loads(line) for line in lines]
