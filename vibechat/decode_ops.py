"""The two operations of a one-token decode step that PyTorch leaves slow on a GPU, as Triton kernels.

At batch 1 a decode step is a chain of ~8 small launches per layer and each one's latency counts:
- `linear`: a matrix-vector product that reads every weight once, with the RMSNorm of its input, a ReLU²
  and the residual add folded in, so each of them costs no launch of its own (cuBLAS: 5 µs for a
  1280x1280 bf16 matrix, this kernel 3.6; the norm and the add would be two more launches).
- `decode_attention`: attention of one query per head over only the valid prefix of a preallocated cache
  (SDPA with a mask reads every slot of it), each row's prefix split so that even batch 1 fills the GPU.

Each falls back to the plain PyTorch it replaces on a CPU, without Triton, and for `linear` at more than
one row, where cuBLAS's matrix product is already the right tool; that version is also the tests' reference.
"""

import math

import torch
import torch.nn.functional as F

from vibechat.gpt import norm

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every op takes its PyTorch path
    triton = None

ATTENTION_BLOCK = 64  # cache positions an attention program reads at a time
ATTENTION_PROGRAMS = 1024  # about what fills an H100/H200 (132 SMs): the positions are split until there are this many


def linear(x: torch.Tensor, weight: torch.Tensor, norm_input: bool = False, relu2: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) x (N, K) weight -> (B, N): weight @ rmsnorm(x) if norm_input, then relu(.)² if relu2, then
    + residual if given."""
    if triton is not None and x.is_cuda and x.size(0) == 1:
        return _triton_gemv(x, weight, norm_input, relu2, residual)
    if norm_input:
        x = norm(x)
    y = F.linear(x, weight)
    if relu2:
        y = F.relu(y).square()
    return y if residual is None else residual + y


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(B, H, 1, D) queries at position pos (long on the device: (1,) shared by the rows or (B,) one per row)
    over (B, H_kv, T, D) caches whose slots 0..pos are written -> (B, H, 1, D). Slots past pos weigh nothing
    (the kernel does not read them)."""
    if triton is not None and q.is_cuda:
        return _triton_decode_attention(q, k_cache, v_cache, pos)
    visible = (torch.arange(k_cache.size(2), device=q.device) <= pos[:, None])[:, None, None, :]  # (1 or B, 1, 1, T)
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible,
                                          enable_gqa=q.size(1) != k_cache.size(1))


if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, residual_ptr, y_ptr, eps, N, K: tl.constexpr, NORM_INPUT: tl.constexpr,
                     RELU2: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        # 2-D partial sums, reduced once at the end: the loop stays free of cross-thread shuffles
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
            if NORM_INPUT:
                squares += x * x
        y = tl.sum(acc, axis=1)
        if NORM_INPUT:  # rmsnorm scales x by one number, so it can scale the product instead
            y = y * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        if RELU2:
            y = tl.maximum(y, 0.0)
            y = y * y
        if RESIDUAL:
            y += tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    def _triton_gemv(x, weight, norm_input, relu2, residual):
        N, K = weight.shape
        y = torch.empty(1, N, dtype=weight.dtype, device=x.device)
        # swept on an H100 at d20 (docs/gpu_notes.md): with no more rows than columns, one row per program keeps
        # enough programs in flight; with many rows, four share a program
        block_n, block_k, warps = (1, 1024, 4) if N <= K else (4, 256, 4)
        eps = torch.finfo(x.dtype).eps  # F.rms_norm's default, which the model's norm uses
        _gemv_kernel[(triton.cdiv(N, block_n),)](
            x.contiguous(), weight, x if residual is None else residual, y, eps, N, K, norm_input, relu2,
            residual is not None, block_n, block_k, num_warps=warps)
        return y

    @triton.jit
    def _attention_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, pos_stride, m_ptr, l_ptr, acc_ptr, scale,
                                T: tl.constexpr, H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                                BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
        """One (row, head, split of the valid positions): the split's max score, softmax denominator and weighted
        values, by online softmax over blocks of BLOCK positions. Only the valid prefix is visited, however long
        the cache: the splits divide the row's own length."""
        bh, split = tl.program_id(0), tl.program_id(1)
        n_splits = tl.num_programs(1)
        kv_head = (bh // H) * (H // GROUP) + (bh % H) // GROUP
        valid = tl.load(pos_ptr + (bh // H) * pos_stride) + 1
        per_split = tl.cdiv(tl.cdiv(valid, BLOCK), n_splits) * BLOCK  # whole blocks, so splits never overlap
        lo = split * per_split
        hi = tl.minimum(lo + per_split, valid)
        d = tl.arange(0, BLOCK_D)  # head sizes that are not a power of two are padded and masked
        d_ok = d < D
        # scaled once, and back to fp32: under torch.compile a Python float argument arrives as fp64
        q = (tl.load(q_ptr + bh * D + d, mask=d_ok, other=0.0).to(tl.float32) * scale).to(tl.float32)
        m = tl.full([], float("-inf"), tl.float32)
        l = tl.zeros([], tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for start in tl.range(lo, hi, BLOCK):
            t = start + tl.arange(0, BLOCK)
            visible = t < hi
            kv = kv_head * T * D + t[:, None] * D + d[None, :]
            kv_ok = visible[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv, mask=kv_ok, other=0.0).to(tl.float32)
            scores = tl.where(visible, tl.sum(k * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            p = tl.where(visible, tl.exp(scores - m_new), 0.0)
            v = tl.load(v_ptr + kv, mask=kv_ok, other=0.0).to(tl.float32)
            rescale = tl.exp(m - m_new)
            l = l * rescale + tl.sum(p, axis=0)
            acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
            m = m_new
        out = bh * n_splits + split
        tl.store(m_ptr + out, m)
        tl.store(l_ptr + out, l)
        tl.store(acc_ptr + out * D + d, acc, mask=d_ok)

    def _triton_decode_attention(q, k_cache, v_cache, pos):
        B, H, _, D = q.shape
        T = k_cache.size(2)
        # enough programs to fill the GPU at batch 1, few splits (and so little to combine) once rows do that
        n_splits = max(1, min(triton.cdiv(T, ATTENTION_BLOCK), triton.cdiv(ATTENTION_PROGRAMS, B * H)))
        m = torch.empty(B, H, n_splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(B, H, n_splits, D, dtype=torch.float32, device=q.device)
        _attention_split_kernel[(B * H, n_splits)](
            q.contiguous(), k_cache, v_cache, pos, 0 if pos.numel() == 1 else 1, m, l, acc, 1.0 / math.sqrt(D), T, H,
            H // k_cache.size(1), D, triton.next_power_of_2(D), ATTENTION_BLOCK)
        # splits past the position hold max -inf and weigh 0; the first split always holds position 0
        weight = torch.exp(m - m.amax(dim=-1, keepdim=True))
        y = (weight[..., None] * acc).sum(dim=2) / (weight * l).sum(dim=2)[..., None]
        return y[:, :, None, :].to(q.dtype)
