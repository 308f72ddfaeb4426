"""The training step's Triton kernels (vibechat.train_ops) against the PyTorch they replace in vibechat.gpt: values
and gradients. They run only on CUDA: elsewhere vibechat.gpt takes that PyTorch itself."""

import pytest
import torch
import torch.nn.functional as F

from vibechat import gpt, train_ops
from vibechat.gpt import SOFTCAP, GPT, GPTConfig, apply_rotary_emb, norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or train_ops.triton is None,
                                reason="the Triton kernels need CUDA")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_rotary_norm_matches_norm_of_apply_rotary_emb_with_its_gradient(dtype, autocast):
    B, T, H, D = 3, 50, 4, 128
    # as the attention makes q: BTHD memory; small enough that the norm's eps (bf16's or fp32's) matters
    x = 0.05 * torch.randn(B, T, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    cos, sin = GPT._rotary_tables(None, T, D, device="cuda")
    dy = torch.randn(B, H, T, D, device="cuda", dtype=dtype)
    ref_x, fused_x = x.detach().requires_grad_(True), x.detach().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        expected = norm(apply_rotary_emb(ref_x, cos, sin))
        got = gpt.rotary_norm(fused_x, cos, sin)
    expected.backward(dy)
    got.backward(dy)
    assert got.dtype == dtype and got.stride() == x.stride() and fused_x.grad.stride() == x.stride()
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert relative_error(got, expected) < tolerance
    assert relative_error(fused_x.grad, ref_x.grad) < tolerance


def test_rotary_norm_refuses_a_slice_of_a_larger_tensor_whose_layout_its_result_cannot_share():
    qk = torch.randn(2, 50, 8, 128, device="cuda")
    cos, sin = GPT._rotary_tables(None, 50, 128, device="cuda")
    with pytest.raises(ValueError, match="not a dense layout"):
        gpt.rotary_norm(qk[:, :, :4].transpose(1, 2), cos, sin)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_cross_entropy_matches_fp32_cross_entropy_of_capped_logits(reduction, dtype):
    N, V = 300, 5000
    logits = (30 * torch.randn(N, V, device="cuda")).to(dtype)  # many beyond the cap
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::7] = -1
    ref_logits = logits.detach().requires_grad_(True)
    expected = F.cross_entropy(SOFTCAP * torch.tanh(ref_logits.float() / SOFTCAP), targets, ignore_index=-1,
                               reduction=reduction)
    fused_logits = logits.detach().requires_grad_(True)
    got = gpt.softcap_cross_entropy(fused_logits, targets, reduction)
    weights = torch.rand_like(expected)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert relative_error(got, expected) < 1e-5
    assert relative_error(fused_logits.grad, ref_logits.grad) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert (fused_logits.grad[::7] == 0).all()


def test_compiled_gpt_loss_and_gradients_match_the_pytorch_path(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=256)).cuda()
    model.init_weights()
    for p in model.parameters():  # no zero output projections, so that every path carries a gradient
        p.data += 0.02 * torch.randn_like(p)
    idx = torch.randint(0, 512, (4, 64), device="cuda")
    targets = torch.randint(0, 512, (4, 64), device="cuda")

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.compile(model, dynamic=False)(idx, targets)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads()
    torch._dynamo.reset()
    monkeypatch.setattr(train_ops, "triton", None)
    expected_loss, expected_grads = loss_and_grads()
    assert abs(loss - expected_loss) < 1e-3 * expected_loss
    for got, expected in zip(grads, expected_grads):
        assert relative_error(got, expected) < 3e-2


def test_softcap_cross_entropy_of_transposed_logits_has_the_gradient_of_contiguous_ones():
    logits = 30 * torch.randn(5000, 300, device="cuda")
    targets = torch.randint(0, 5000, (300,), device="cuda")
    grads = []
    for x in (logits.t().contiguous(), logits.t()):  # the same (300, 5000) values, row-major then column-major
        x = x.detach().requires_grad_(True)
        gpt.softcap_cross_entropy(x, targets, "sum").backward()
        grads.append(x.grad)
    assert relative_error(grads[1], grads[0]) < 1e-6
