"""Small GPTs for tests: as initialized, or with every weight random."""

import torch

from vibechat.gpt import GPT, GPTConfig


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
