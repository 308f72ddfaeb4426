"""Muon: SGD with Nesterov momentum whose update is orthogonalized by a Newton–Schulz iteration.

Used for every 2D matrix inside the transformer blocks; embeddings and lm_head use AdamW. The matrices of one
shape are stacked and updated together (momentum, orthogonalization and update as one function, compiled on
GPUs), so a step is a few batched matmuls per shape instead of a chain of small kernels per matrix.
"""

import torch
import torch.distributed as dist

from vibechat.common import all_gather_blocks, reduce_scatter_mean


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of G = U S V^T (of each matrix of a stack): a quintic iteration tuned to push singular
    values towards 1 fast.

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


def muon_step(params: torch.Tensor, grads: torch.Tensor, buf: torch.Tensor, momentum: torch.Tensor,
              lr: torch.Tensor, nesterov: bool, ns_steps: int) -> None:
    """One Muon update, in place, of a stack of same-shape matrices: params, grads, buf are (n, rows, cols).

    momentum and lr are 0-d tensors so that the compiled version is not recompiled as their schedules move.
    """
    buf.lerp_(grads, 1 - momentum)
    g = grads.lerp(buf, momentum) if nesterov else buf
    update = zeropower_via_newtonschulz5(g, steps=ns_steps)
    # tall matrices get a larger step so that every shape moves by a similar RMS
    scale = max(1.0, grads.size(-2) / grads.size(-1)) ** 0.5
    params.sub_(lr * (update * scale).to(params.dtype))


# one graph per stack shape on GPUs; on the CPU eagerly (inductor's C++ build would dominate small runs)
_compiled_muon_step = torch.compile(muon_step, dynamic=False, fullgraph=True)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(_groups_by_shape(params), defaults)
        self._stacks: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    @torch.no_grad()
    def step(self):
        for i, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            stacked = torch.stack(params)
            self._update(i, group, stacked, torch.stack([p.grad for p in params]), params)
            torch._foreach_copy_(params, list(stacked.unbind(0)))

    def _update(self, key: int, group: dict, params: torch.Tensor, grads: torch.Tensor, owned: list) -> None:
        """muon_step on params and grads, the stacks of `owned` (zero-padded rows after them), with their momentum."""
        step = _compiled_muon_step if params.is_cuda else muon_step
        step(params, grads, self._momentum(key, owned, params.size(0)), torch.tensor(group["momentum"]),
             torch.tensor(group["lr"]), group["nesterov"], group["ns_steps"])

    def _momentum(self, key: int, params: list, rows: int) -> torch.Tensor:
        """The params' momentum buffers as the first rows of one (rows, ...) tensor, stacked once.

        The state keeps each matrix's own buffer as a view of its row, so state_dict has the per-matrix format of
        older checkpoints. Restacked whenever the state no longer holds those views (first step, after
        load_state_dict, another set of matrices with gradients).
        """
        stack, views = self._stacks.get(key, (None, []))
        if len(views) == len(params) and all(self.state[p].get("momentum_buffer") is v for p, v in zip(params, views)):
            return stack
        stack = torch.zeros((rows, *params[0].shape), dtype=params[0].dtype, device=params[0].device)
        views = list(stack.unbind(0)[:len(params)])
        for p, view in zip(params, views):
            if "momentum_buffer" in self.state[p]:
                view.copy_(self.state[p]["momentum_buffer"])
            self.state[p]["momentum_buffer"] = view
        self._stacks[key] = stack, views
        return stack


class DistMuon(Muon):
    """Muon across ranks: each rank owns a share of each same-shape group of matrices.

    Per group: reduce-scatter the stacked gradients (averaged) so each rank holds its share,
    update its own matrices as one stack, then all-gather the new matrices to every rank.
    """

    @torch.no_grad()
    def step(self):
        world, rank = dist.get_world_size(), dist.get_rank()
        for i, group in enumerate(self.param_groups):
            params = group["params"]
            per_rank = -(-len(params) // world)  # ceil
            padding = [torch.zeros_like(params[0])] * (per_rank * world - len(params))
            grads = torch.stack([p.grad for p in params] + padding)
            my_grads = torch.empty((per_rank, *params[0].shape), dtype=grads.dtype, device=grads.device)
            reduce_scatter_mean(my_grads, grads)
            mine = params[rank * per_rank:(rank + 1) * per_rank]
            my_params = torch.zeros_like(my_grads)
            if mine:
                my_params[:len(mine)] = torch.stack(mine)
                self._update(i, group, my_params, my_grads, mine)
            gathered = torch.empty_like(grads)
            all_gather_blocks(gathered, my_params)
            torch._foreach_copy_(params, list(gathered.unbind(0)[:len(params)]))


def _groups_by_shape(params) -> list[dict]:
    """One param group per matrix shape, so that a group's matrices stack."""
    params = list(params)
    if params and isinstance(params[0], dict):
        return params
    by_shape: dict[tuple, list] = {}
    for p in params:
        by_shape.setdefault(tuple(p.shape), []).append(p)
    return [dict(params=ps) for _, ps in sorted(by_shape.items())]
