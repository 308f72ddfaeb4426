"""A small store for phase programs: a few parquet shards and a trained tokenizer, built in seconds."""

import os
import subprocess
import sys

from vibechat.dataset import write_shard
from vibechat.storage import open_store
from vibechat.tokenizer import RustBPETokenizer, save_token_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
