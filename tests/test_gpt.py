"""The model: shapes, losses, the depth presets, FLOPs."""

import pytest
import torch

from vibechat.common import VibechatError
from tests.model_fixtures import tiny_model
from vibechat.gpt import config_for_depth, softcap_cross_entropy


def test_forward_without_targets_returns_logits_per_position():
    model = tiny_model()
    idx = torch.randint(0, 64, (3, 10))
    assert model(idx).shape == (3, 10, 64)


def test_forward_with_targets_returns_a_scalar_loss_near_log_vocab_at_init():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 16))
    loss = model(idx, idx)
    assert loss.shape == ()
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.1  # lm_head starts near zero


def test_loss_reduction_none_gives_one_loss_per_token_and_ignores_minus_one():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 8))
    targets = idx.clone()
    targets[0, :4] = -1
    losses = model(idx, targets, loss_reduction="none")
    assert losses.shape == (16,)
    assert (losses.view(2, 8)[0, :4] == 0).all()


def test_backward_reaches_every_parameter():
    model = tiny_model()
    # zero-initialized projections get no gradient into earlier layers at step 0; perturb them first
    for p in model.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    idx = torch.randint(0, 64, (2, 8))
    model(idx, idx).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_loss_falls_when_overfitting_one_batch():
    model = tiny_model()
    optimizers = model.setup_optimizers()
    idx = torch.randint(0, 64, (4, 16))
    first = None
    for _ in range(30):
        loss = model(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert loss.item() < 0.5 * first


def test_logits_are_soft_capped_at_15():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
    logits = model(torch.randint(0, 64, (1, 8)))
    assert logits.abs().max() <= 15.0
    assert logits.dtype == torch.float32


def test_depth_preset_sizes_width_and_heads():
    config = config_for_depth(20, vocab_size=65536, sequence_len=2048)
    assert (config.n_embd, config.n_head, config.n_kv_head, config.n_layer) == (1280, 10, 10, 20)


def test_unknown_depth_is_a_clear_error():
    with pytest.raises(VibechatError, match="depth"):
        config_for_depth(0, vocab_size=100, sequence_len=16)


def test_estimate_flops_counts_six_per_non_embedding_weight_plus_attention():
    model = tiny_model()
    c = model.config
    non_embedding = model.num_params() - c.vocab_size * c.n_embd
    assert model.estimate_flops() == 6 * non_embedding + 12 * c.n_layer * c.n_embd * c.sequence_len


def test_naive_generate_is_deterministic_for_a_seed():
    model = tiny_model()
    a = list(model.generate([1, 2, 3], max_tokens=5, temperature=1.0, seed=7))
    b = list(model.generate([1, 2, 3], max_tokens=5, temperature=1.0, seed=7))
    assert a == b and len(a) == 5


def test_get_device_reports_where_the_weights_are():
    assert tiny_model().get_device() == torch.device("cpu")



def test_an_unknown_loss_reduction_is_one_clear_error():
    with pytest.raises(ValueError, match="'mean', 'sum' or 'none'"):
        softcap_cross_entropy(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), reduction="avg")
