"""The training loop's parts that the training phases share: optimizers and their schedules, one optimizer step of
next-token loss, sums over ranks, and the conversations of the chat phases (a task mixture, padded batches)."""

import argparse

import torch
import torch.distributed as dist

from tasks.common import TaskMixture
from tasks.registry import TASKS, get_task, task_parameters
from vibechat.common import VibechatError
from vibechat.gpt import GPT

H100_BF16_PEAK_FLOPS = 989e12


def grad_accumulation(total_batch_size: int, tokens_per_fwdbwd: int) -> int:
    """Micro-batches per optimizer step: --total-batch-size over the tokens of one forward pass on all ranks."""
    if total_batch_size % tokens_per_fwdbwd:
        raise VibechatError(f"--total-batch-size {total_batch_size} is not a multiple of device batch x seq len x "
                            f"ranks = {tokens_per_fwdbwd}: change one of them")
    return total_batch_size // tokens_per_fwdbwd


def make_optimizers(model: GPT, args: argparse.Namespace, init_lr_frac: float = 1.0) -> list:
    """The model's optimizers at the LRs of add_training_args' options, each scaled by init_lr_frac."""
    return model.setup_optimizers(unembedding_lr=args.unembedding_lr * init_lr_frac,
                                  embedding_lr=args.embedding_lr * init_lr_frac, matrix_lr=args.matrix_lr * init_lr_frac,
                                  weight_decay=args.weight_decay)


def set_lr(optimizers: list, lr_mult: float) -> None:
    """Every group's LR at lr_mult times the LR it was created with."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult


def step_optimizers(optimizers: list) -> None:
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Linear warm-up, constant, then linear warm-down to final_lr_frac."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int) -> float:
    """Muon momentum ramps 0.85 -> 0.95 over the first 300 steps."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def set_schedules(optimizers: list, step: int, lr_mult: float) -> None:
    """The LRs at lr_mult, and Muon's momentum (the second optimizer's) at its value for `step`."""
    set_lr(optimizers, lr_mult)
    for group in optimizers[1].param_groups:
        group["momentum"] = muon_momentum(step)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the card, for MFU; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return H100_BF16_PEAK_FLOPS if ("H100" in name or "H200" in name) else None


def train_step(model, optimizers, batches, grad_accum_steps: int, autocast_ctx) -> torch.Tensor:
    """One optimizer step over grad_accum_steps micro-batches; returns the mean loss (a tensor, no host sync)."""
    total = None
    for _ in range(grad_accum_steps):
        x, y = next(batches)
        with autocast_ctx():
            loss = model(x, y)
        total = loss.detach() if total is None else total + loss.detach()
        (loss / grad_accum_steps).backward()
    step_optimizers(optimizers)
    return total / grad_accum_steps


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of rendered (ids, mask) rows padded to the longest; a target is the next token where the
    mask marks it as the assistant's, -1 (ignored) elsewhere and on padding."""
    length = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        inputs[i, :n] = torch.tensor(ids[:-1])
        next_ids, trained = torch.tensor(ids[1:]), torch.tensor(mask[1:], dtype=torch.bool)
        targets[i, :n] = torch.where(trained, next_ids, -1)
    return inputs, targets


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over all ranks (itself outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def add_tasks_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--tasks", default=default,
                   help="comma-separated task names, name:N for the first N examples (default: offline stand-ins)")


def task_mixture(spec: str, split: str) -> TaskMixture | None:
    """The tasks of a spec such as "smoltalk,gsm8k:2000,identity" shuffled together, built for `split`.

    For split "test", tasks with no test split (identity, mmlu-auxiliary-train) are left out; None if none is left.
    """
    tasks = []
    for item in spec.split(","):
        name, _, count = item.strip().partition(":")
        if count and not (count.isdigit() and int(count) > 0):
            raise VibechatError(f"task {item!r}: the count after ':' must be a positive number of examples")
        cls, fixed = TASKS.get(name, (None, {}))
        takes_split = cls is not None and "split" in task_parameters(cls) and "split" not in fixed
        if split != "train" and cls is not None and not takes_split:
            continue
        kwargs = {"split": split} if takes_split else {}
        if count:
            kwargs["stop"] = int(count)
        tasks.append(get_task(name, **kwargs))  # an unknown name is an error that lists the known ones
    if not tasks:
        if split == "train":
            raise VibechatError(f"--tasks {spec!r} names no task: give comma-separated task names")
        return None
    return TaskMixture(tasks)
