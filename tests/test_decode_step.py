"""The engine's fused decode step is a second writing of GPT.forward, kept separate for speed: this test holds the
two to the same logits for the layer shapes of every preset, so an architecture change made to one only fails here.
"""

import pytest
import torch
import torch.nn as nn

from jobs.config import load_config, preset_names
from vibechat.engine import KVCache, _DecodeWeights, _fused_step, _StepCache
from vibechat.gpt import GPT, config_for_depth

VOCAB = 512  # the vocabulary only sizes the embedding and lm_head; a small one keeps the big presets cheap
PROMPT, STEPS = 8, 8


def preset_configs() -> list:
    """Each preset's model config, with two layers (every layer has one shape), as is and with grouped-query
    attention (the largest head count that divides the query heads)."""
    params = []
    for preset in preset_names():
        args = load_config(preset)["phases"]["base"]["args"]
        config = config_for_depth(args["depth"], VOCAB, args["max_seq_len"])
        config.n_layer = 2
        params.append(pytest.param(config, id=f"{preset}-d{args['depth']}"))
        if config.n_head > 1:
            n_kv_head = max(d for d in range(1, config.n_head) if config.n_head % d == 0)
            gqa = config_for_depth(args["depth"], VOCAB, args["max_seq_len"])
            gqa.n_layer, gqa.n_kv_head = 2, n_kv_head
            params.append(pytest.param(gqa, id=f"{preset}-d{args['depth']}-gqa{n_kv_head}"))
    return params


def random_model(config) -> GPT:
    """Every weight random: at init the blocks are the identity, which would hide a mistake in them."""
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.weight.size(1) ** -0.5)
    return model.eval()


@pytest.mark.parametrize("config", preset_configs())
@torch.inference_mode()
def test_fused_decode_step_and_gpt_forward_give_the_same_logits_for_every_preset_config(config):
    model = random_model(config)
    ids = torch.randint(0, VOCAB, (2, PROMPT + STEPS))
    full = model(ids)
    head_dim = config.n_embd // config.n_head
    cache = KVCache(2, config.n_kv_head, PROMPT + STEPS, head_dim, config.n_layer)
    model(ids[:, :PROMPT], kv_cache=cache)
    step_cache = _StepCache(cache, torch.tensor([PROMPT]))
    weights = _DecodeWeights(model, torch.float32)
    logits = [_fused_step(config, weights, ids[:, t:t + 1], step_cache) for t in range(PROMPT, PROMPT + STEPS)]
    torch.testing.assert_close(torch.stack(logits, dim=1), full[:, PROMPT:], atol=1e-4, rtol=1e-4)
