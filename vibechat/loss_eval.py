"""Bits per byte: the model's loss measured per byte of text rather than per token, so models with
different tokenizers (or vocabulary sizes) can be compared."""

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from vibechat.common import VibechatError


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable, steps: int, token_bytes: torch.Tensor) -> float:
    """Sum of the loss (nats) over `steps` batches divided by ln 2 and by the bytes the targets stand for.

    model(x, y, loss_reduction='none') gives the per-token loss, (B*T,) or (B, T). Targets that stand for no
    text (special tokens: token_bytes == 0) or are ignored (< 0) count neither loss nor bytes. Under
    torch.distributed the sums are added over all ranks, so every rank returns the same figure.
    """
    total_nats, total_bytes = None, None
    batch_iter = iter(batches)
    for _ in range(steps):
        x, y = next(batch_iter)
        loss = model(x, y, loss_reduction="none").reshape(-1).float()
        y = y.reshape(-1)
        if total_nats is None:
            total_nats = torch.zeros((), dtype=torch.float32, device=y.device)
            total_bytes = torch.zeros((), dtype=torch.int64, device=y.device)
            token_bytes = token_bytes.to(y.device)
        counted = y >= 0
        num_bytes = torch.where(counted, token_bytes[y.clamp(min=0)], 0)
        total_nats += torch.where(num_bytes > 0, loss, 0.0).sum()
        total_bytes += num_bytes.sum()
    if total_nats is None:
        raise VibechatError(f"evaluate_bpb needs at least one step (got steps={steps})")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        raise VibechatError("evaluate_bpb: the targets stand for no bytes of text (all special or ignored)")
    return total_nats.item() / (math.log(2) * total_bytes.item())
