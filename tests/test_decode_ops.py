"""The decode step's operations against their plain PyTorch: on the CPU the fallbacks, on CUDA the Triton kernels."""

import pytest
import torch
import torch.nn.functional as F

from vibechat import decode_ops
from vibechat.decode_ops import decode_attention, linear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and decode_ops.triton is not None else [])


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def reference_linear(x, weight, norm_input=False, relu2=False, residual=None):
    x = x.double()
    if norm_input:
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + torch.finfo(weight.dtype).eps)
    y = x @ weight.double().T
    if relu2:
        y = F.relu(y).square()
    return y if residual is None else y + residual.double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, k", [(96, 64), (1280, 1280), (3840, 1280), (1280, 5120), (100, 200)])
@pytest.mark.parametrize("fused", ["plain", "norm+relu2", "residual"])
def test_linear_matches_the_float64_product_with_its_fused_parts(device, n, k, fused):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(1, k, device=device, dtype=dtype)
    weight = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    kwargs = {"plain": {}, "norm+relu2": dict(norm_input=True, relu2=True),
              "residual": dict(residual=torch.randn(1, n, device=device, dtype=dtype))}[fused]
    got = linear(x, weight, **kwargs)
    assert got.shape == (1, n) and got.dtype == dtype
    assert relative_error(got, reference_linear(x, weight, **kwargs)) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, heads, kv_heads, cache_len, head_dim",
                         [(1, 10, 10, 512, 128), (16, 10, 10, 512, 128), (3, 4, 2, 300, 128), (2, 1, 1, 300, 192)])
@pytest.mark.parametrize("pos", [0, 63, 64, 200, 299])
def test_decode_attention_sees_exactly_the_written_prefix_of_the_cache(device, batch, heads, kv_heads, cache_len,
                                                                       head_dim, pos):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, cache_len, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, kv_heads, cache_len, head_dim, device=device, dtype=dtype)
    k[:, :, pos + 1:] = 1e4  # unwritten slots must not count
    v[:, :, pos + 1:] = 1e4
    got = decode_attention(q, k, v, torch.tensor([pos], device=device))
    group = heads // kv_heads
    expected = F.scaled_dot_product_attention(q.double(), k[:, :, :pos + 1].double().repeat_interleave(group, 1),
                                              v[:, :, :pos + 1].double().repeat_interleave(group, 1))
    assert got.shape == q.shape
    assert relative_error(got, expected) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_with_a_position_per_row_sees_each_rows_own_prefix(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # on CUDA the batcher's shape at d20 (one split a row or two); the CPU path has no splits: a small cache will do
    batch, heads, cache_len, head_dim = (64, 10, 2048, 128) if device == "cuda" else (8, 2, 256, 128)
    positions = torch.randint(0, cache_len, (batch,), generator=torch.Generator().manual_seed(0))
    positions[:3] = torch.tensor([0, cache_len - 1, 64])
    q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, heads, cache_len, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, heads, cache_len, head_dim, device=device, dtype=dtype)
    got = decode_attention(q, k, v, positions.to(device))
    for row, pos in enumerate(positions.tolist()):
        expected = F.scaled_dot_product_attention(q[row:row + 1].double(), k[row:row + 1, :, :pos + 1].double(),
                                                  v[row:row + 1, :, :pos + 1].double())
        assert relative_error(got[row:row + 1], expected) < (1e-2 if dtype == torch.bfloat16 else 1e-5), row
