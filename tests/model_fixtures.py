"""Small GPTs for tests: as initialized, with every weight random, or saved as a run's chat checkpoint."""

from dataclasses import asdict
from pathlib import Path

import torch

from vibechat.checkpoint_manager import save_checkpoint
from vibechat.gpt import GPT, GPTConfig
from vibechat.tokenizer import RustBPETokenizer

CHAT_TEXTS = ["hello there, how are you today?", "the sky is blue because air scatters blue light",
              "two plus three is five", "a quick brown fox jumps over the lazy dog"] * 20


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(**{**dict(sequence_len=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32),
                          **overrides})
    model = GPT(config)
    model.init_weights()
    return model


def random_model():
    """A tiny model with every weight random (a fresh one has a zero lm_head: the same loss for every token)."""
    model = tiny_model(seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def write_chat_checkpoint(base: Path, sequence_len: int) -> tuple[GPT, RustBPETokenizer]:
    """A trained 300-token tokenizer and an sft checkpoint (step 0, tag d2) of a tiny random GPT under base dir
    `base`, as jobs.chat_cli and jobs.chat_server load them."""
    tokenizer = RustBPETokenizer.train_from_iterator(iter(CHAT_TEXTS), vocab_size=300)
    tokenizer.save(str(base / "tokenizer"))
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(config)
    model.init_weights()
    for p in model.parameters():  # past init, where every block is the identity
        p.data.normal_(std=0.3)
    save_checkpoint(str(base / "checkpoints" / "sft" / "d2"), 0, model.state_dict(), None,
                    {"step": 0, "model_config": asdict(config)})
    return model, tokenizer
