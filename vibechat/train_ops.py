"""Two elementwise parts of the training forward+backward that inductor leaves slow on a GPU, as Triton kernels
behind custom ops (opaque to torch.compile: no graph break, nothing to fuse across them anyway, since a matrix
product or attention sits on each side):
- `rotary_norm`: the rotary embedding then the QK RMSNorm of q or k, one pass over (B, H, T, D) in the input's
  own memory layout; its backward recomputes the forward from the input, so nothing but the input is saved.
- `softcap_cross_entropy`: each row's loss of the soft-capped logits in one pass over the bf16 logits (the cap
  bounds every logit, so the log-sum-exp needs no running max), and the logits' gradient in one more.

vibechat.gpt calls them on CUDA and keeps the PyTorch they replace for the CPU; the tests hold one to the other.
"""

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: vibechat.gpt takes its PyTorch path
    triton = None

ROTARY_ROWS = 16  # (b, h, t) rows of D values per rotary program
LOSS_BLOCK = 4096  # logits per loop step of a cross-entropy program (one program a row)


if triton is not None:

    @triton.jit
    def _rotary_rows(x_ptr, cos_ptr, sin_ptr, n_rows, H, T, s_b, s_h, s_t, eps, HALF: tl.constexpr,
                     ROWS: tl.constexpr):
        """Rows pid*ROWS.. of x (B, H, T, D), h fastest: their (b, h, t), mask, the offsets of their first halves,
        cos, sin, the rotation r1, r2 in fp32 (rounded to x's dtype, as the PyTorch version rounds it) and the
        norm's 1 / rms."""
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        mask = (rows < n_rows)[:, None]
        b, h, t = rows // (H * T), rows % H, (rows // H) % T
        cols = tl.arange(0, HALF)[None, :]
        offset = (b * s_b + h * s_h + t * s_t)[:, None] + cols
        x1 = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + offset + HALF, mask=mask, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + t[:, None] * HALF + cols, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + t[:, None] * HALF + cols, mask=mask, other=0.0)
        r1 = (x1 * cos + x2 * sin).to(x_ptr.dtype.element_ty).to(tl.float32)
        r2 = (x2 * cos - x1 * sin).to(x_ptr.dtype.element_ty).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(r1 * r1 + r2 * r2, axis=1) / (2 * HALF) + eps)[:, None]
        return b, h, t, mask, cols, offset, cos, sin, r1, r2, rstd

    @triton.jit
    def _rotary_norm_fwd(x_ptr, y_ptr, cos_ptr, sin_ptr, n_rows, H, T, s_b, s_h, s_t, eps,
                         HALF: tl.constexpr, ROWS: tl.constexpr):
        b, h, t, mask, cols, offset, cos, sin, r1, r2, rstd = _rotary_rows(x_ptr, cos_ptr, sin_ptr, n_rows, H, T,
                                                                           s_b, s_h, s_t, eps, HALF, ROWS)
        tl.store(y_ptr + offset, (r1 * rstd).to(y_ptr.dtype.element_ty), mask=mask)  # y has x's strides
        tl.store(y_ptr + offset + HALF, (r2 * rstd).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_norm_bwd(x_ptr, dy_ptr, dx_ptr, cos_ptr, sin_ptr, n_rows, H, T, s_b, s_h, s_t,
                         g_b, g_h, g_t, eps, HALF: tl.constexpr, ROWS: tl.constexpr):
        b, h, t, mask, cols, offset, cos, sin, r1, r2, rstd = _rotary_rows(x_ptr, cos_ptr, sin_ptr, n_rows, H, T,
                                                                           s_b, s_h, s_t, eps, HALF, ROWS)
        g_offset = (b * g_b + h * g_h + t * g_t)[:, None] + cols
        dy1 = tl.load(dy_ptr + g_offset, mask=mask, other=0.0).to(tl.float32)
        dy2 = tl.load(dy_ptr + g_offset + HALF, mask=mask, other=0.0).to(tl.float32)
        # RMSNorm backward: dr = rstd * dy - r * rstd^3 * mean(dy * r); then the rotation's transpose
        dot = (tl.sum(dy1 * r1 + dy2 * r2, axis=1) / (2 * HALF))[:, None]
        dr1 = rstd * dy1 - r1 * rstd * rstd * rstd * dot
        dr2 = rstd * dy2 - r2 * rstd * rstd * rstd * dot
        tl.store(dx_ptr + offset, (dr1 * cos - dr2 * sin).to(dx_ptr.dtype.element_ty), mask=mask)  # x's strides
        tl.store(dx_ptr + offset + HALF, (dr1 * sin + dr2 * cos).to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _softcap_ce_fwd(logits_ptr, targets_ptr, losses_ptr, lse_ptr, V: tl.constexpr, SOFTCAP: tl.constexpr,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * V
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            # capped logits lie in (-SOFTCAP, SOFTCAP): exp cannot overflow, no running max needed
            total += tl.where(cols < V, tl.exp(SOFTCAP * libdevice.tanh(z * (1.0 / SOFTCAP))), 0.0)
        lse = tl.log(tl.sum(total, axis=0))
        target = tl.load(targets_ptr + row)
        valid = target != -1  # a target of -1 stands for no token
        z_target = tl.load(row_ptr + tl.where(valid, target, 0)).to(tl.float32)
        loss = lse - SOFTCAP * libdevice.tanh(z_target * (1.0 / SOFTCAP))
        tl.store(losses_ptr + row, tl.where(valid, loss, 0.0))
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _softcap_ce_bwd(logits_ptr, grad_ptr, targets_ptr, lse_ptr, dlosses_ptr, V: tl.constexpr, SOFTCAP: tl.constexpr,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        target = tl.load(targets_ptr + row)
        scale = tl.where(target != -1, tl.load(dlosses_ptr + row), 0.0)
        lse = tl.load(lse_ptr + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(logits_ptr + row * V + cols, mask=cols < V, other=0.0).to(tl.float32)
            t = libdevice.tanh(z * (1.0 / SOFTCAP))
            # d loss / d capped = softmax - onehot; d capped / d z = 1 - tanh^2
            p = tl.exp(SOFTCAP * t - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(grad_ptr + row * V + cols, (p * scale * (1.0 - t * t)).to(grad_ptr.dtype.element_ty),
                     mask=cols < V)

    def _rotary_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dy: torch.Tensor | None) -> torch.Tensor:
        """y = norm(rotary(x)) if dy is None, else the gradient of x given y's dy; the result has x's strides."""
        B, H, T, D = x.shape
        if x.stride(3) != 1 or cos.numel() != T * D // 2:
            raise ValueError(f"rotary_norm: x {tuple(x.shape)} needs its last dim contiguous and cos/sin T x D/2")
        cos, sin = cos.reshape(T, D // 2).float().contiguous(), sin.reshape(T, D // 2).float().contiguous()
        out = torch.empty_like(x)
        if out.stride() != x.stride():  # the kernels write out at x's offsets: x must be a dense layout
            raise ValueError(f"rotary_norm: x {tuple(x.shape)} with strides {x.stride()} is not a dense layout (a "
                             "slice of a larger tensor?): pass x.contiguous()")
        n_rows = B * H * T
        eps = torch.finfo(torch.float32).eps  # F.rms_norm's default: that of the fp32 it computes in, for bf16 too
        grid = (triton.cdiv(n_rows, ROTARY_ROWS),)
        strides = (x.stride(0), x.stride(1), x.stride(2))
        if dy is None:
            _rotary_norm_fwd[grid](x, out, cos, sin, n_rows, H, T, *strides, eps, HALF=D // 2, ROWS=ROTARY_ROWS)
        else:
            dy = dy if dy.stride(3) == 1 else dy.contiguous()
            _rotary_norm_bwd[grid](x, dy, out, cos, sin, n_rows, H, T, *strides, dy.stride(0), dy.stride(1),
                                   dy.stride(2), eps, HALF=D // 2, ROWS=ROTARY_ROWS)
        return out

    def _softcap_ce_launch(logits: torch.Tensor, targets: torch.Tensor,
                           softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
        N, V = logits.shape
        losses = torch.empty(N, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(losses)
        _softcap_ce_fwd[(N,)](logits.contiguous(), targets.contiguous(), losses, lse, V, SOFTCAP=softcap,
                              BLOCK=LOSS_BLOCK, num_warps=8)
        return losses, lse

    def _softcap_ce_backward_launch(dlosses: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                                    lse: torch.Tensor, softcap: float) -> torch.Tensor:
        N, V = logits.shape
        logits = logits.contiguous()  # the kernel reads the logits and writes their gradient row-major
        grad = torch.empty_like(logits)
        _softcap_ce_bwd[(N,)](logits, grad, targets.contiguous(), lse, dlosses.float().contiguous(),
                              V, SOFTCAP=softcap, BLOCK=LOSS_BLOCK, num_warps=8)
        return grad

    @torch.library.custom_op("vibechat::rotary_norm", mutates_args=(), device_types="cuda")
    def rotary_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """norm(apply_rotary_emb(x, cos, sin)) of vibechat.gpt for x (B, H, T, D), cos/sin (1, 1, T, D/2); the
        result in x's dtype and strides."""
        return _rotary_launch(x, cos, sin, None)

    @torch.library.custom_op("vibechat::rotary_norm_backward", mutates_args=(), device_types="cuda")
    def rotary_norm_backward(dy: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return _rotary_launch(x, cos, sin, dy)

    @rotary_norm.register_fake
    def _(x, cos, sin):
        return torch.empty_like(x)

    @rotary_norm_backward.register_fake
    def _(dy, x, cos, sin):
        return torch.empty_like(x)

    def _rotary_norm_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _rotary_norm_grad(ctx, dy):
        x, cos, sin = ctx.saved_tensors
        return rotary_norm_backward(dy, x, cos, sin), None, None

    rotary_norm.register_autograd(_rotary_norm_grad, setup_context=_rotary_norm_setup)

    @torch.library.custom_op("vibechat::softcap_cross_entropy", mutates_args=(), device_types="cuda")
    def _softcap_ce(logits: torch.Tensor, targets: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _softcap_ce_launch(logits, targets, softcap)

    @torch.library.custom_op("vibechat::softcap_cross_entropy_backward", mutates_args=(), device_types="cuda")
    def _softcap_ce_backward(dlosses: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                             softcap: float) -> torch.Tensor:
        return _softcap_ce_backward_launch(dlosses, logits, targets, lse, softcap)

    @_softcap_ce.register_fake
    def _(logits, targets, softcap):
        losses = logits.new_empty(logits.size(0), dtype=torch.float32)
        return losses, torch.empty_like(losses)

    @_softcap_ce_backward.register_fake
    def _(dlosses, logits, targets, lse, softcap):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    def _softcap_ce_setup(ctx, inputs, output):
        logits, targets, softcap = inputs
        ctx.save_for_backward(logits, targets, output[1])
        ctx.softcap = softcap

    def _softcap_ce_grad(ctx, dlosses, _dlse):
        logits, targets, lse = ctx.saved_tensors
        return _softcap_ce_backward(dlosses, logits, targets, lse, ctx.softcap), None, None

    _softcap_ce.register_autograd(_softcap_ce_grad, setup_context=_softcap_ce_setup)

    def softcap_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
        """(N, V) logits, (N,) targets -> (N,) fp32 losses of softcap * tanh(logits / softcap); 0 where the
        target is -1."""
        return _softcap_ce(logits, targets, softcap)[0]
