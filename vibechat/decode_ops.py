"""The operations of a one-token decode step that PyTorch leaves slow on a GPU, as Triton kernels.

At batch 1 a decode step is a chain of small launches and each one's latency counts, so each op here does in
one launch what PyTorch does in several, and no kernel reads what another program of the same launch writes
(each result is read by the next launch, in stream order):
- `linear`: a matrix-vector product that reads every weight once, with the RMSNorm of its input, a ReLU², the
  residual add or the logits' soft cap folded in (batch 1 only; cuBLAS's matrix product is the tool above it).
- `attend`: the rotary embedding and QK-norm of the new query and key, the key and value written into the
  cache at their position, and attention of the query over only the written prefix of the cache, split over
  the positions so that even batch 1 fills the GPU. It returns each split's partial softmax (`AttentionParts`);
  `attention_output` combines them inside the output projection's matrix-vector product at batch 1.
- `topk`: the k largest logits of each row in two sorting passes (blocks of the vocabulary, then the blocks'
  winners), where torch.topk runs a radix select of several launches.

Each falls back to the plain PyTorch it replaces on a CPU, without Triton, and where the kernel is not the
faster tool; that version is also the tests' reference. Under Triton's interpreter (TRITON_INTERPRET=1) the
kernels run on CPU tensors too, so the CPU tests can hold them to it.
"""

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vibechat.gpt import apply_rotary_emb, norm

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every op takes its PyTorch path
    triton = None

ATTENTION_BLOCK = 64  # cache positions an attention program reads at a time
ATTENTION_PROGRAMS = 1024  # about what fills an H100/H200 (132 SMs): positions are split until there are this many
ONE_ROW_SPLITS = 8  # at batch 1: more splits, faster attention, but the output projection reads each (gpu_notes)
TOPK_CHUNK = 2048  # logits per program of topk's first pass
TOPK_MAX = 64  # topk's kernels take k up to this: above it, and above TOPK_MAX_ROWS rows, torch.topk is faster
TOPK_MAX_ROWS = 32
NORM_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default: that of the fp32 it computes in, for bf16 too
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class AttentionParts(NamedTuple):
    """Attention of each (row, head) as S splits of the positions, each relative to its own largest score:
    max (B, H, S) that score (-inf where a split saw no position), sum (B, H, S) its softmax denominator,
    weighted (B, H, S, D) its values weighted by the same exponentials. float32."""
    max: torch.Tensor
    sum: torch.Tensor
    weighted: torch.Tensor


def _kernels(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or INTERPRET)


def linear(x: torch.Tensor, weight: torch.Tensor, norm_input: bool = False, relu2: bool = False,
           residual: torch.Tensor | None = None, softcap: float | None = None) -> torch.Tensor:
    """(B, K) x (N, K) weight -> (B, N): weight @ rmsnorm(x) if norm_input, then relu(.)² if relu2, then
    + residual if given; with softcap, softcap * tanh(. / softcap) in float32 (the logits)."""
    if _kernels(x) and x.size(0) == 1:
        return _triton_gemv(x, weight, norm_input, relu2, residual, softcap)
    if norm_input:
        x = norm(x)
    y = F.linear(x, weight)
    if relu2:
        y = F.relu(y).square()
    if residual is not None:
        y = residual + y
    return y if softcap is None else softcap * torch.tanh(y.float() / softcap)


def attend(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           pos: torch.Tensor, n_head: int) -> AttentionParts:
    """Attention of one new token per row, GPT's CausalSelfAttention between its qkv product and its output
    projection: qkv (B, (H + 2 H_kv) D) holds the stacked query, key and value; the query and key get the rotary
    embedding at pos (cos, sin: the model's (T, D/2) tables) and the RMSNorm; key and value are written into the
    (B, H_kv, T, D) caches at pos (long on the device: (1,) shared by the rows or (B,) one per row); the query
    attends to cache slots 0..pos. Slots past pos weigh nothing (the kernel does not read them)."""
    if _kernels(qkv):
        return _triton_attend(qkv, cos, sin, k_cache, v_cache, pos, n_head)
    B, (_, H_kv, T, D) = qkv.size(0), k_cache.shape
    q, k, v = qkv.view(B, -1, 1, D).split([n_head, H_kv, H_kv], dim=1)
    cos, sin = cos[pos].view(-1, 1, 1, D // 2), sin[pos].view(-1, 1, 1, D // 2)  # per row or shared
    q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
    if pos.numel() == 1:
        k_cache[:, :, pos] = k
        v_cache[:, :, pos] = v
    else:
        rows = torch.arange(B, device=qkv.device)
        k_cache[rows, :, pos] = k[:, :, 0]
        v_cache[rows, :, pos] = v[:, :, 0]
    visible = (torch.arange(T, device=qkv.device) <= pos[:, None])[:, None, None, :]  # (1 or B, 1, 1, T)
    y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible, enable_gqa=n_head != H_kv)
    ones = torch.ones(B, n_head, 1, device=qkv.device)
    return AttentionParts(torch.zeros_like(ones), ones, y.float())  # one split: y = weighted / sum


def combine(parts: AttentionParts) -> torch.Tensor:
    """(B, H D) float32: each row's attention output, its splits weighed by their maxima."""
    weight = torch.exp(parts.max - parts.max.amax(dim=-1, keepdim=True))  # splits that saw nothing: exp(-inf) = 0
    y = (weight[..., None] * parts.weighted).sum(dim=2) / (weight * parts.sum).sum(dim=2)[..., None]
    return y.flatten(1)


def attention_output(parts: AttentionParts, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + combine(parts) @ weight.T, the combined output rounded to weight's dtype as SDPA's would be;
    at batch 1 the combine runs inside the matrix-vector product."""
    if _kernels(residual) and residual.size(0) == 1:
        return _triton_gemv(parts.weighted, weight, False, False, residual, None, parts)
    return residual + F.linear(combine(parts).to(weight.dtype), weight)


def topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(logits, k, dim=-1) of (B, V) logits: the k largest of each row, largest first, and their ids."""
    if _kernels(logits) and k <= TOPK_MAX and logits.size(0) <= TOPK_MAX_ROWS:
        return _triton_topk(logits, k)
    return torch.topk(logits, k, dim=-1)


if triton is not None:

    def _gemv_config(N: int, K: int, splits: int) -> tuple[int, int, int]:
        """(rows per program, columns a load, warps) for an (N, K) weight whose input is combined from `splits`
        attention parts (0: a plain input): the fastest of a sweep on an H200 at each d20 shape (docs/gpu_notes.md;
        within 2% of it for the lm_head, the qkv and the MLP's first product, which share one)."""
        if splits:  # each program combines the parts of the whole input, so it takes many rows
            return 8, 512, 8
        if K <= 2048:
            return 2, 256, 1
        return 1, 1024, 2

    @triton.jit
    def _combined(weighted_ptr, max_ptr, sum_ptr, cols, col_ok, SPLITS: tl.constexpr, HEAD: tl.constexpr):
        """Columns `cols` of one row's attention output from its parts ((H, SPLITS) max and sum, (H, SPLITS,
        HEAD) weighted), as `combine` does it."""
        head, d = cols // HEAD, cols % HEAD
        top = tl.load(max_ptr + head * SPLITS, mask=col_ok, other=0.0)
        for s in tl.static_range(1, SPLITS):
            top = tl.maximum(top, tl.load(max_ptr + head * SPLITS + s, mask=col_ok, other=0.0))
        num = tl.zeros_like(top)
        den = tl.zeros_like(top)
        for s in tl.static_range(SPLITS):
            weight = tl.exp(tl.load(max_ptr + head * SPLITS + s, mask=col_ok, other=0.0) - top)
            num += weight * tl.load(weighted_ptr + (head * SPLITS + s) * HEAD + d, mask=col_ok, other=0.0)
            den += weight * tl.load(sum_ptr + head * SPLITS + s, mask=col_ok, other=1.0)
        return tl.where(col_ok, num / den, 0.0)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, residual_ptr, y_ptr, max_ptr, sum_ptr, eps, softcap, N, K: tl.constexpr,
                     NORM_INPUT: tl.constexpr, RELU2: tl.constexpr, RESIDUAL: tl.constexpr, SOFTCAP: tl.constexpr,
                     SPLITS: tl.constexpr, HEAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """BLOCK_N rows of the product, their row tiles loaded BLOCK_K columns at a time (the loop unrolled, the
        products summed once at the end). With SPLITS, x is the attention output combined from its parts
        (x_ptr: weighted, with max_ptr and sum_ptr)."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        products = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        squares = tl.zeros((BLOCK_K,), tl.float32)
        for start in tl.static_range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            if SPLITS == 0:
                x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            else:  # rounded to the weights' dtype, as attention's output is before the projection
                x = _combined(x_ptr, max_ptr, sum_ptr, cols, col_ok, SPLITS, HEAD).to(w.dtype).to(tl.float32)
            products += w.to(tl.float32) * x[None, :]
            if NORM_INPUT:
                squares += x * x
        y = tl.sum(products, axis=1)
        if NORM_INPUT:  # rmsnorm scales x by one number, so it can scale the product instead
            y = y * tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        if RELU2:
            y = tl.maximum(y, 0.0)
            y = y * y
        if RESIDUAL:
            y += tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if SOFTCAP:  # tanh(z) = 1 - 2 / (exp(2z) + 1), which saturates cleanly at +-1
            y = softcap * (1.0 - 2.0 / (tl.exp(2.0 * y / softcap) + 1.0))
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    def _triton_gemv(x, weight, norm_input, relu2, residual, softcap, parts=None):
        N, K = weight.shape
        y = torch.empty(1, N, dtype=weight.dtype if softcap is None else torch.float32, device=weight.device)
        splits, head = (0, 1) if parts is None else parts.weighted.shape[-2:]
        block_n, block_k, warps = _gemv_config(N, K, splits)
        max_, sum_ = (x, x) if parts is None else (parts.max, parts.sum)
        _gemv_kernel[(triton.cdiv(N, block_n),)](
            x.contiguous(), weight, x if residual is None else residual, y, max_, sum_, NORM_EPS, softcap or 1.0,
            N, K, norm_input, relu2, residual is not None, softcap is not None, splits, head, block_n, block_k,
            num_warps=warps)
        return y

    @triton.jit
    def _rotate_norm(ptr, c, s, half, half_ok, eps, D: tl.constexpr):
        """One head of GPT's norm(apply_rotary_emb(.)): the rotation in float32, rounded to the input dtype as
        apply_rotary_emb rounds, then the RMSNorm in float32, rounded as F.rms_norm rounds."""
        x1 = tl.load(ptr + half, mask=half_ok, other=0.0)
        x2 = tl.load(ptr + D // 2 + half, mask=half_ok, other=0.0)
        dtype = x1.dtype
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        r1 = (x1 * c + x2 * s).to(dtype).to(tl.float32)
        r2 = (x2 * c - x1 * s).to(dtype).to(tl.float32)
        scale = tl.rsqrt((tl.sum(r1 * r1, axis=0) + tl.sum(r2 * r2, axis=0)) / D + eps)
        return (r1 * scale).to(dtype), (r2 * scale).to(dtype)

    @triton.jit
    def _attend_kernel(qkv_ptr, qkv_stride, cos_ptr, sin_ptr, k_ptr, v_ptr, pos_ptr, pos_stride, max_ptr, sum_ptr,
                       weighted_ptr, scale, eps, T, H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr,
                       HALF_PAD: tl.constexpr, BLOCK: tl.constexpr):
        """One (row, query head, split of the row's positions 0..pos): the split's largest score, softmax
        denominator and weighted values, by online softmax over blocks of BLOCK positions. A program reads
        the cache only before pos and takes the new key and value at pos from the qkv product itself; the
        one program of the key's group whose split holds pos writes them into the cache. So no program reads
        what another one of this launch writes."""
        bh, split = tl.program_id(0), tl.program_id(1)
        splits = tl.num_programs(1)
        b, head = bh // H, bh % H
        GROUP: tl.constexpr = H // H_KV
        kv_head = head // GROUP
        pos = tl.load(pos_ptr + b * pos_stride)
        half = tl.arange(0, HALF_PAD)  # head sizes that are not a power of two are padded and masked
        half_ok = half < D // 2
        c = tl.load(cos_ptr + pos * (D // 2) + half, mask=half_ok, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos * (D // 2) + half, mask=half_ok, other=0.0).to(tl.float32)
        row = qkv_ptr + b * qkv_stride
        q1, q2 = _rotate_norm(row + head * D, c, s, half, half_ok, eps, D)
        k1, k2 = _rotate_norm(row + (H + kv_head) * D, c, s, half, half_ok, eps, D)
        v1 = tl.load(row + (H + H_KV + kv_head) * D + half, mask=half_ok, other=0.0)
        v2 = tl.load(row + (H + H_KV + kv_head) * D + D // 2 + half, mask=half_ok, other=0.0)
        per_split = tl.cdiv(pos // BLOCK + 1, splits) * BLOCK  # whole blocks, so splits never overlap
        lo = split * per_split
        hi = tl.minimum(lo + per_split, pos + 1)
        cache = (b * H_KV + kv_head).to(tl.int64) * T * D
        writes = (head % GROUP == 0) & (lo <= pos) & (pos < hi)
        tl.store(k_ptr + cache + pos * D + half, k1, mask=half_ok & writes)
        tl.store(k_ptr + cache + pos * D + D // 2 + half, k2, mask=half_ok & writes)
        tl.store(v_ptr + cache + pos * D + half, v1, mask=half_ok & writes)
        tl.store(v_ptr + cache + pos * D + D // 2 + half, v2, mask=half_ok & writes)
        # scaled once, and back to fp32: under torch.compile a Python float argument arrives as fp64
        q1, q2 = (q1.to(tl.float32) * scale).to(tl.float32), (q2.to(tl.float32) * scale).to(tl.float32)
        m = tl.full([], float("-inf"), tl.float32)
        l = tl.zeros([], tl.float32)
        acc1 = tl.zeros((HALF_PAD,), tl.float32)
        acc2 = tl.zeros((HALF_PAD,), tl.float32)
        for start in tl.range(lo, hi, BLOCK):
            t = start + tl.arange(0, BLOCK)
            old = (t < pos)[:, None] & half_ok[None, :]  # written by earlier steps
            new = (t == pos)[:, None]
            kv = cache + t[:, None] * D + half[None, :]
            keys1 = tl.where(new, k1[None, :], tl.load(k_ptr + kv, mask=old, other=0.0)).to(tl.float32)
            keys2 = tl.where(new, k2[None, :], tl.load(k_ptr + kv + D // 2, mask=old, other=0.0)).to(tl.float32)
            values1 = tl.where(new, v1[None, :], tl.load(v_ptr + kv, mask=old, other=0.0)).to(tl.float32)
            values2 = tl.where(new, v2[None, :], tl.load(v_ptr + kv + D // 2, mask=old, other=0.0)).to(tl.float32)
            visible = t <= pos  # the split's blocks are whole, so t < hi wherever t <= pos
            scores = tl.sum(keys1 * q1[None, :], axis=1) + tl.sum(keys2 * q2[None, :], axis=1)
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            p = tl.where(visible, tl.exp(scores - m_new), 0.0)
            rescale = tl.exp(m - m_new)
            l = l * rescale + tl.sum(p, axis=0)
            acc1 = acc1 * rescale + tl.sum(p[:, None] * values1, axis=0)
            acc2 = acc2 * rescale + tl.sum(p[:, None] * values2, axis=0)
            m = m_new
        out = bh * splits + split
        tl.store(max_ptr + out, m)
        tl.store(sum_ptr + out, l)
        tl.store(weighted_ptr + out * D + half, acc1, mask=half_ok)
        tl.store(weighted_ptr + out * D + D // 2 + half, acc2, mask=half_ok)

    def _attention_splits(rows: int, heads: int, cache_len: int) -> int:
        """Splits of each row's positions: enough programs to fill the GPU, few splits once the rows do that;
        at batch 1 ONE_ROW_SPLITS, as the output projection reads every split's part."""
        blocks = triton.cdiv(cache_len, ATTENTION_BLOCK)
        if rows == 1:
            return min(blocks, ONE_ROW_SPLITS)
        return max(1, min(blocks, triton.cdiv(ATTENTION_PROGRAMS, rows * heads)))

    def _triton_attend(qkv, cos, sin, k_cache, v_cache, pos, n_head):
        B, (_, H_kv, T, D) = qkv.size(0), k_cache.shape
        splits = _attention_splits(B, n_head, T)
        m = torch.empty(B, n_head, splits, dtype=torch.float32, device=qkv.device)
        l = torch.empty_like(m)
        weighted = torch.empty(B, n_head, splits, D, dtype=torch.float32, device=qkv.device)
        _attend_kernel[(B * n_head, splits)](
            qkv, qkv.stride(0), cos, sin, k_cache, v_cache, pos, 0 if pos.numel() == 1 else 1, m, l, weighted,
            1.0 / math.sqrt(D), NORM_EPS, T, n_head, H_kv, D, triton.next_power_of_2(D // 2), ATTENTION_BLOCK)
        return AttentionParts(m, l, weighted)

    @triton.jit
    def _sort_keys(values, ids):
        """float32 values and int ids -> int64 keys whose order is the values' (then the lower id first)."""
        bits = values.to(tl.int32, bitcast=True)
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse the order of their magnitudes
        return (bits.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)

    @triton.jit
    def _topk_blocks_kernel(logits_ptr, keys_ptr, V, CHUNK: tl.constexpr, K_PAD: tl.constexpr):
        """The K_PAD largest of one chunk of a row, as sort keys, largest first."""
        row, chunk = tl.program_id(0), tl.program_id(1)
        ids = chunk * CHUNK + tl.arange(0, CHUNK)
        values = tl.load(logits_ptr + row * V + ids, mask=ids < V, other=0.0)
        keys = tl.where(ids < V, _sort_keys(values, ids), -0x7FFFFFFFFFFFFFFF)
        out = (row * tl.num_programs(1) + chunk) * K_PAD + tl.arange(0, K_PAD)
        tl.store(keys_ptr + out, tl.topk(keys, K_PAD))

    @triton.jit
    def _topk_merge_kernel(keys_ptr, values_ptr, ids_ptr, k, N_KEYS, KEYS_PAD: tl.constexpr, K_PAD: tl.constexpr):
        """The k largest of a row's chunk winners: their values and ids, largest first."""
        row = tl.program_id(0)
        i = tl.arange(0, KEYS_PAD)
        keys = tl.load(keys_ptr + row * N_KEYS + i, mask=i < N_KEYS, other=-0x7FFFFFFFFFFFFFFF)
        keys = tl.topk(keys, K_PAD)
        bits = (keys >> 32).to(tl.int32)
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        out = tl.arange(0, K_PAD)
        tl.store(values_ptr + row * k + out, bits.to(tl.float32, bitcast=True), mask=out < k)
        tl.store(ids_ptr + row * k + out, 0x7FFFFFFF - (keys & 0x7FFFFFFF), mask=out < k)

    def _triton_topk(logits, k):
        (B, V), dtype = logits.shape, logits.dtype
        k_pad = triton.next_power_of_2(k)
        chunk = max(k_pad, min(TOPK_CHUNK, triton.next_power_of_2(V)))
        chunks = triton.cdiv(V, chunk)
        keys = torch.empty(B, chunks * k_pad, dtype=torch.int64, device=logits.device)
        values = torch.empty(B, k, dtype=torch.float32, device=logits.device)
        ids = torch.empty(B, k, dtype=torch.int64, device=logits.device)
        logits = logits.float().contiguous()
        _topk_blocks_kernel[(B, chunks)](logits, keys, V, chunk, k_pad, num_warps=4)
        _topk_merge_kernel[(B,)](keys, values, ids, k, chunks * k_pad, triton.next_power_of_2(chunks * k_pad), k_pad,
                                 num_warps=4)
        return values.to(dtype), ids
