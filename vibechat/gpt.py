"""The GPT model, nanochat family.

- rotary position embeddings, no learned positions
- QK-norm, parameter-free RMSNorm, no biases
- relu^2 MLP, untied token embedding and lm_head
- grouped-query attention through n_kv_head, flash attention via PyTorch SDPA
- logits soft-capped at 15, computed in fp32
- under autocast the residual stream is kept in the autocast dtype (bf16 on GPUs)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vibechat import train_ops
from vibechat.common import VibechatError, get_dist_info

HEAD_DIM = 128  # head size of the depth presets: model_dim = depth * 64, n_head = model_dim / 128
SOFTCAP = 15.0  # logits are squashed into (-15, 15)


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768


def config_for_depth(depth: int, vocab_size: int, sequence_len: int) -> GPTConfig:
    """The depth preset: width grows with depth (64 per layer), heads of size 128 (fewer for toy sizes)."""
    if not 1 <= depth <= 64:
        raise VibechatError(f"depth {depth} is out of range: use a depth between 1 and 64 (d20 is nanochat's $100 model)")
    model_dim = depth * 64
    head_dim = min(HEAD_DIM, model_dim)
    n_head = model_dim // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=model_dim)


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); rotate pairs (first half, second half) of the head dimension
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3).to(x.dtype)


def rotary_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """norm(apply_rotary_emb(x, cos, sin)), the QK-norm of q or k: one Triton pass on a GPU (vibechat.train_ops)."""
    if train_ops.triton is not None and x.is_cuda:
        return train_ops.rotary_norm(x, cos, sin)
    return norm(apply_rotary_emb(x, cos, sin))


def softcap_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy of SOFTCAP * tanh(logits / SOFTCAP) in fp32, targets of -1 ignored. On a GPU one Triton
    pass over the (bf16) logits each way (vibechat.train_ops) instead of fp32 copies of them."""
    if reduction not in ("mean", "sum", "none"):  # refused before any work, on either path
        raise ValueError(f"{reduction} is not a valid value for reduction: use 'mean', 'sum' or 'none'")
    logits, targets = logits.view(-1, logits.size(-1)), targets.reshape(-1)
    if not (train_ops.triton is not None and logits.is_cuda):
        capped = SOFTCAP * torch.tanh(logits.float() / SOFTCAP)
        return F.cross_entropy(capped, targets, ignore_index=-1, reduction=reduction)
    losses = train_ops.softcap_cross_entropy(logits, targets, SOFTCAP)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.sum() / (targets != -1).sum()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise VibechatError(
                f"n_embd={config.n_embd}, n_head={config.n_head}, n_kv_head={config.n_kv_head}: "
                "n_embd must divide by n_head and n_head by n_kv_head"
            )
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = cos_sin
        q, k = rotary_norm(q, cos, sin), rotary_norm(k, cos, sin)
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            # query i sits at position get_pos() + i and sees every cached key up to its own position: the
            # cached prefix, causal within the new tokens, never the unwritten tail of a preallocated cache
            q_pos = kv_cache.get_pos() + torch.arange(T, device=q.device)
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
            mask = torch.arange(k.size(2), device=q.device) <= q_pos[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables for 10x the training context, so generation can run past it
        self.rotary_seq_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_seq_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, seq_len: int, head_dim: int, base: float = 10000.0, device=None):
        channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        # shape (1, 1, T, D/2) to broadcast over (B, H, T, D/2)
        return freqs.cos()[None, None], freqs.sin()[None, None]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Embedding ~N(0,1), lm_head tiny, linears scaled by fan-in, output projections zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = self._rotary_tables(self.rotary_seq_len, self.config.n_embd // self.config.n_head, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> int:
        """FLOPs per token for forward+backward: 6 per non-embedding weight plus attention's 12·L·H·D·T."""
        n_embedding = self.transformer.wte.weight.numel()
        c = self.config
        attention = 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.sequence_len
        return 6 * (self.num_params() - n_embedding) + attention

    def setup_optimizers(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2,
                         matrix_lr: float = 0.02, weight_decay: float = 0.0) -> list:
        """[AdamW for embedding + lm_head, Muon for every matrix in the blocks]; distributed versions under torchrun."""
        from vibechat.adamw import DistAdamW
        from vibechat.muon import DistMuon, Muon

        ddp, *_ = get_dist_info()
        matrix_params = list(self.transformer.h.parameters())
        # AdamW learning rates were tuned at width 768; scale by 1/sqrt(width) elsewhere
        scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale),
            dict(params=[self.transformer.wte.weight], lr=embedding_lr * scale),
        ]
        adam_kwargs = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
        if ddp:
            adamw = DistAdamW(adam_groups, **adam_kwargs)
            muon = DistMuon(matrix_params, lr=matrix_lr, momentum=0.95)
        else:
            fused = self.get_device().type == "cuda"
            adamw = torch.optim.AdamW(adam_groups, fused=fused, **adam_kwargs)
            muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None,
                loss_reduction: str = "mean"):
        B, T = idx.shape
        # with a cache the offset is an int, or a device tensor inside a captured decode step (checked by the engine)
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        if isinstance(T0, int) and T0 + T > self.cos.size(2):
            raise VibechatError(
                f"sequence of {T0 + T} tokens is longer than the model's rotary table ({self.cos.size(2)}): shorten the prompt"
            )
        if kv_cache is None:
            cos_sin = self.cos[:, :, :T], self.sin[:, :, :T]
        else:
            positions = T0 + torch.arange(T, device=idx.device)
            cos_sin = self.cos[:, :, positions], self.sin[:, :, positions]
        x = self.transformer.wte(idx)
        if torch.is_autocast_enabled(x.device.type):
            # the residual stream in the autocast dtype, as the matmuls produce it: half the bytes of every
            # norm, add and saved activation (the embedding table itself stays fp32 for AdamW)
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = norm(x)
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        x = norm(x)
        logits = self.lm_head(x)
        if targets is None:
            return SOFTCAP * torch.tanh(logits.float() / SOFTCAP)
        return softcap_cross_entropy(logits, targets, loss_reduction)

    @torch.inference_mode()
    def generate(self, tokens: list[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 42):
        """Naive autoregressive sampling: recomputes the whole sequence for every new token."""
        device = self.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=1)
            yield next_id.item()
