"""The operations of a one-token decode step that PyTorch leaves slow on a GPU, as Triton kernels.

At batch 1 a decode step is a chain of small launches and each one's latency counts, so each op here does in
one launch what PyTorch does in several:
- `linear`: a matrix-vector product that reads every weight once, with the RMSNorm of its input, a ReLU², the
  residual add or the logits' soft cap folded in (batch 1 only; cuBLAS's matrix product is the tool above it).
- `attend`: the rotary embedding and QK-norm of the new query and key, the key and value written into the
  cache at their position, and attention of the query over only the written prefix of the cache, split over
  the positions so that even batch 1 fills the GPU; the last block of a head to finish combines the blocks.
- `topk`: the k largest logits of each row in two sorting passes (blocks of the vocabulary, then the blocks'
  winners), where torch.topk runs a radix select of several launches.

Each falls back to the plain PyTorch it replaces on a CPU, without Triton, and where the kernel is not the
faster tool; that version is also the tests' reference.
"""

import functools
import math

import torch
import torch.nn.functional as F

from vibechat.gpt import apply_rotary_emb, norm

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU-only installs: every op takes its PyTorch path
    triton = None

ATTENTION_BLOCK = 64  # cache positions per attention program
TOPK_CHUNK = 2048  # logits per program of topk's first pass
TOPK_MAX = 64  # topk's kernels take k up to this: above it, and above TOPK_MAX_ROWS rows, torch.topk is faster
TOPK_MAX_ROWS = 32


def linear(x: torch.Tensor, weight: torch.Tensor, norm_input: bool = False, relu2: bool = False,
           residual: torch.Tensor | None = None, rows: int | None = None,
           softcap: float | None = None) -> torch.Tensor:
    """(B, K) x (N, K) weight -> (B, N): weight @ rmsnorm(x) if norm_input, then relu(.)² if relu2, then
    + residual if given; with softcap, softcap * tanh(. / softcap) in float32 (the logits). With `rows` (>= B)
    the product runs at that many rows, x padded with zeros: one matrix-product shape for every B, so each row
    rounds the same whatever number of rows come with it (for weight-bound decoding the extra rows cost next
    to nothing)."""
    if rows is None and triton is not None and x.is_cuda and x.size(0) == 1:
        return _triton_gemv(x, weight, norm_input, relu2, residual, softcap)
    if norm_input:
        x = norm(x)
    if rows is not None:
        y = F.linear(F.pad(x, (0, 0, 0, rows - x.size(0))), weight)[:x.size(0)]
    else:
        y = F.linear(x, weight)
    if relu2:
        y = F.relu(y).square()
    if residual is not None:
        y = residual + y
    return y if softcap is None else softcap * torch.tanh(y.float() / softcap)


def attend(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           pos: torch.Tensor, n_head: int, arrivals: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per row, GPT's CausalSelfAttention after its qkv product: qkv (B, (H + 2 H_kv) D)
    holds the stacked query, key and value; the query and key get the rotary embedding at pos (cos, sin: the
    model's (T, D/2) tables) and the RMSNorm; key and value are written into the (B, H_kv, T, D) caches at pos
    (long on the device: (1,) shared by the rows or (B,) one per row); the query attends to cache slots 0..pos
    -> (B, H D). Slots past pos weigh nothing (the kernel does not read them). `arrivals`: (B H_kv,) int32 zeros,
    the kernel's counters of finished blocks, left at zero again."""
    if triton is not None and qkv.is_cuda:
        return _triton_attend(qkv, cos, sin, k_cache, v_cache, pos, n_head, arrivals)
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
    return y.view(B, n_head * D)


def topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(logits, k, dim=-1) of (B, V) logits: the k largest of each row, largest first, and their ids."""
    if triton is not None and logits.is_cuda and k <= TOPK_MAX and logits.size(0) <= TOPK_MAX_ROWS:
        return _triton_topk(logits, k)
    return torch.topk(logits, k, dim=-1)


if triton is not None:

    @functools.cache
    def _pdl(device: torch.device) -> bool:
        """Whether kernels launch dependent on the one before (programmatic dependent launch, Hopper on): each
        then starts while that one finishes and waits (gdc_wait) only before reading what it wrote."""
        return torch.cuda.get_device_capability(device)[0] >= 9

    def _gemv_config(N: int, K: int) -> tuple[int, int]:
        """(rows per program, warps) for an (N, K) weight, from a sweep on an H200 at the d20 shapes
        (docs/gpu_notes.md): one row a program, except for the lm_head's many; ~64 weights a thread."""
        block_n = 4 if N >= 32 * K else 1
        return block_n, max(1, min(8, block_n * triton.next_power_of_2(K) // 2048))

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, residual_ptr, y_ptr, eps, softcap, N, K: tl.constexpr, K_PAD: tl.constexpr,
                     NORM_INPUT: tl.constexpr, RELU2: tl.constexpr, RESIDUAL: tl.constexpr,
                     SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        # launched dependent on the kernel before (PDL): the program's weights, which no kernel writes, are
        # loaded while that kernel still runs; its output x only after gdc_wait
        if PDL:
            gdc_launch_dependents()
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, K_PAD)
        col_ok = cols < K
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                    eviction_policy="evict_first")
        if PDL:
            gdc_wait()
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if NORM_INPUT:  # rmsnorm scales x by one number, so it can scale the product instead
            y = y * tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
        if RELU2:
            y = tl.maximum(y, 0.0)
            y = y * y
        if RESIDUAL:
            y += tl.load(residual_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if SOFTCAP:  # tanh(z) = 1 - 2 / (exp(2z) + 1), which saturates cleanly at +-1
            y = softcap * (1.0 - 2.0 / (tl.exp(2.0 * y / softcap) + 1.0))
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    def _triton_gemv(x, weight, norm_input, relu2, residual, softcap):
        N, K = weight.shape
        y = torch.empty(1, N, dtype=weight.dtype if softcap is None else torch.float32, device=x.device)
        block_n, warps = _gemv_config(N, K)
        eps = torch.finfo(x.dtype).eps  # F.rms_norm's default, which the model's norm uses
        _gemv_kernel[(triton.cdiv(N, block_n),)](
            x.contiguous(), weight, x if residual is None else residual, y, eps, softcap or 1.0, N, K,
            triton.next_power_of_2(K), norm_input, relu2, residual is not None, softcap is not None, block_n,
            _pdl(x.device), num_warps=warps, launch_pdl=_pdl(x.device))
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
    def _attend_kernel(qkv_ptr, qkv_stride, cos_ptr, sin_ptr, k_ptr, v_ptr, pos_ptr, pos_stride, arrivals_ptr,
                       m_ptr, l_ptr, acc_ptr, y_ptr, scale, eps, T: tl.constexpr, H: tl.constexpr,
                       H_KV: tl.constexpr, D: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
                       BLOCK: tl.constexpr, BLOCKS_PAD: tl.constexpr, PDL: tl.constexpr):
        """One (row, kv head, block of positions): its query heads' max score, softmax denominator and weighted
        values over the block; the block holding pos also writes the new key and value into the cache."""
        if PDL:  # every program waits, so that this kernel never ends before the one it depends on
            gdc_launch_dependents()
            gdc_wait()
        row_kv, block = tl.program_id(0), tl.program_id(1)
        b, kv_head = row_kv // H_KV, row_kv % H_KV
        GROUP: tl.constexpr = H // H_KV
        pos = tl.load(pos_ptr + b * pos_stride)
        n_blocks = pos // BLOCK + 1
        if block < n_blocks:
            half = tl.arange(0, HALF_PAD)  # head sizes that are not a power of two are padded and masked
            half_ok = half < D // 2
            d = tl.arange(0, D_PAD)
            d_ok = d < D
            c = tl.load(cos_ptr + pos * (D // 2) + half, mask=half_ok, other=0.0)
            s = tl.load(sin_ptr + pos * (D // 2) + half, mask=half_ok, other=0.0)
            qkv = qkv_ptr + b * qkv_stride
            k1, k2 = _rotate_norm(qkv + (H + kv_head) * D, c, s, half, half_ok, eps, D)
            v_new = tl.load(qkv + (H + H_KV + kv_head) * D + d, mask=d_ok, other=0.0)
            cache = row_kv * T * D
            here = block == pos // BLOCK
            tl.store(k_ptr + cache + pos * D + half, k1, mask=half_ok & here)
            tl.store(k_ptr + cache + pos * D + D // 2 + half, k2, mask=half_ok & here)
            tl.store(v_ptr + cache + pos * D + d, v_new, mask=d_ok & here)
            # the block's keys and values: the cache's before pos, the new ones at pos (not read back)
            t = block * BLOCK + tl.arange(0, BLOCK)
            written, new = t < pos, (t == pos)[:, None]
            kv = cache + t[:, None] * D
            keys1 = tl.load(k_ptr + kv + half[None, :], mask=written[:, None] & half_ok[None, :], other=0.0)
            keys2 = tl.load(k_ptr + kv + D // 2 + half[None, :], mask=written[:, None] & half_ok[None, :], other=0.0)
            values = tl.load(v_ptr + kv + d[None, :], mask=written[:, None] & d_ok[None, :], other=0.0)
            keys1 = tl.where(new, k1[None, :], keys1).to(tl.float32)
            keys2 = tl.where(new, k2[None, :], keys2).to(tl.float32)
            values = tl.where(new, v_new[None, :], values).to(tl.float32)
            visible = t <= pos
            for g in tl.static_range(GROUP):
                head = kv_head * GROUP + g
                q1, q2 = _rotate_norm(qkv + head * D, c, s, half, half_ok, eps, D)
                scores = tl.sum(keys1 * q1.to(tl.float32)[None, :], axis=1)
                scores += tl.sum(keys2 * q2.to(tl.float32)[None, :], axis=1)
                scores = tl.where(visible, scores * scale, float("-inf"))
                m = tl.max(scores, axis=0)
                p = tl.where(visible, tl.exp(scores - m), 0.0)
                out = (b * H + head) * BLOCKS_PAD + block
                tl.store(m_ptr + out, m)
                tl.store(l_ptr + out, tl.sum(p, axis=0))
                tl.store(acc_ptr + out * D_PAD + d, tl.sum(p[:, None] * values, axis=0))
            # the last block of this (row, kv head) to finish combines them all: every program's partial
            # results are written before its arrival counts (the barrier, then the atomic's release)
            tl.debug_barrier()
            if tl.atomic_add(arrivals_ptr + row_kv, 1, sem="acq_rel") == n_blocks - 1:
                blocks = tl.arange(0, BLOCKS_PAD)
                blocks_ok = blocks < n_blocks
                for g in tl.static_range(GROUP):
                    head = kv_head * GROUP + g
                    parts = (b * H + head) * BLOCKS_PAD + blocks
                    maxima = tl.load(m_ptr + parts, mask=blocks_ok, other=float("-inf"), cache_modifier=".cg")
                    sums = tl.load(l_ptr + parts, mask=blocks_ok, other=0.0, cache_modifier=".cg")
                    weighted = tl.load(acc_ptr + parts[:, None] * D_PAD + d[None, :], mask=blocks_ok[:, None],
                                       other=0.0, cache_modifier=".cg")
                    weight = tl.exp(maxima - tl.max(maxima, axis=0))  # blocks past pos: exp(-inf) = 0
                    y = tl.sum(weight[:, None] * weighted, axis=0) / tl.sum(weight * sums, axis=0)
                    tl.store(y_ptr + b * H * D + head * D + d, y.to(y_ptr.dtype.element_ty), mask=d_ok)
                tl.atomic_xchg(arrivals_ptr + row_kv, 0)

    def _triton_attend(qkv, cos, sin, k_cache, v_cache, pos, n_head, arrivals):
        B, (_, H_kv, T, D) = qkv.size(0), k_cache.shape
        blocks = triton.cdiv(T, ATTENTION_BLOCK)
        blocks_pad = triton.next_power_of_2(blocks)
        m = torch.empty(B * n_head * blocks_pad, dtype=torch.float32, device=qkv.device)
        l = torch.empty_like(m)
        acc = torch.empty(B * n_head * blocks_pad, triton.next_power_of_2(D), dtype=torch.float32, device=qkv.device)
        y = torch.empty(B, n_head * D, dtype=qkv.dtype, device=qkv.device)
        _attend_kernel[(B * H_kv, blocks)](
            qkv, qkv.stride(0), cos, sin, k_cache, v_cache, pos, 0 if pos.numel() == 1 else 1, arrivals, m, l, acc, y,
            1.0 / math.sqrt(D), torch.finfo(qkv.dtype).eps, T, n_head, H_kv, D, triton.next_power_of_2(D // 2),
            triton.next_power_of_2(D), ATTENTION_BLOCK, blocks_pad, _pdl(qkv.device), launch_pdl=_pdl(qkv.device))
        return y

    @triton.jit
    def _sort_keys(values, ids):
        """float32 values and int ids -> int64 keys whose order is the values' (then the lower id first)."""
        bits = values.to(tl.int32, bitcast=True)
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse the order of their magnitudes
        return (bits.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)

    @triton.jit
    def _topk_blocks_kernel(logits_ptr, keys_ptr, V, CHUNK: tl.constexpr, K_PAD: tl.constexpr, PDL: tl.constexpr):
        """The K_PAD largest of one chunk of a row, as sort keys, largest first."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        row, chunk = tl.program_id(0), tl.program_id(1)
        ids = chunk * CHUNK + tl.arange(0, CHUNK)
        values = tl.load(logits_ptr + row * V + ids, mask=ids < V, other=0.0)
        keys = tl.where(ids < V, _sort_keys(values, ids), -0x7FFFFFFFFFFFFFFF)
        out = (row * tl.num_programs(1) + chunk) * K_PAD + tl.arange(0, K_PAD)
        tl.store(keys_ptr + out, tl.topk(keys, K_PAD))

    @triton.jit
    def _topk_merge_kernel(keys_ptr, values_ptr, ids_ptr, k, N_KEYS, KEYS_PAD: tl.constexpr, K_PAD: tl.constexpr,
                           PDL: tl.constexpr):
        """The k largest of a row's chunk winners: their values and ids, largest first."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
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
        pdl = _pdl(logits.device)
        _topk_blocks_kernel[(B, chunks)](logits, keys, V, chunk, k_pad, pdl, num_warps=4, launch_pdl=pdl)
        _topk_merge_kernel[(B,)](keys, values, ids, k, chunks * k_pad, triton.next_power_of_2(chunks * k_pad), k_pad,
                                 pdl, num_warps=4, launch_pdl=pdl)
        return values.to(dtype), ids
