"""Muon: SGD with Nesterov momentum whose update is orthogonalized by a Newton–Schulz iteration.

Used for every 2D matrix inside the transformer blocks; embeddings and lm_head use AdamW.
"""

import torch
import torch.distributed as dist

from vibechat.common import all_gather_blocks, reduce_scatter_mean


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of G = U S V^T: a quintic iteration tuned to push singular values towards 1 fast.

    Runs in bf16 on GPU (stable for this iteration); singular values land in about [0.7, 1.2], which
    trains as well as exact orthogonalization at a fraction of the cost.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


def muon_update(grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool, ns_steps: int) -> torch.Tensor:
    """Update the momentum buffer in place and return the orthogonalized, shape-scaled step."""
    buf.lerp_(grad, 1 - momentum)
    g = grad.lerp(buf, momentum) if nesterov else buf
    update = zeropower_via_newtonschulz5(g, steps=ns_steps)
    # tall matrices get a larger step so that every shape moves by a similar RMS
    return update * max(1.0, grad.size(-2) / grad.size(-1)) ** 0.5


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(_groups_by_shape(params), defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                update = muon_update(p.grad, state["momentum_buffer"], group["momentum"], group["nesterov"],
                                     group["ns_steps"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])


class DistMuon(Muon):
    """Muon across ranks: each rank owns a share of each same-shape group of matrices.

    Per group: reduce-scatter the stacked gradients (averaged) so each rank holds its share,
    update its own matrices, then all-gather the new matrices to every rank.
    """

    @torch.no_grad()
    def step(self):
        world, rank = dist.get_world_size(), dist.get_rank()
        for group in self.param_groups:
            params = group["params"]
            per_rank = -(-len(params) // world)  # ceil
            padded = per_rank * world
            shape = params[0].shape
            grads = torch.zeros((padded, *shape), dtype=params[0].dtype, device=params[0].device)
            for i, p in enumerate(params):
                grads[i] = p.grad
            my_grads = torch.empty((per_rank, *shape), dtype=grads.dtype, device=grads.device)
            reduce_scatter_mean(my_grads, grads)
            my_params = torch.zeros_like(my_grads)
            for j in range(per_rank):
                i = rank * per_rank + j
                if i >= len(params):
                    continue
                p = params[i]
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                update = muon_update(my_grads[j], state["momentum_buffer"], group["momentum"], group["nesterov"],
                                     group["ns_steps"])
                p.add_(update.to(p.dtype), alpha=-group["lr"])
                my_params[j] = p
            gathered = torch.empty_like(grads)
            all_gather_blocks(gathered, my_params)
            for i, p in enumerate(params):
                p.copy_(gathered[i])


def _groups_by_shape(params) -> list[dict]:
    """One param group per matrix shape, so the distributed version can stack a group's matrices."""
    params = list(params)
    if params and isinstance(params[0], dict):
        return params
    by_shape: dict[tuple, list] = {}
    for p in params:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    return [dict(params=ps) for _, ps in sorted(by_shape.items())]
