"""DistAdamW: AdamW with ZeRO-2-style sharding: each rank keeps optimizer state for one slice of every parameter.

Per parameter: reduce-scatter the gradient along dim 0 (averaged over ranks), update this rank's
slice with its slice of the moments, all-gather the updated slices. The math is torch.optim.AdamW's; the
update of a slice is one compiled function on GPUs (one pass over the slice instead of a kernel per operation).
"""

import torch
import torch.distributed as dist

from vibechat.common import all_gather_blocks, reduce_scatter_mean


def adamw_step(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: torch.Tensor, lr: torch.Tensor, beta1: float, beta2: float, eps: float,
               weight_decay: float) -> None:
    """One AdamW update of p in place; step (1-based) and lr are 0-d tensors so that the compiled version is
    not recompiled as they change."""
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
    p.sub_(exp_avg / denom * (lr / bias1))


_compiled_adamw_step = torch.compile(adamw_step, dynamic=False, fullgraph=True)


class DistAdamW(torch.optim.Optimizer):
    def __init__(self, param_groups, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        world, rank = dist.get_world_size(), dist.get_rank()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.size(0) % world:
                    raise ValueError(f"DistAdamW shards dim 0; a parameter of shape {tuple(p.shape)} does not divide by {world} ranks")
                rows = p.size(0) // world
                grad = torch.empty((rows, *p.shape[1:]), dtype=p.grad.dtype, device=p.device)
                reduce_scatter_mean(grad, p.grad)
                p_slice = p[rank * rows:(rank + 1) * rows]
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p_slice)
                    state["exp_avg_sq"] = torch.zeros_like(p_slice)
                state["step"] += 1
                update = _compiled_adamw_step if p.is_cuda else adamw_step
                update(p_slice, grad, state["exp_avg"], state["exp_avg_sq"], torch.tensor(float(state["step"])),
                       torch.tensor(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"])
                all_gather_blocks(p, p_slice.clone())
