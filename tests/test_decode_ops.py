"""The decode step's operations against float64 references: on the CPU the PyTorch fallbacks (or, under
TRITON_INTERPRET=1, the Triton kernels on CPU tensors), on CUDA the Triton kernels."""

import pytest
import torch
import torch.nn.functional as F

from vibechat import decode_ops
from vibechat.decode_ops import AttentionParts, attend, attention_output, combine, linear, topk

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and decode_ops.triton is not None else [])
EPS = torch.finfo(torch.float32).eps  # F.rms_norm's, for bf16 too


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def tolerance(dtype: torch.dtype) -> float:
    return 1e-2 if dtype == torch.bfloat16 else 1e-5


def reference_linear(x, weight, norm_input=False, relu2=False, residual=None, softcap=None):
    x = x.double()
    if norm_input:
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS)
    y = x @ weight.double().T
    if relu2:
        y = F.relu(y).square()
    if residual is not None:
        y = y + residual.double()
    return y if softcap is None else softcap * torch.tanh(y / softcap)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, k", [(96, 64), (1280, 1280), (3840, 1280), (1280, 5120), (100, 200), (65536, 1280)])
@pytest.mark.parametrize("fused", ["plain", "norm+relu2", "residual", "norm+softcap"])
def test_linear_matches_the_float64_product_with_its_fused_parts(device, n, k, fused):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(1, k, device=device, dtype=dtype)
    weight = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    kwargs = {"plain": {}, "norm+relu2": dict(norm_input=True, relu2=True),
              "residual": dict(residual=torch.randn(1, n, device=device, dtype=dtype)),
              "norm+softcap": dict(norm_input=True, softcap=2.0)}[fused]
    got = linear(x, weight, **kwargs)
    assert got.shape == (1, n) and got.dtype == (torch.float32 if "softcap" in kwargs else dtype)
    assert relative_error(got, reference_linear(x, weight, **kwargs)) < tolerance(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_n, block_k, warps", [(1, 64, 1), (2, 128, 2), (8, 256, 4), (16, 512, 4)])
def test_linear_gives_the_product_at_every_tiling_of_the_weight(device, block_n, block_k, warps, monkeypatch):
    """Rows a program and columns a load that divide the weight's sides or not, the input plain or combined
    from attention parts: the kernel's configs are chosen by a sweep on the card, so each must be right."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(1, 200, device=device, dtype=dtype)
    if not decode_ops._kernels(x):
        pytest.skip("the tilings are the Triton kernel's: here the PyTorch version runs")
    monkeypatch.setattr(decode_ops, "_gemv_config", lambda n, k, splits: (block_n, block_k, warps))
    weight = (torch.randn(100, 200, device=device) / 200 ** 0.5).to(dtype)
    residual = torch.randn(1, 100, device=device, dtype=dtype)
    got = linear(x, weight, norm_input=True, residual=residual)
    assert relative_error(got, reference_linear(x, weight, norm_input=True, residual=residual)) < tolerance(dtype)
    parts = AttentionParts(torch.randn(1, 2, 3, device=device), torch.rand(1, 2, 3, device=device) + 0.5,
                           torch.randn(1, 2, 3, 100, device=device))  # 2 heads of 100, 3 splits: 200 inputs
    got = attention_output(parts, weight, residual)
    expected = residual.double() + combine(parts).to(dtype).double() @ weight.double().T
    assert relative_error(got, expected) < tolerance(dtype)


def rotated_and_normed(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(..., D) heads in float64, rotated by (..., D/2) angles' cos and sin, then RMS-normed."""
    x1, x2 = x.double().chunk(2, dim=-1)
    x = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, heads, kv_heads, cache_len, head_dim",
                         [(1, 10, 10, 512, 128), (16, 10, 10, 512, 128), (3, 4, 2, 300, 128), (2, 1, 1, 300, 192)])
@pytest.mark.parametrize("pos", [[0], [63], [64], [200], [299], "per row"])
def test_attend_writes_the_new_key_and_value_at_pos_and_sees_exactly_the_cache_up_to_it(device, batch, heads,
                                                                                       kv_heads, cache_len,
                                                                                       head_dim, pos):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pos = torch.arange(batch) * 37 % cache_len if pos == "per row" else torch.tensor(pos)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    angles = torch.rand(cache_len, head_dim // 2, device=device) * 6.3
    k_cache = torch.randn(batch, kv_heads, cache_len, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn(batch, kv_heads, cache_len, head_dim, device=device, dtype=dtype)
    for row in range(batch):  # unwritten slots must not count
        p = pos[row if pos.numel() > 1 else 0]
        k_cache[row, :, p + 1:] = 1e4
        v_cache[row, :, p + 1:] = 1e4
    before_k, before_v = k_cache.clone(), v_cache.clone()

    got = combine(attend(qkv, angles.cos(), angles.sin(), k_cache, v_cache, pos.to(device), heads))

    q, k, v = qkv.view(batch, -1, head_dim).split([heads, kv_heads, kv_heads], dim=1)
    group = heads // kv_heads
    for row in range(batch):
        p = pos[row if pos.numel() > 1 else 0].item()
        c, s = angles[p].cos().double(), angles[p].sin().double()
        new_k = rotated_and_normed(k[row], c, s)
        keys = torch.cat([before_k[row, :, :p].double(), new_k[:, None]], dim=1).repeat_interleave(group, 0)
        values = torch.cat([before_v[row, :, :p].double(), v[row, :, None].double()], dim=1).repeat_interleave(group, 0)
        expected = F.scaled_dot_product_attention(rotated_and_normed(q[row], c, s)[:, None], keys, values)
        assert relative_error(got[row].view(heads, head_dim), expected[:, 0]) < tolerance(dtype)
        torch.testing.assert_close(k_cache[row, :, p].double(), new_k, atol=2e-2, rtol=2e-2)
        assert torch.equal(v_cache[row, :, p], v[row])
        others = torch.arange(cache_len) != p
        assert torch.equal(k_cache[row, :, others], before_k[row, :, others])
        assert torch.equal(v_cache[row, :, others], before_v[row, :, others])
    assert got.shape == (batch, heads * head_dim)


@pytest.mark.parametrize("device", DEVICES)
def test_attend_with_a_position_per_row_sees_each_rows_own_prefix(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # on CUDA the batcher's shape at d20 (one split a row or two); a small cache will do on the CPU
    batch, heads, cache_len, head_dim = (64, 10, 2048, 128) if device == "cuda" else (8, 2, 256, 128)
    positions = torch.randint(0, cache_len, (batch,), generator=torch.Generator().manual_seed(0))
    positions[:3] = torch.tensor([0, cache_len - 1, 64])
    qkv = torch.randn(batch, 3 * heads * head_dim, device=device, dtype=dtype)
    angles = torch.rand(cache_len, head_dim // 2, device=device) * 6.3
    k = torch.randn(batch, heads, cache_len, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, heads, cache_len, head_dim, device=device, dtype=dtype)
    got = combine(attend(qkv, angles.cos(), angles.sin(), k, v, positions.to(device), heads))
    q = qkv.view(batch, 3 * heads, head_dim)[:, :heads]
    for row, pos in enumerate(positions.tolist()):  # k and v now hold the new key and value at pos
        query = rotated_and_normed(q[row], angles[pos].cos().double(), angles[pos].sin().double())
        expected = F.scaled_dot_product_attention(query[:, None], k[row, :, :pos + 1].double(),
                                                  v[row, :, :pos + 1].double())
        assert relative_error(got[row].view(heads, head_dim), expected[:, 0]) < tolerance(dtype), row


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 3])
def test_attention_output_projects_the_combined_splits_and_adds_the_residual(device, batch):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    heads, splits, head_dim = 10, 3, 128
    maxima = torch.randn(batch, heads, splits, device=device) * 4
    maxima[:, :, -1] = float("-inf")  # a split past the row's position saw nothing
    sums = torch.rand(batch, heads, splits, device=device) + 0.5
    weighted = torch.randn(batch, heads, splits, head_dim, device=device)
    weighted[:, :, -1] = 0
    parts = AttentionParts(maxima, sums, weighted)
    weight = (torch.randn(1280, heads * head_dim, device=device) / 1280 ** 0.5).to(dtype)
    residual = torch.randn(batch, 1280, device=device, dtype=dtype)
    got = attention_output(parts, weight, residual)
    top = maxima[..., :1].double()
    y = ((maxima.double() - top).exp()[..., None] * weighted.double()).sum(2) / \
        ((maxima.double() - top).exp() * sums.double()).sum(2)[..., None]
    assert got.shape == residual.shape and got.dtype == dtype
    assert relative_error(got, residual.double() + y.flatten(1) @ weight.double().T) < tolerance(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, vocab, k", [(1, 65536, 50), (3, 1000, 200), (2, 100, 64), (1, 50000, 2),
                                             (8, 65536, 50)])
def test_topk_gives_the_k_largest_logits_largest_first_with_their_ids(device, batch, vocab, k):
    logits = torch.randn(batch, vocab, device=device) * 5
    logits[0, :vocab // 2] -= 100  # negative values sort below positive ones
    values, ids = topk(logits, k)
    expected_values, expected_ids = torch.topk(logits.cpu(), k, dim=-1)
    assert torch.equal(values.cpu(), expected_values) and torch.equal(ids.cpu(), expected_ids)
